"""Strategies (ddp, fsdp, ZeRO), gradient accumulation and precision, and how the ranks of one job meet: real
launcher processes on 2 CPU ranks with gloo. Each launcher training what the default one does, and activation
checkpointing under sharding: tests/test_portability.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dtrain.core import contract
from dtrain.core.hardware import free_port

from conftest import ROOT, TEST_RECIPES, launch, metrics, run_dtrain, train_loss_at, train_steps


def load_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pth", weights_only=True)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# --- how the ranks of one job meet -----------------------------------------------------------------

def test_ddp_on_one_hosts_cpus_averages_gradients_through_shared_memory_exactly_as_gloo(tmp_path):
    run_dir = tmp_path / "run"
    out = launch(run_dir, recipe=str(TEST_RECIPES / "ddp_gradients.py"))
    rank0 = json.loads(out.stdout.strip().splitlines()[-1])
    assert rank0["comm_hook"] == "comm_hook"  # dtrain's shared-memory hook, not DDP's built-in all-reduce
    assert rank0["equal"] == [True] * 5
    assert not list(Path("/dev/shm").glob("dtrain-grads-*"))  # its buffer is gone with the job


def test_a_process_the_launcher_did_not_join_into_the_job_stops_at_start_up(tmp_path):
    """accelerate's known silent failure: `accelerate launch --cpu --num_processes 2` starts one
    process, which would train alone; dtrain's start-up check stops it."""
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          str(TEST_RECIPES / "small_epoch.py")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, contract.WORLD_SIZE: "2", contract.RUN_DIR: str(tmp_path / "run")})
    assert out.returncode != 0
    assert ("started as one of a world of 1, but dtrain launched 2 processes: the launcher did not join them into "
            "one job") in out.stderr
    assert 'small_epoch.py", line' not in out.stderr  # one sentence from the worker (accelerate adds its own trace)
    assert not list((tmp_path / "run").glob("rank*.json"))


# --- training under each strategy ------------------------------------------------------------------

@pytest.fixture(scope="module")
def whole_batches(tmp_path_factory, data_dir) -> Callable[[str], Path]:
    """A strategy's run of 20 SGD steps of batches of 64 per process in fp32, its loss logged every 10, made when
    first asked for (each strategy initialises and sums in its own way): DDP's is half precision's reference too."""
    runs: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(f"whole-{strategy}") / "run"
            train_steps(runs[strategy], data_dir, "--strategy", strategy, steps=20, log_every=10)
        return runs[strategy]
    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_grad_accum_4_of_16_matches_batches_of_64(tmp_path, data_dir, whole_batches, strategy):
    """20 optimizer steps; SGD (see tests/recipes/mnist_sgd.py for why not AdamW), no dropout."""
    accumulated = tmp_path / "accumulated"
    launch(accumulated, "--strategy", strategy, "--checkpoint-every", "never", "--max-steps", "20", "--grad-accum",
           "4", "--", "--batch-size", "16", "--lr", "0.01", "--log-every", "10", "--data-dir", data_dir,
           recipe=str(TEST_RECIPES / "mnist_sgd.py"))
    assert max_difference(load_model(accumulated), load_model(whole_batches(strategy))) < 1e-5
    assert [r["step"] for r in metrics(accumulated, "train")] == [10, 20]


@pytest.mark.parametrize("strategy, precision", [("ddp", "fp16"), ("fsdp", "fp16"), ("ddp", "bf16"),
                                                 ("fsdp", "bf16"), ("zero2", "bf16")])
def test_half_precision_tracks_fp32(tmp_path, data_dir, whole_batches, strategy, precision):
    """10 steps only: this CPU has no fp16/bf16 units (about 10x slower than fp32)."""
    loss = train_steps(tmp_path / "run", data_dir, "--strategy", strategy, "--precision", precision, steps=10)
    fp32_loss = train_loss_at(whole_batches("ddp"), 10)
    assert math.isfinite(loss) and abs(loss - fp32_loss) < 0.1 * fp32_loss, (loss, fp32_loss)


def test_dtrain_debug_runs_a_zero_strategy_as_a_world_of_one(tmp_path, data_dir):
    """DeepSpeed wants a process group even alone: `dtrain debug` gets one on an in-memory store."""
    out = run_dtrain("debug", "recipes/mnist_cnn.py", "--strategy", "zero2", "--max-steps", "5", "--run-dir",
                     str(tmp_path / "run"), "--wandb", "disabled", "--checkpoint-every", "never", "--", "--epochs", "1",
                     "--limit-train-batches", "5", "--limit-eval-batches", "4", "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    assert [r["step"] for r in metrics(tmp_path / "run")][-1] == 5


def test_ranks_of_one_hostname_that_do_not_share_memory_average_through_gloo(tmp_path):
    """The shared-memory all-reduce is picked only when every rank has mapped the one buffer rank 0
    made, never by host name: rank 1 here has a /dev/shm of its own (a mount namespace, as in a
    container), so DDP keeps gloo, and the gradients are still every rank's mean."""
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --mount (root) to give one rank a /dev/shm of its own")
    recipe = str(TEST_RECIPES / "ddp_gradients.py")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           contract.DEVICE: "cpu", contract.RUN_DIR: str(tmp_path / "run")}
    private_shm = f"mount -t tmpfs tmpfs /dev/shm && exec {sys.executable} {recipe}"
    ranks = [subprocess.Popen(argv, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for rank, argv in enumerate([[sys.executable, recipe],
                                          ["unshare", "--mount", "--propagation", "private", "sh", "-c", private_shm]])]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert [r["comm_hook"] for r in results] == [None, None]  # DDP's own all-reduce over gloo
    assert all(r["equal"] == [True] * 5 for r in results)
