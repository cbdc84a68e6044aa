"""Shared helpers: run the real `dtrain` console script in a subprocess, find MNIST, find leftovers."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from dtrain.core.hardware import free_port
from dtrain.core.metrics import TRAIN
from dtrain.core.metrics import read as read_metrics
from dtrain.engines.slurm import parse_job_record

# `--wandb auto` would write an offline W&B run for every launch (seconds each); the tests about
# W&B pass `--wandb offline` explicitly, which wins over this.
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parent.parent
# DeepSpeed compiles a communication extension on first use (~40 s): once per checkout, not per test.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
DTRAIN = str(Path(sys.executable).parent / "dtrain")
TEST_RECIPES = ROOT / "tests" / "recipes"


def mnist_dir() -> str | None:
    candidates = [os.environ.get("DTRAIN_DATA_DIR"), str(ROOT.parent / "shared" / "data")]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return str(Path(candidate).resolve())
    return None


@pytest.fixture(scope="session")
def data_dir() -> str:
    found = mnist_dir()
    if found is None:
        message = "MNIST raw files not found: set DTRAIN_DATA_DIR to a folder holding MNIST/raw/ (tests never download)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes past `size` bytes fail in this process (EFBIG), as they do on a disk that fills up mid-write."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str):
    """A real small file system (tmpfs of `size`, e.g. "13m") at `folder`, unmounted after; skips without root."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def run_dtrain(*args: str, cwd: Path | str = ROOT, timeout: float = 600, env: dict | None = None):
    return subprocess.run([DTRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


CPU_PAIR = ("--cpu", "--nproc", "2")
GPU_GROUP = "cuda"  # the option rows whose examples need a GPU run (--cuda-graph: one GPU process)


def launch(run_dir: Path, *args: str, recipe: str = "recipes/mnist_cnn.py", devices: tuple[str, ...] = CPU_PAIR,
           timeout: float = 600, env: dict | None = None):
    """`dtrain launch RECIPE DEVICES` (W&B disabled) with launch options and recipe options split by `--`;
    it must succeed."""
    cut = args.index("--") if "--" in args else len(args)
    out = run_dtrain("launch", recipe, *devices, "--run-dir", str(run_dir), "--wandb", "disabled",
                     *args[:cut], "--", *args[cut + 1:], timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def metrics(run_dir: Path, of_kind: str | None = None) -> list[dict]:
    """metrics.jsonl's rows, through dtrain's one reader (each row carries its kind)."""
    return read_metrics(run_dir, of_kind)


def train_loss_at(run_dir: Path, step: int) -> float:
    return next(r["train/loss"] for r in metrics(run_dir, TRAIN) if r["step"] == step)


def train_steps(run_dir: Path, data_dir: str, *options: str, steps: int = 30, log_every: int | None = None,
                devices: tuple[str, ...] = CPU_PAIR) -> float:
    """The training loss at step `steps` (the mean of the `log_every` steps up to it, by default all) of the SGD MNIST
    recipe in batches of 64, without an evaluation."""
    launch(run_dir, *options, "--max-steps", str(steps), "--checkpoint-every", "never", "--", "--lr", "0.01",
           "--batch-size", "64", "--log-every", str(log_every or steps), "--data-dir", data_dir,
           recipe=str(TEST_RECIPES / "mnist_sgd.py"), devices=devices)
    return train_loss_at(run_dir, steps)


def gradients_and_saved_bytes(make_model, loss_of, checkpointed: tuple[str, ...]) -> tuple[dict, int]:
    """One forward and backward of `make_model()` (seeded) with `checkpointed` block classes under
    activation checkpointing: the gradients by parameter name, and the bytes kept for backward (those
    autograd saves outside checkpointed blocks plus the block inputs that checkpointing keeps instead)."""
    import torch

    from dtrain.runtime import activation_checkpointing

    torch.manual_seed(0)
    model = make_model()
    activation_checkpointing.apply(model, checkpointed)
    saved: dict[tuple, int] = {}

    def pack(tensor):
        saved[(tensor.data_ptr(), tensor.shape)] = tensor.numel() * tensor.element_size()
        return tensor

    block_inputs = []
    for block in activation_checkpointing.blocks_of(model, checkpointed):
        block.register_forward_pre_hook(lambda _m, args, kwargs: block_inputs.append(
            next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).nbytes), with_kwargs=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model)
    loss.backward()
    names = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return names, sum(saved.values()) + sum(block_inputs)


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs of live processes whose environment has key=value (workers and launchers inherit it)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(entry):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _alive(proc_dir: Path) -> bool:
    stat = (proc_dir / "stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _controller_answers(conf: Path) -> bool:
    """Probe slurmctld's port: SLURM's own clients hang ~9 s when it is down."""
    import re
    import socket

    match = re.search(r"^SlurmctldPort=(\d+)", conf.read_text(), re.M) if conf.is_file() else None
    try:
        with socket.create_connection(("127.0.0.1", int(match.group(1)) if match else 6817), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """The environment for SLURM commands against a real local cluster (three logical nodes).

    Uses the cluster `.ci/run` (or a developer) started when SLURM_CONF points at one that
    answers; otherwise starts one with cluster/local/start.sh and stops exactly that one.
    """
    conf = os.environ.get("SLURM_CONF")
    if conf and _controller_answers(Path(conf)):
        yield {"SLURM_CONF": conf, "OMP_NUM_THREADS": "1"}
        return
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        message = "SLURM is not installed and cannot be without root (cluster/local/start.sh installs it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    state = Path(tempfile.mkdtemp(prefix="dtrain-slurm-test-"))  # not under pytest's 0700 folder: munged must enter
    env = {**os.environ, "DTRAIN_SLURM_PORT": str(free_port())}
    subprocess.run([str(ROOT / "cluster" / "local" / "start.sh"), str(state)], check=True, env=env, timeout=300)
    try:
        yield {"SLURM_CONF": str(state / "slurm.conf"), "OMP_NUM_THREADS": "1"}
    finally:
        subprocess.run([str(ROOT / "cluster" / "local" / "stop.sh"), str(state)], timeout=120)
        shutil.rmtree(state, ignore_errors=True)


# --- a real SLURM (the slurm_env fixture) ---------------------------------------------------------

def slurm_cmd(slurm_env, *argv: str, check: bool = True) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env={**os.environ, **slurm_env})
    if check:
        assert result.returncode == 0, result.stderr
    return result.stdout


def submit(slurm_env, cwd: Path, *args: str) -> str:
    result = run_dtrain("slurm", "submit", *args, cwd=cwd, env=slurm_env)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("submitted job "), result.stdout
    return first.split()[2].rstrip(":")


def job_fields(slurm_env, job_id: str) -> dict[str, str]:
    return parse_job_record(slurm_cmd(slurm_env, "scontrol", "show", "job", "-o", job_id))


def wait_for(slurm_env, job_id: str, states: tuple[str, ...], timeout: float = 300, release: bool = False) -> dict:
    """Poll the job every 0.2 s until it is in one of `states`; `release`: start a requeued job now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(slurm_env, job_id)
        if fields["JobState"] in states:
            return fields
        if release and fields["JobState"] == "PENDING" and fields.get("Reason") == "BeginTime":
            slurm_cmd(slurm_env, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {fields['JobState']} after {timeout} s")


# --- nodes on a network (the namespaces fixture) ----------------------------------------------------

ADDRESSES = ("198.18.0.1", "198.18.0.2", "198.18.0.3")  # node i's, from the 198.18.0.0/15 test range
NETNS = Path("/etc/netns")  # `ip netns exec NAME` mounts /etc/netns/NAME/hosts over /etc/hosts


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture(scope="session")
def namespaces():
    """(namespace, veth) of three "nodes" that share no loopback: a network namespace each, with its own address
    on one bridge (in a namespace of its own, out of the host's firewall) and its own hosts file; made once for
    the session, removed after it with everything in /etc/netns it made (../shared/notes/multi-node-netns.md)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces")
    tag = uuid.uuid4().hex[:6]
    switch = f"dtrain-{tag}-sw"
    netns_there = NETNS.exists()
    nodes = [(f"dtrain-{tag}-{i}", f"dtv{tag}{i}") for i in range(len(ADDRESSES))]
    made = []
    try:
        for namespace in (switch, *(n for n, _ in nodes)):
            if ip("netns", "add", namespace).returncode:
                pytest.skip("network namespaces cannot be made here")
            made.append(namespace)
        steps = [("-n", switch, "link", "add", "br0", "type", "bridge"), ("-n", switch, "link", "set", "br0", "up")]
        for (namespace, veth), address in zip(nodes, ADDRESSES):
            steps += [("link", "add", veth, "type", "veth", "peer", "name", f"{veth}s"),
                      ("link", "set", veth, "netns", namespace), ("link", "set", f"{veth}s", "netns", switch),
                      ("-n", switch, "link", "set", f"{veth}s", "master", "br0"),
                      ("-n", switch, "link", "set", f"{veth}s", "up"),
                      ("-n", namespace, "addr", "add", f"{address}/24", "dev", veth),
                      ("-n", namespace, "link", "set", "lo", "up"), ("-n", namespace, "link", "set", veth, "up")]
        for step in steps:
            result = ip(*step)
            assert result.returncode == 0, (step, result.stderr)
        for namespace, _ in nodes:
            (NETNS / namespace).mkdir(parents=True)
            hosts_file(namespace).write_text("127.0.0.1 localhost\n")
        yield nodes
    finally:
        for namespace in made:
            ip("netns", "del", namespace)  # its ends of the veth pairs go with it
            shutil.rmtree(NETNS / namespace, ignore_errors=True)
        if not netns_there and NETNS.exists() and not any(NETNS.iterdir()):
            NETNS.rmdir()


def hosts_file(namespace: str) -> Path:
    return NETNS / namespace / "hosts"


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in ip("netns", "pids", namespace).stdout.split()]


def environ_of(pid: int, name: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            entries = fh.read().decode(errors="replace").split("\0")
    except OSError:
        return []
    return [entry.split("=", 1)[1] for entry in entries if entry.startswith(f"{name}=")]


def empty_namespaces(namespaces) -> None:
    """After a test: no process left in any namespace (nor the error spool of a `dtrain launch` killed there, which
    its launcher's environment names), every link up, every hosts file as made."""
    for namespace, veth in namespaces:
        pids = namespace_pids(namespace)
        spools = {value for pid in pids for value in environ_of(pid, "DTRAIN_ERROR_SPOOL")}
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for spool in spools:
            shutil.rmtree(spool, ignore_errors=True)
        ip("-n", namespace, "link", "set", veth, "up")
        hosts_file(namespace).write_text("127.0.0.1 localhost\n")

