"""Gradient accumulation's state in a Context of one process: which micro-batch synchronises and
steps, that `step()` waits for the window, and that the window's gradients are its mean."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtrain.errors import UsageError
from dtrain.runtime import setup


@pytest.fixture
def accumulating(monkeypatch, tmp_path):
    for key, value in {"DTRAIN_DEVICE": "cpu", "DTRAIN_RUN_DIR": str(tmp_path), "DTRAIN_GRAD_ACCUM": "4",
                       "DTRAIN_WANDB": "disabled", "DTRAIN_CHECKPOINT_EVERY": "never"}.items():
        monkeypatch.setenv(key, value)
    ctx = setup()
    yield ctx
    ctx.close()


def test_a_window_of_four_synchronises_and_steps_on_its_last_micro_batch_only(accumulating):
    ctx = accumulating
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    reference = nn.Linear(3, 1, bias=False)
    reference.load_state_dict(model.state_dict())
    model, optimizer = ctx.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    syncs, weights = [], []
    for i in range(6):  # a whole window of 4, then an epoch's end after 2 (`last`)
        with ctx.accumulate(last=i == 5):
            ctx.backward(nn.functional.mse_loss(model(x[i:i + 1]), y[i:i + 1]))
        syncs.append(ctx.sync_gradients)
        ctx.step()
        weights.append(model.weight.detach().clone())
    assert syncs == [False, False, False, True, False, True]
    assert torch.equal(weights[0], weights[2]) and not torch.equal(weights[2], weights[3])

    nn.functional.mse_loss(reference(x[:4]), y[:4]).backward()  # the mean over the window's 4 samples
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert torch.allclose(weights[3], reference.weight, atol=1e-7)


def test_a_loop_without_accumulate_is_told_how_to_fix_it(accumulating):
    ctx = accumulating
    model, _ = ctx.prepare(nn.Linear(3, 1), torch.optim.SGD(nn.Linear(3, 1).parameters(), lr=0.1))
    ctx.backward(model(torch.randn(2, 3)).sum())
    with pytest.raises(UsageError, match="wraps each micro-batch in `with ctx.accumulate"):
        ctx.step()
