"""What `dtrain launch` adds to a run's wall time: whole processes, paired and alternated in one run.

    DTRAIN_DATA_DIR=../shared/data python bench/startup.py [--pairs 10]

Each program trains the MNIST recipe for one batch, then evaluates, with W&B and checkpoints off:

    one process:   plain `python recipes/mnist_cnn.py`   against `dtrain launch --cpu` (no launcher: direct)
    two processes: plain `torchrun --nproc-per-node 2`   against `dtrain launch --cpu --nproc 2` (dtrain's agent)
    agent:         `dtrain launch --cpu --nproc 2 --launcher torchrun` against the same with dtrain's agent
    exit:          `dtrain launch --cpu --nproc 2` of the recipe through bench/unfrozen_exit.py (the interpreter's
                   last collection at each rank's exit, as before `setup()` froze what is alive) against the same

Within a pair the order alternates (ABBA); the answer is the median of the paired differences, with
quartiles. Also the parts of dtrain's own time: the CLI up to the launch (`--dry-run`), and
`python -c "import dtrain.runtime"` against `python -c "import torch"` (what a worker imports).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DTRAIN = str(Path(PYTHON).parent / "dtrain")
RECIPE = str(ROOT / "recipes" / "mnist_cnn.py")


def recipe_args(data_dir: str) -> list[str]:
    return ["--epochs", "1", "--limit-train-batches", "1", "--data-dir", data_dir]


def programs(data_dir: str, scratch: Path) -> dict[str, dict[str, list[str]]]:
    args = recipe_args(data_dir)
    launch = [DTRAIN, "launch", RECIPE, "--cpu", "--wandb", "disabled", "--checkpoint-every", "never"]
    return {
        "1 process": {
            "python": [PYTHON, RECIPE, *args],
            "dtrain": [*launch, "--run-dir", str(scratch / "dtrain1"), "--", *args],
        },
        "2 processes": {
            "torchrun": [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", RECIPE, *args],
            "dtrain": [*launch, "--nproc", "2", "--run-dir", str(scratch / "dtrain2"), "--", *args],
        },
        "agent": {
            "torchrun": [*launch, "--nproc", "2", "--launcher", "torchrun", "--run-dir", str(scratch / "torchrun"),
                         "--", *args],
            "local": [*launch, "--nproc", "2", "--run-dir", str(scratch / "local"), "--", *args],
        },
        "exit": {
            "unfrozen": [*launch[:2], str(ROOT / "bench" / "unfrozen_exit.py"), *launch[3:], "--nproc", "2",
                         "--run-dir", str(scratch / "unfrozen"), "--", RECIPE, *args],
            "dtrain": [*launch, "--nproc", "2", "--run-dir", str(scratch / "frozen"), "--", *args],
        },
    }


def timed(argv: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def paired(name: str, pair: dict[str, list[str]], pairs: int, env: dict[str, str]) -> None:
    (base, base_argv), (ours, our_argv) = pair.items()
    differences, times = [], {base: [], ours: []}
    for i in range(pairs):
        order = [(base, base_argv), (ours, our_argv)] if i % 2 == 0 else [(ours, our_argv), (base, base_argv)]
        for label, argv in order:
            times[label].append(timed(argv, env))
        differences.append(times[ours][-1] - times[base][-1])
        print(f"  {name} pair {i + 1}: {base} {times[base][-1]:.2f} s, {ours} {times[ours][-1]:.2f} s", flush=True)
    q1, median, q3 = statistics.quantiles(differences, n=4)
    print(f"{name}: {base} median {statistics.median(times[base]):.2f} s, {ours} {statistics.median(times[ours]):.2f} s; "
          f"{ours} - {base} per pair: median {median:+.2f} s (quartiles {q1:+.2f}, {q3:+.2f}; "
          f"min {min(differences):+.2f}, max {max(differences):+.2f}), {pairs} pairs", flush=True)


def parts(env: dict[str, str], repeats: int) -> None:
    probes = {
        "dtrain launch --dry-run": [DTRAIN, "launch", RECIPE, "--cpu", "--dry-run"],
        "python -c 'import torch'": [PYTHON, "-c", "import torch"],
        "python -c 'import dtrain.runtime'": [PYTHON, "-c", "import dtrain.runtime"],
    }
    for label, argv in probes.items():
        seconds = sorted(timed(argv, env) for _ in range(repeats))
        print(f"{label}: median {statistics.median(seconds):.3f} s (min {seconds[0]:.3f}, max {seconds[-1]:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT / "data")))
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dtrain-bench-startup-"))
    # The plain programs read the same settings: no W&B, no checkpoints, a run directory of their own. Threads
    # per process are alike unset: torch takes every core for one process, torchrun sets 1 for two, as dtrain does.
    env = {**os.environ, "WANDB_MODE": "disabled", "DTRAIN_WANDB": "disabled", "DTRAIN_CHECKPOINT_EVERY": "never",
           "DTRAIN_RUN_DIR": str(scratch / "plain")}
    subprocess.run(["lscpu"], check=False)
    for name, pair in programs(args.data_dir, scratch).items():
        paired(name, pair, args.pairs, env)
    parts(env, repeats=5)


if __name__ == "__main__":
    main()
