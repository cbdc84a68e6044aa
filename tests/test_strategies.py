"""Launchers (torchrun, accelerate, deepspeed), strategies (ddp, fsdp, ZeRO), gradient accumulation,
activation checkpointing and precision: real launcher processes on 2 CPU ranks with gloo."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from dtrain import contract
from dtrain.hardware import free_port

from conftest import ROOT, TEST_RECIPES, launch, metrics, run_dtrain, train_loss_at, train_steps

sys.path.insert(0, str(ROOT / "recipes"))
import tiny_gpt

TINY_GPT = ["--d-model", "64", "--block", "64", "--batch-size", "16", "--max-chars", "300000"]
TINY_GPT_VAL_LOSS = 2.8  # after 90 steps of 2 x 16 windows (2.56 measured under FSDP); uniform guessing: ln(97) = 4.57


def load_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pth", weights_only=True)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def epoch_accuracy(out) -> float:
    match = re.search(r"Test Acc: ([\d.]+)%", out.stdout)
    assert match, out.stdout
    return float(match.group(1))


# --- launchers: one job of the world size asked for ------------------------------------------------

def test_accelerate_trains_as_one_job_of_world_size_2(tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, "--launcher", "accelerate", recipe=str(TEST_RECIPES / "small_epoch.py"))
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(16))  # each rank half of the batches
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert ranks[0]["params"] == ranks[1]["params"]  # gradients were averaged: one model


def test_zero_under_the_deepspeed_launcher_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce maps a /dev/shm file per rank (69 MB each here) and never removes it."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    run_dir = tmp_path / "run"
    launch(run_dir, "--launcher", "deepspeed", "--strategy", "zero2", recipe=str(TEST_RECIPES / "small_epoch.py"))
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) == before


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


# --- training under each launcher and strategy -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("options", [("--launcher", "accelerate"), ("--launcher", "deepspeed", "--strategy", "zero2")],
                         ids=["accelerate-ddp", "deepspeed-zero2"])  # torchrun and FSDP: tests/test_launch.py's 98%
def test_mnist_reaches_97_5_percent_after_one_epoch(tmp_path, data_dir, options):
    out = launch(tmp_path / "run", *options, "--checkpoint-every", "never", "--", "--epochs", "1",
                 "--data-dir", data_dir)
    assert epoch_accuracy(out) >= 97.5


@pytest.mark.slow
@pytest.mark.parametrize("launcher, strategy", [("torchrun", "fsdp"), ("deepspeed", "zero3")])
def test_tiny_gpt_learns_under_sharding_with_activation_checkpointing(tmp_path, launcher, strategy):
    out = launch(tmp_path / "run", "--launcher", launcher, "--strategy", strategy, "--activation-checkpointing",
                 "--checkpoint-every", "never", "--", *TINY_GPT, "--limit-train-batches", "90",
                 recipe="recipes/tiny_gpt.py")
    val_loss = float(re.search(r"Eval Loss: ([\d.]+)", out.stdout).group(1))
    assert val_loss < TINY_GPT_VAL_LOSS, out.stdout
    state = load_model(tmp_path / "run")
    assert state["head.weight"].shape == (len(tiny_gpt.VOCAB), 64)  # the whole model, gathered


@pytest.fixture(scope="module")
def whole_batches(tmp_path_factory, data_dir) -> Callable[[str], Path]:
    """A strategy's run of 20 SGD steps of batches of 64 per process in fp32, made when first asked for (each
    strategy initialises and sums in its own way): DDP's is half precision's reference too."""
    runs: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(f"whole-{strategy}") / "run"
            train_steps(runs[strategy], data_dir, "--strategy", strategy, steps=20)
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
    """20 steps only: this CPU has no fp16/bf16 units (about 10x slower than fp32)."""
    loss = train_steps(tmp_path / "run", data_dir, "--strategy", strategy, "--precision", precision, steps=20)
    fp32_loss = train_loss_at(whole_batches("ddp"), 20)
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
