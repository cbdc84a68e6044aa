"""Batches of any structure, streams shared out, targets, schedules and evaluation, decided in
one process (the real processes: tests/test_trainer.py)."""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from dtrain.errors import UsageError
from dtrain.runtime import TensorDictDataset, Trainer, setup
from dtrain.runtime.data import RankShare, batch_size_of, make_loader, tree_map
from dtrain.runtime.evaluation import is_classification
from dtrain.runtime.schedules import lr_factor, warmup_cosine
from dtrain.runtime.trainer import parse_target

Pair = collections.namedtuple("Pair", "x y")


@dataclasses.dataclass
class Batch:
    x: torch.Tensor
    ids: list[int]
    note: str = "kept"


def test_tensors_anywhere_in_a_batch_are_mapped_and_everything_else_kept():
    batch = {"a": (torch.ones(2), [torch.zeros(3, 1)]), "b": Batch(torch.ones(4), [7, 8]), "c": Pair(torch.ones(5), "s")}
    shapes = tree_map(lambda t: tuple(t.shape), batch)
    assert shapes == {"a": ((2,), [(3, 1)]), "b": Batch((4,), [7, 8]), "c": Pair((5,), "s")}
    assert type(shapes["c"]) is Pair and type(shapes["a"][1]) is list
    assert batch_size_of(batch) == 2 and batch_size_of(Batch(torch.ones(6, 2), [])) == 6


def test_dict_datasets_take_the_in_memory_path_and_give_the_same_samples_as_pairs():
    x, y = torch.randn(21, 3), torch.arange(21)
    kwargs = dict(rank=1, world_size=2, device=torch.device("cpu"), shuffle=True, seed=4, train=True)
    pairs, dicts = make_loader(TensorDataset(x, y), 4, **kwargs), make_loader(TensorDictDataset(x=x, y=y), 4, **kwargs)
    pairs.set_epoch(2)
    dicts.set_epoch(2)
    for (px, py), d in zip(pairs, dicts, strict=True):
        assert torch.equal(px, d["x"]) and torch.equal(py, d["y"])


class Count(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


@pytest.mark.parametrize("n, world", [(10, 3), (9, 3), (2, 3), (7, 1)])
def test_a_stream_is_shared_out_in_whole_rounds_for_training_and_whole_for_evaluation(n, world):
    training = [list(RankShare(Count(n), rank, world, whole_rounds=True)) for rank in range(world)]
    assert len({len(share) for share in training}) == 1  # every rank as many: as many steps
    assert sorted(sum(training, [])) == list(range(n - n % world))
    evaluation = [list(RankShare(Count(n), rank, world, whole_rounds=False)) for rank in range(world)]
    assert sorted(sum(evaluation, [])) == list(range(n))


@pytest.mark.parametrize("text, parsed", [("eval/accuracy>=0.99", ("eval/accuracy", ">=", 0.99)),
                                          (" eval/loss <= 1e-2 ", ("eval/loss", "<=", 0.01))])
def test_targets(text, parsed):
    assert parse_target(text) == parsed


@pytest.mark.parametrize("text", ["eval/accuracy>0.99", "0.99", "eval/accuracy>=high"])
def test_a_target_that_is_not_one_is_refused(text):
    with pytest.raises(UsageError, match="is not a target"):
        parse_target(text)


def test_warmup_then_cosine():
    model = nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=12, min_ratio=0.1)
    seen = []
    for _ in range(14):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert seen[8] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert seen[12:] == pytest.approx([0.05, 0.05]) and seen == [0.5 * lr_factor(s, 4, 12) for s in range(14)]


def test_what_counts_as_a_classifier():
    assert is_classification(torch.randn(4, 3), torch.tensor([0, 2, 1, 1]))
    assert not is_classification(torch.randn(4, 1), torch.randn(4, 1))  # regression
    assert not is_classification(torch.randn(4, 5, 3), torch.zeros(4, 5, dtype=torch.long))  # per-token


@pytest.fixture
def ctx(monkeypatch, tmp_path):
    for key, value in {"DTRAIN_DEVICE": "cpu", "DTRAIN_RUN_DIR": str(tmp_path), "DTRAIN_WANDB": "disabled"}.items():
        monkeypatch.setenv(key, value)
    context = setup()
    yield context
    context.close()


def test_evaluation_of_a_regression_gives_the_exact_mean_loss_and_derived_metrics(ctx):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(23, 3), torch.randn(23, 1)
    trainer = Trainer(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), eval_batch_size=5,
                      metrics={"rmse": lambda result: math.sqrt(result["loss"])})
    result = trainer.evaluate(TensorDataset(x, y))
    with torch.no_grad():
        expected = (model(x) - y).pow(2).mean().item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6) and result["rmse"] == pytest.approx(math.sqrt(expected))
    assert "accuracy" not in result and trainer.evaluation_text(result).startswith(" | Eval Loss: ")
    rng = torch.get_rng_state()
    trainer.evaluate(TensorDataset(x, y))
    assert torch.equal(rng, torch.get_rng_state())  # evaluation leaves the random numbers alone


def test_a_loss_fn_needs_pairs_and_says_how_to_take_other_batches(ctx):
    model = nn.Linear(3, 1)
    trainer = Trainer(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss())
    with pytest.raises(UsageError, match="pass compute_loss=fn\\(model, batch\\)"):
        trainer.forward({"x": torch.ones(2, 3)})
    with pytest.raises(UsageError, match="a loss_fn\\(outputs, targets\\) or a compute_loss"):
        Trainer(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_resumed_run_with_nothing_left_to_train_says_so(monkeypatch, tmp_path, capsys):
    """Running the same command again resumes the finished run: one line says why nothing trains."""
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    for key, value in {"DTRAIN_DEVICE": "cpu", "DTRAIN_RUN_DIR": str(tmp_path), "DTRAIN_WANDB": "disabled",
                       "DTRAIN_CHECKPOINT_EVERY": "2,epoch"}.items():
        monkeypatch.setenv(key, value)

    def run(max_steps: str) -> tuple[int, str]:
        monkeypatch.setenv("DTRAIN_MAX_STEPS", max_steps)
        context = setup()
        model = nn.Linear(3, 1)
        Trainer(context, model, torch.optim.SGD(model.parameters(), lr=0.1), nn.MSELoss(), batch_size=4).fit(
            TensorDataset(x, y), epochs=1)
        context.close()
        return context.steps, capsys.readouterr().out

    assert "nothing left" not in run("2")[1]
    steps, out = run("2")
    assert steps == 2 and "nothing left to train: the run resumed at step 2 and has reached --max-steps 2" in out
    assert "nothing left" not in run("5")[1]  # trains on: the epoch's 3rd batch
    steps, out = run("5")
    assert steps == 3 and "resumed at step 3 and has finished epoch 1 of 1" in out


def test_an_evaluation_limited_to_n_batches_takes_the_first_samples():
    from torch.utils.data import Subset

    from dtrain.runtime.data import head

    tensors = head(TensorDataset(torch.arange(10.0), torch.arange(10)), 4)
    assert isinstance(tensors, TensorDataset) and tensors.tensors[1].tolist() == [0, 1, 2, 3]  # the in-memory path
    samples = head(list(range(10)), 20)
    assert isinstance(samples, Subset) and list(samples) == list(range(10))
    with pytest.raises(UsageError, match="limiting the batches of a stream"):
        head(Count(10), 4)
