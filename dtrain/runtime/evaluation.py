"""Classification metrics gathered across ranks: every test sample counted exactly once.

The ranks sum one confusion matrix (plus the loss) with a single all-reduce; everything else,
the classification report users know from scikit-learn included, is computed from it
(`dtrain.report`, which needs no torch).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain.report import classification_report
from dtrain.runtime.context import Context


@torch.no_grad()
def evaluate_classifier(ctx: Context, model: nn.Module, dataset: Dataset,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        batch_size: int = 1000, num_classes: int | None = None) -> dict[str, Any]:
    """Loss, accuracy (0..1), the confusion matrix and the per-class report of `model` over all of `dataset`.

    `num_classes` defaults to the model's output width.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    matrix = None
    for x, y in ctx.loader(dataset, batch_size, shuffle=False, train=False):
        with ctx.autocast():
            logits = model(x)
        if matrix is None:
            classes = num_classes or logits.shape[1]
            matrix = torch.zeros(classes * classes, dtype=torch.float64, device=ctx.device)
        loss_sum += loss_fn(logits.float(), y).double() * len(y)
        matrix += torch.bincount(y * classes + logits.argmax(dim=1), minlength=classes * classes)
    if matrix is None:  # this rank's shard is empty; the others still need its (zero) share
        classes = num_classes or _output_width(model)
        matrix = torch.zeros(classes * classes, dtype=torch.float64, device=ctx.device)
    totals = ctx.all_reduce(torch.cat([loss_sum.reshape(1), matrix]))
    model.train(was_training)
    confusion = totals[1:].reshape(classes, classes).long().tolist()
    report = classification_report(confusion)
    count = report["support"]
    return {"loss": totals[0].item() / count, "accuracy": report["accuracy"], "confusion_matrix": confusion,
            "report": report}


def _output_width(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features
