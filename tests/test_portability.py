"""One recipe under every strategy, launcher and precision: the portability matrix, with real processes.

Every recipe x strategy under the default launcher (dtrain's own agent) in fp32 trains a few steps and its loss
goes down, tiny_gpt under the sharded strategies with its blocks' activations checkpointed; tiny_gpt under every
strategy, and the custom-loop mnist_mlp under ZeRO 1, resume from a mid-epoch checkpoint of that run and end on
its weights bit for bit. accelerate launch and the deepspeed launcher train what the default launcher does, bit
for bit (torchrun: tests/test_direct.py, tests/test_launch.py, every restart and every job of several nodes). Half
precision under each strategy: tests/test_strategies.py.
Then: ctx.clip_grad_norm means the same under ZeRO as under DDP, an HF model's blocks come from the model, and a
refused combination is one sentence from rank 0.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from dtrain.runtime.schedules import lr_factor

from conftest import ROOT, TEST_RECIPES, gradients_and_saved_bytes, launch, metrics, run_dtrain

sys.path.insert(0, str(ROOT / "recipes"))
import tiny_gpt

STEPS = 20
TINY_GPT_LR = 3e-3
# Each recipe's arguments for a short run: STEPS optimizer steps, the loss logged every 5. tiny_gpt's and
# mnist_mlp's two epochs put their checkpoint at step 5 mid-epoch, so a resume from it crosses an epoch.
RECIPES = {
    "mnist_cnn": ["--epochs", "1", "--limit-train-batches", str(STEPS), "--limit-eval-batches", "4", "--log-every", "5"],
    "mnist_mlp": ["--epochs", "2", "--limit-train-batches", str(STEPS // 2), "--log-every", "5"],
    "tiny_gpt": ["--d-model", "32", "--block", "32", "--layers", "2", "--batch-size", "8", "--max-chars", "60000",
                 "--epochs", "2", "--limit-train-batches", str(STEPS // 2), "--log-every", "5", "--warmup-steps", "5",
                 "--lr", str(TINY_GPT_LR)],
    "hf_causal_lm": ["--block", "32", "--n-embd", "32", "--batch-size", "8", "--max-chars", "60000",
                     "--limit-train-batches", str(STEPS), "--log-every", "5", "--warmup-steps", "5"],
}
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
RESUMED = [("tiny_gpt", strategy) for strategy in STRATEGIES] + [("mnist_mlp", "zero1")]
CHECKPOINTED = {("tiny_gpt", "fsdp"), ("tiny_gpt", "zero3")}  # activation checkpointing under sharding
LAUNCHERS = [("accelerate", "ddp"), ("deepspeed", "zero2")]


def train(run_dir: Path, recipe: str, data_dir: str, strategy: str, *options: str):
    recipe_args = RECIPES[recipe] + (["--data-dir", data_dir] if recipe.startswith("mnist") else [])
    checkpointed = ("--activation-checkpointing",) if (recipe, strategy) in CHECKPOINTED else ()
    return launch(run_dir, "--checkpoint-every", "5", "--strategy", strategy, *checkpointed, *options, "--",
                  *recipe_args, recipe=f"recipes/{recipe}.py")


def losses(run_dir: Path) -> list[float]:
    return [row["train/loss"] for row in metrics(run_dir, "train")]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pth", weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir) -> Callable[[str, str], tuple[Path, str]]:
    """A recipe's uninterrupted run under a strategy and its console, made when first asked for: the matrix
    reads it, and the resumes end on its weights."""
    runs: dict[tuple[str, str], tuple[Path, str]] = {}

    def run(recipe: str, strategy: str) -> tuple[Path, str]:
        if (recipe, strategy) not in runs:
            run_dir = tmp_path_factory.mktemp(f"{recipe}-{strategy}") / "run"
            runs[recipe, strategy] = run_dir, train(run_dir, recipe, data_dir, strategy).stdout
        return runs[recipe, strategy]

    return run


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_recipe_learns_under_every_strategy(straight, recipe, strategy):
    run_dir, _ = straight(recipe, strategy)
    rows = metrics(run_dir, "train")
    assert [row["step"] for row in rows] == list(range(5, STEPS + 1, 5))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"], losses(run_dir)
    flops = yaml.safe_load((run_dir / "config.yaml").read_text()).get("flops_per_sample")
    assert flops and (recipe != "mnist_cnn" or flops == 24_995_328)  # the same count under every strategy


@pytest.mark.parametrize("recipe, strategy", RESUMED, ids=[f"{r}-{s}" for r, s in RESUMED])
def test_a_resume_from_mid_epoch_ends_on_the_uninterrupted_runs_weights(tmp_path, data_dir, straight, recipe,
                                                                         strategy):
    """The optimizer, the sampler's place and (tiny_gpt) the per-step warm-up and cosine come back."""
    reference, console = straight(recipe, strategy)
    resumed = tmp_path / "resumed"
    out = train(resumed, recipe, data_dir, strategy, "--resume", str(reference / "checkpoints" / "step_0000005"))
    assert "resuming from" in out.stdout and "(step 5, epoch 1, batch 5)" in out.stdout, out.stdout
    expected, got = weights(reference), weights(resumed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [row["step"] for row in metrics(resumed, "train")] == [10, 15, 20]  # each logged once
    if recipe == "tiny_gpt":
        assert got["head.weight"].shape == (len(tiny_gpt.VOCAB), 32)  # the whole model, gathered
        for row in metrics(reference, "train") + metrics(resumed, "train"):
            assert row["lr"] == pytest.approx(TINY_GPT_LR * lr_factor(row["step"], 5, STEPS), rel=1e-12), row["step"]
        epochs = metrics(reference, "epoch")
        assert all(r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-9) for r in epochs)
        assert epochs[-1]["eval/loss"] < math.log(len(tiny_gpt.VOCAB))  # it learnt something
        assert "| perplexity: " in console


