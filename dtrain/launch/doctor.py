"""`dtrain doctor`: what this machine offers for training, and with --nproc or --gpus a preflight
that finds a slow rank before a long run does (torchtitan#915).

The facts are gathered by thin calls (versions, nvidia-smi, /sys/class/net, SLURM's commands, free
space); the preflight is a real `dtrain launch` of `dtrain/recipes/preflight.py`, whose
`preflight.json` the pure `slow_ranks` and `preflight_lines` read. torch is imported here only
inside `versions()`, when the command runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from dtrain import engines
from dtrain.core import hardware
from dtrain.core.rundir import RunDir
from dtrain.core.spec import dtrain_argv
from dtrain.errors import UsageError

SLOW = 1.5  # a rank whose matmul takes this many times the other ranks' median is named
PREFLIGHT = Path(__file__).resolve().parent.parent / "recipes" / "preflight.py"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _run(argv: list[str]) -> str | None:
    """A command's stdout, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def versions() -> list[tuple[str, str]]:
    import torch

    cuda = torch.version.cuda
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda and torch.cuda.is_available() else "-"
    return [("python", f"{sys.version.split()[0]} ({sys.executable})"),
            ("torch", f"{torch.__version__} ({f'CUDA {cuda} build' if cuda else 'CPU build'}; "
                      f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s) usable)"),
            ("NCCL", nccl)] + [(name, _version(name)) for name in ("deepspeed", "accelerate", "wandb")]


def gpus() -> list[tuple[str, str]]:
    listing = _run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"])
    if not listing:
        return [("GPUs", "none visible (nvidia-smi absent or found none)")]
    facts = [("GPUs", listing.replace("\n", "\n" + " " * 13))]
    topology = _run(["nvidia-smi", "topo", "-m"])
    if topology:
        facts.append(("topology", topology.replace("\n", "\n" + " " * 13)))
    return facts


def network() -> list[tuple[str, str]]:
    try:
        names = sorted(os.listdir("/sys/class/net"))
    except OSError:
        return [("network", "unknown (no /sys/class/net)")]
    described = [f"{name} {hardware.interface_address(name) or '(no IPv4 address)'}" for name in names]
    return [("network", ", ".join(described))]


def engine_facts(environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """What each cluster engine says of this machine (its version, the job this runs in)."""
    environ = os.environ if environ is None else environ
    return [fact for engine in engines.submitters().values() for fact in engine.doctor_facts(environ)]


def disk(folder: str) -> list[tuple[str, str]]:
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    usage = shutil.disk_usage(path)
    return [("disk", f"{folder}: {usage.free / 1e9:,.1f} GB free of {usage.total / 1e9:,.1f} GB ({path})")]


def slow_ranks(times: list[float], margin: float = SLOW) -> list[tuple[int, float]]:
    """(rank, its time over the other ranks' median) of the ranks slower than the others by `margin`."""
    slow = []
    for rank, seconds in enumerate(times):
        others = statistics.median(times[:rank] + times[rank + 1:]) if len(times) > 1 else seconds
        if seconds > margin * others:
            slow.append((rank, seconds / others))
    return slow


def preflight_lines(result: dict) -> tuple[list[str], list[tuple[int, float]]]:
    """The preflight's lines, and the slow ranks."""
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    slow = dict(slow_ranks([r["matmul_s"] for r in ranks]))
    lines = [f"preflight: {result['world_size']} process(es) on {result['device']}"]
    for r in ranks:
        mark = f"   <- {slow[r['rank']]:.1f}x the other ranks' median" if r["rank"] in slow else ""
        lines.append(f"  rank {r['rank']} ({node_of_rank(r)}): matmul {r['matmul_s'] * 1e3:.2f} ms, "
                     f"{r['tflops'] * 1e3:,.1f} GFLOP/s{mark}")
    if result.get("all_reduce"):
        ar = result["all_reduce"]
        lines.append(f"  all-reduce of {ar['bytes'] / 2**20:.0f} MiB: {ar['seconds'] * 1e3:.1f} ms, "
                     f"bus bandwidth {ar['bus_gbps']:.2f} GB/s")
    for rank, ratio in sorted(slow.items()):
        where = next(node_of_rank(r) for r in ranks if r["rank"] == rank)
        lines.append(f"dtrain: rank {rank} on {where} is slower than the others: its matmul took {ratio:.1f}x their "
                     "median; look at that process's CPU or GPU (throttling, a neighbour, a limit) before a long run.")
    if not slow:
        lines.append("dtrain: no rank is slower than the others by more than "
                     f"{(SLOW - 1) * 100:.0f}%.")
    return lines, sorted(slow.items())


def node_of_rank(rank: dict) -> str:
    """A rank's node: the cluster engine's name for it (logical nodes may share a host name), else its host."""
    return rank.get("node") or rank["host"]


def run_preflight(devices: list[str], runs: str) -> dict:
    """`dtrain launch` the preflight on `devices` (--cpu --nproc N, or --gpus N) in a run directory of its own,
    and read its result. In a SLURM job of several nodes `dtrain launch` runs on every node, so the folder
    is one under `runs` that every node sees (rank 0 may be on any of them)."""
    where = engines.allocation(os.environ)
    every_node = where is not None and where.nodes != 1
    if every_node:
        Path(runs).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".doctor-", dir=runs if every_node else None) as run_dir:
        out = subprocess.run([*dtrain_argv(), "launch", str(PREFLIGHT), *devices, "--run-dir",
                              run_dir, "--wandb", "disabled", "--checkpoint-every", "never", "--timeout", "120"],
                             capture_output=True, text=True)
        try:
            return json.loads(RunDir.of(run_dir).preflight.read_text())
        except (OSError, ValueError):
            tail = "\n".join(out.stderr.strip().splitlines()[-5:])
            raise UsageError(f"the preflight did not finish (exit {out.returncode}):\n{tail}") from None
