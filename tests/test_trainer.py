"""Trainer for any model, with real processes: batches of any structure and compute_loss (exact
resume), evaluation beyond classification (exact mean loss over uneven shards; torchmetrics:
test_logging.py), a per-step schedule's end (tiny_gpt's warm-up and cosine across a resume:
test_portability.py), evaluation every N steps and a target to stop at, callbacks and streams."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import TEST_RECIPES, launch, metrics


def weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pth", weights_only=True)


def test_dict_batches_with_compute_loss_resume_bit_exact(tmp_path):
    recipe = str(TEST_RECIPES / "dict_batches.py")
    launch(tmp_path / "straight", "--checkpoint-every", "13", recipe=recipe)  # mid-epoch 2
    out = launch(tmp_path / "resumed", "--resume", str(tmp_path / "straight" / "checkpoints" / "step_0000013"),
                 recipe=recipe)
    assert "resuming from" in out.stdout and "(step 13, epoch 2, batch 3)" in out.stdout, out.stdout
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert "Test Acc:" in out.stdout  # its compute_loss gave class scores and labels: a classifier's report


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_eval_loss_over_uneven_shards_is_the_whole_sets_mean(tmp_path, strategy):
    """101 evaluation samples on 2 ranks in batches of 10: 6 batches and 5; under FSDP a forward
    is a collective, so the rank with 5 runs one more, discarded."""
    run_dir = tmp_path / "run"
    out = launch(run_dir, "--strategy", strategy, recipe=str(TEST_RECIPES / "regression.py"))
    assert "Test Acc" not in out.stdout and "| Eval Loss: " in out.stdout
    data = torch.load(run_dir / "eval_set.pt", weights_only=True)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    model.load_state_dict(weights(run_dir))
    with torch.no_grad():
        expected = (model(data["x"]).double() - data["y"].double()).pow(2).mean().item()
    logged = metrics(run_dir, "epoch")[-1]["eval/loss"]
    assert abs(logged - expected) / expected < 1e-6, (logged, expected)


def test_stop_at_a_target_ends_mnist_at_the_first_evaluation_that_reaches_it(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    out = launch(run_dir, "--", "--epochs", "2", "--eval-every", "25", "--stop-at", "eval/accuracy>=0.9",
                 "--data-dir", data_dir)
    evaluations = metrics(run_dir, "eval")
    reached = [r for r in evaluations if r["eval/accuracy"] >= 0.9]
    assert reached and all(r["eval/accuracy"] < 0.9 for r in evaluations if r["step"] < reached[0]["step"])
    assert [r["step"] for r in evaluations] == list(range(25, reached[0]["step"] + 1, 25))  # none after it
    (target,) = metrics(run_dir, "target")
    assert (target["step"], target["stop_at"], target["eval/accuracy"]) == (
        reached[0]["step"], "eval/accuracy>=0.9", reached[0]["eval/accuracy"])
    assert 0 < target["time_to_target_s"] < target["since_launch_s"]
    assert max(r["step"] for r in metrics(run_dir, "train")) <= target["step"]
    assert f"reached >= 0.9 at step {target['step']}" in out.stdout


def test_callbacks_run_on_every_rank_and_streams_are_shared_out(tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, "--checkpoint-every", "never", recipe=str(TEST_RECIPES / "hooks_and_streams.py"))
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:  # 40 elements, 20 per rank, batches of 4: 5 steps an epoch, 2 epochs
        assert rank["steps"] == list(range(1, 11))
        assert rank["evaluations"] == [3, 5, 6, 9, 10]  # every 3 steps, and at each epoch's end
    first_epoch = [set(rank["train"][:20]) for rank in ranks]
    assert first_epoch[0].isdisjoint(first_epoch[1]) and first_epoch[0] | first_epoch[1] == set(range(40))
    evaluation = sorted(ranks[0]["eval"][:19] + ranks[1]["eval"][:18])  # the first evaluation of 37 elements
    assert evaluation == list(range(37))


def test_the_mnist_recipes_onecycle_ends_exactly_at_the_last_step_on_two_ranks_with_accumulation(tmp_path, data_dir):
    """--lr-schedule onecycle counts the run's optimizer steps (padded shards, the short last window of an epoch):
    one step too few and OneCycleLR raises at the end, too many and the schedule is cut before its low end."""
    run_dir = tmp_path / "run"
    launch(run_dir, "--grad-accum", "3", "--checkpoint-every", "never", "--", "--epochs", "2",
           "--limit-train-batches", "10", "--lr-schedule", "onecycle", "--lr", "0.01", "--log-every", "1",
           "--data-dir", data_dir)
    rows = metrics(run_dir, "train")
    assert [r["step"] for r in rows] == list(range(1, 9))  # ceil(10 / 3) = 4 optimizer steps per epoch
    rates = [r["lr"] for r in rows]  # a row's lr is the next step's: step 8 ran at rates[-2], the schedule's end
    assert max(rates) == pytest.approx(0.01, rel=0.05) and rates[-2] < 0.01 / 1000
