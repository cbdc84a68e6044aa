"""Evaluation over all ranks, each sample counted once: the exact mean loss, the user's metrics,
and for a classifier the confusion matrix and the classification report.

The ranks' shards may differ by a batch (an evaluation set is not padded); every rank still runs
as many forward passes, because a sharded model's forward is a collective: a rank that has run
out repeats a batch of its own and discards the result. The loss and the confusion matrix are
summed over ranks in float64 with one all-reduce; metric objects (torchmetrics) gather their
state themselves in `compute()`; everything else, the report users know from scikit-learn
included, is computed from those sums (`dtrain.outputs.report`, which needs no torch). Evaluating leaves
the random number generators as it found them: when and how often a run evaluates does not
change its training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from dtrain.errors import UsageError
from dtrain.outputs.report import classification_report
from dtrain.runtime.checkpoint import rng_unchanged
from dtrain.runtime.context import Context
from dtrain.runtime.data import batch_size_of

# A forward pass of evaluation: batch -> (mean loss over the batch, outputs, targets or None).
Forward = Callable[[Any], tuple[torch.Tensor, Any, Any]]


def is_classification(outputs: Any, targets: Any) -> bool:
    """Class scores (N, C) against integer labels (N): what a confusion matrix is made of."""
    return (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor) and outputs.dim() == 2
            and outputs.is_floating_point() and targets.dim() == 1 and not targets.is_floating_point()
            and len(targets) == len(outputs))


@torch.no_grad()
@rng_unchanged()
def evaluate(ctx: Context, model: nn.Module, dataset: Dataset, forward: Forward, *, batch_size: int,
             metrics: Mapping[str, Any] | None = None, classification: bool | None = None,
             collate_fn: Callable | None = None, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """`loss` (the mean over every sample of the set), each metric's value by name, and, for a
    classifier (`classification`, or by default: outputs that are class scores of integer labels),
    `accuracy`, `confusion_matrix` and `report` (its classes under `class_names`).

    `metrics` holds objects with `update(outputs, targets)`, `compute()` and `reset()` that gather
    their state across ranks in `compute()` as torchmetrics' do, or functions of the evaluation's
    other results (say perplexity: `lambda result: math.exp(result["loss"])`).
    """
    metrics = dict(metrics or {})
    objects = {name: m for name, m in metrics.items() if hasattr(m, "update")}
    for metric in objects.values():
        metric.reset()
        if isinstance(metric, nn.Module):  # torchmetrics' metrics are: their state goes where the outputs are
            metric.to(ctx.device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    matrix: torch.Tensor | None = None
    loader = ctx.loader(dataset, batch_size, shuffle=False, train=False, collate_fn=collate_fn)
    for batch, real in _lockstep(ctx, loader, stream=isinstance(dataset, IterableDataset)):
        with ctx.autocast():
            loss, outputs, targets = forward(batch)
        if classification is None:
            classification = is_classification(outputs, targets)
        if matrix is None and classification:
            classes = outputs.shape[1]
            matrix = torch.zeros(classes * classes, dtype=torch.float64, device=ctx.device)
        if not real:
            continue
        samples = batch_size_of(batch)
        loss_sum += loss.detach().double() * samples
        count += samples
        if matrix is not None:
            matrix += torch.bincount(targets * classes + outputs.argmax(dim=1), minlength=classes * classes)
        for metric in objects.values():
            metric.update(outputs, targets)
    model.train(was_training)
    totals = ctx.all_reduce(torch.cat([loss_sum.reshape(1), count.reshape(1)] + ([matrix] if matrix is not None else [])))
    if not totals[1]:
        raise UsageError("the evaluation set is empty; pass one with samples, or none.")
    result: dict[str, Any] = {"loss": (totals[0] / totals[1]).item()}
    if classification:
        confusion = totals[2:].reshape(classes, classes).long().tolist()
        report = classification_report(confusion, class_names)
        result.update(accuracy=report["accuracy"], confusion_matrix=confusion, report=report)
    for name, metric in metrics.items():
        value = metric.compute() if name in objects else metric(dict(result))
        result[name] = value.item() if isinstance(value, torch.Tensor) else value
    return result


def _lockstep(ctx: Context, loader, stream: bool) -> Iterator[tuple[Any, bool]]:
    """(batch, whether it counts): this rank's batches, then repeats of its first until every rank
    has run as many forward passes as the rank with the most."""
    batches = iter(loader)
    first = next(batches, None)
    if stream:
        yield from _lockstep_stream(ctx, first, batches)
        return
    mine = len(loader)
    most = int(ctx.all_reduce(torch.tensor(mine, device=ctx.device), op=dist.ReduceOp.MAX)) if ctx.world_size > 1 \
        else mine
    if first is None and most:
        raise UsageError(f"rank {ctx.rank} has no sample of the evaluation set ({ctx.world_size} ranks share "
                         "it); evaluate a set with at least as many samples as ranks.")
    if first is not None:
        yield first, True
        yield from ((batch, True) for batch in batches)
    for _ in range(most - mine):
        yield first, False


def _lockstep_stream(ctx: Context, first: Any, batches: Iterator[Any]) -> Iterator[tuple[Any, bool]]:
    """The same for a stream, whose length is unknown: one all-reduce per batch says whether any
    rank still has one."""
    spare, batch = first, first
    while True:
        going = ctx.all_reduce(torch.tensor(batch is not None, device=ctx.device, dtype=torch.int32),
                               op=dist.ReduceOp.MAX)
        if not going:
            return
        if spare is None:
            raise UsageError(f"rank {ctx.rank} has no sample of the evaluation stream; evaluate a stream with at "
                             "least as many elements as ranks.")
        yield (batch, True) if batch is not None else (spare, False)
        batch = next(batches, None)


def evaluate_classifier(ctx: Context, model: nn.Module, dataset: Dataset,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        batch_size: int = 1000, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Loss, accuracy (0..1), the confusion matrix and the per-class report of a classifier over
    all of `dataset` of (inputs, labels) pairs."""

    def forward(batch):
        inputs, targets = batch
        outputs = model(inputs)
        return loss_fn(outputs.float(), targets), outputs, targets

    return evaluate(ctx, model, dataset, forward, batch_size=batch_size, classification=True, class_names=class_names)