@pytest.mark.parametrize("launcher, strategy", LAUNCHERS, ids=[f"{lr}-{s}" for lr, s in LAUNCHERS])
def test_another_launcher_trains_what_the_default_one_does(tmp_path, data_dir, straight, launcher, strategy):
    """The launcher only starts the processes: one job of the same world, the same weights bit for bit. DeepSpeed's
    CPU all-reduce maps a /dev/shm file per rank (69 MB each here) and never removes it; dtrain does."""
    shared_memory = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    reference, _ = straight("mnist_cnn", strategy)
    run_dir = tmp_path / launcher
    train(run_dir, "mnist_cnn", data_dir, strategy, "--launcher", launcher)
    expected, got = weights(reference), weights(run_dir)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(run_dir) == losses(reference)
    if launcher == "deepspeed":
        assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) == shared_memory


@pytest.fixture(scope="module")
def ddp_clipped(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clip") / "ddp"
    launch(run_dir, recipe=str(TEST_RECIPES / "clip_norm.py"))
    return run_dir


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_clip_grad_norm_under_zero_clips_and_returns_what_ddp_does(tmp_path, ddp_clipped, strategy):
    run_dir = tmp_path / strategy
    launch(run_dir, "--strategy", strategy, recipe=str(TEST_RECIPES / "clip_norm.py"))
    expected, got = (json.loads((d / "norms.json").read_text()) for d in (ddp_clipped, run_dir))
    assert min(expected) > 0.05 * 10  # every step clips hard
    assert got == pytest.approx(expected, rel=1e-5)
    ddp, zero = (torch.load(d / "model.pth", weights_only=True) for d in (ddp_clipped, run_dir))
    assert all(torch.allclose(ddp[k], zero[k], atol=1e-6) for k in ddp)  # the same clipped steps


def test_an_hf_models_blocks_come_from_the_model_and_checkpointing_them_saves_memory():
    """GPT-2 names no block class to dtrain: `_no_split_modules` does (GPT2Block), and checkpointing
    those keeps at least half of the activations out of memory, as it does for tiny_gpt's blocks."""
    sys.path.insert(0, str(ROOT / "recipes"))
    import hf_causal_lm

    args = hf_causal_lm.parse_args(["--n-layer", "4", "--max-chars", "1000"])
    blocks = tuple(hf_causal_lm.build(args)[0]._no_split_modules)
    assert blocks == ("GPT2Block",)
    ids = torch.randint(len(hf_causal_lm.VOCAB), (8, 64), generator=torch.Generator().manual_seed(1))

    def model():
        return hf_causal_lm.build(args)[0]

    def loss(module):
        return hf_causal_lm.compute_loss(module, {"input_ids": ids, "labels": ids})[0]

    plain, plain_bytes = gradients_and_saved_bytes(model, loss, ())
    checkpointed, checkpointed_bytes = gradients_and_saved_bytes(model, loss, blocks)
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) < 1e-6
    assert checkpointed_bytes <= 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_a_refused_combination_is_one_sentence_from_rank_0(tmp_path, data_dir):
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(tmp_path / "run"),
                     "--activation-checkpointing", "TransformerBlock", "--", "--data-dir", data_dir)
    assert out.returncode == 1
    console = out.stdout + out.stderr
    assert console.count("names TransformerBlock, but the model has no module of that class") == 1, console
    assert "[rank1]" not in console and "Traceback" not in console
