"""`Trainer`: the standard loop (train an epoch, evaluate, report) on top of `Context`'s primitives."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain.runtime.context import Context
from dtrain.runtime.evaluation import evaluate_classifier


class Trainer:
    def __init__(self, ctx: Context, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, batch_size: int = 64,
                 eval_batch_size: int = 1000, log_every: int = 50):
        self.ctx = ctx
        self.model, self.optimizer = ctx.prepare(model, optimizer)
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.log_every = log_every
        self.step = 0

    def fit(self, train_set: Dataset, eval_set: Dataset | None = None, *, epochs: int,
            limit_train_batches: int | None = None) -> dict[str, float]:
        """Train for `epochs`, evaluating after each; prints one line per epoch on rank 0."""
        loader = self.ctx.loader(train_set, self.batch_size, shuffle=True, train=True)
        metrics: dict[str, float] = {}
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            train_loss = self.train_epoch(loader, limit_train_batches)
            metrics = {"epoch": epoch + 1, "train/loss": train_loss}
            line = f"Epoch {epoch + 1}/{epochs} | Train Loss: {train_loss:.4f}"
            if eval_set is not None:
                result = self.evaluate(eval_set)
                metrics.update({"eval/loss": result["loss"], "eval/accuracy": result["accuracy"]})
                line += f" | Test Acc: {100 * result['accuracy']:.2f}%"
            self.ctx.log(self.step, metrics)
            self.ctx.print(line)
            if self.stopped:
                break
        return metrics

    @property
    def stopped(self) -> bool:
        return self.ctx.max_steps is not None and self.step >= self.ctx.max_steps

    def train_epoch(self, loader, limit_batches: int | None = None) -> float:
        """One pass over this rank's shard; returns the mean loss over all ranks."""
        self.model.train()
        batches = len(loader) if limit_batches is None else min(limit_batches, len(loader))
        loss_sum = torch.zeros((), device=self.ctx.device)
        window_sum = torch.zeros((), device=self.ctx.device)
        window_start, window_steps, done = time.perf_counter(), 0, 0
        batch_iter = iter(loader)
        while done < batches and not self.stopped:
            x, y = next(batch_iter)
            with self.ctx.autocast():
                loss = self.loss_fn(self.model(x), y)
            self.ctx.backward(loss)
            self.ctx.step()
            loss_sum += loss.detach()
            window_sum += loss.detach()
            done += 1
            self.step += 1
            window_steps += 1
            if self.step % self.log_every == 0:
                elapsed = time.perf_counter() - window_start
                self.ctx.log(self.step, {
                    "train/loss": window_sum / window_steps,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "samples_per_s": window_steps * len(x) * self.ctx.world_size / elapsed,
                })
                window_sum.zero_()
                window_start, window_steps = time.perf_counter(), 0
        mean = self.ctx.all_reduce(torch.stack([loss_sum, torch.tensor(float(done), device=loss_sum.device)]))
        return (mean[0] / mean[1].clamp(min=1)).item()

    def evaluate(self, eval_set: Dataset) -> dict[str, float]:
        """Loss and accuracy over the whole `eval_set`, each sample counted once across ranks."""
        return evaluate_classifier(self.ctx, self.model, eval_set, self.loss_fn, self.eval_batch_size)

    def save_model(self, path=None):
        return self.ctx.save_model(self.model, path)
