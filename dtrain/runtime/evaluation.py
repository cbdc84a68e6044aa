"""Classification metrics gathered across ranks: every test sample counted exactly once."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain.runtime.context import Context


@torch.no_grad()
def evaluate_classifier(ctx: Context, model: nn.Module, dataset: Dataset,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        batch_size: int = 1000) -> dict[str, float]:
    """Mean loss and accuracy (0..1) of `model` over all of `dataset`, split across the ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, count
    for x, y in ctx.loader(dataset, batch_size, shuffle=False, train=False):
        with ctx.autocast():
            logits = model(x)
        totals[0] += loss_fn(logits.float(), y).double() * len(y)
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += len(y)
    loss_sum, correct, count = ctx.all_reduce(totals).tolist()
    model.train(was_training)
    return {"loss": loss_sum / count, "accuracy": correct / count}
