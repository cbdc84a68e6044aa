"""`Trainer`: the standard loop (train an epoch, evaluate, report, checkpoint) on `Context`'s primitives."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain.metrics import EPOCH, STARTUP
from dtrain.runtime.checkpoint import TrainState
from dtrain.runtime.context import Context
from dtrain.runtime.evaluation import evaluate_classifier


class Trainer:
    def __init__(self, ctx: Context, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, scheduler=None,
                 batch_size: int = 64, eval_batch_size: int | None = None, log_every: int = 50,
                 blocks: Sequence[type | str] = ()):
        self.ctx = ctx
        self.model, self.optimizer = ctx.prepare(model, optimizer, blocks=blocks, batch_size=batch_size)
        self.scheduler = scheduler  # stepped once per epoch
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        # Default: the training batch size, which surely fits; on CPU, larger batches fall out of cache
        # (10,000 MNIST samples: 3.3 s in batches of 1000, 1.3 s in batches of 64; bench/RESULTS.md).
        self.eval_batch_size = eval_batch_size or batch_size
        self.log_every = log_every
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.startup_pending = ctx.env.launch_time is not None  # logged once, at this process's first step

    def fit(self, train_set: Dataset, eval_set: Dataset | None = None, *, epochs: int,
            limit_train_batches: int | None = None) -> dict[str, float]:
        """Train for `epochs` (resuming per --resume), evaluating after each; one line per epoch on rank 0."""
        self.epochs = epochs
        loader = self.ctx.loader(train_set, self.batch_size, shuffle=True, train=True)
        state = self.ctx.resume(self.scheduler)
        start_epoch, start_batch = 0, 0
        if state is not None:
            self.step = state.step
            start_epoch, start_batch = state.epoch, state.batch_on(self.ctx.world_size, self.batch_size)
        for epoch in range(start_epoch, epochs):
            if self.stopped:
                break
            loader.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            done, complete, train_loss = self.train_epoch(loader, epoch, limit_train_batches)
            self.metrics = {"epoch": epoch + 1, "train/epoch_loss": train_loss}
            line = f"Epoch {epoch + 1}/{epochs} | Train Loss: {train_loss:.4f}"
            if eval_set is not None:
                result = self.evaluate(eval_set)
                self.metrics.update({f"eval/{k}": v for k, v in self.evaluation_metrics(result).items()})
                line += self.evaluation_text(result)
                if "report" in result:
                    self.ctx.log_evaluation(self.step, epoch + 1, result)
            self.ctx.log(self.step, self.metrics, kind=EPOCH)
            if self.ctx.progress is not None:
                self.ctx.progress.clear()
            self.ctx.print(line)
            if complete and self.scheduler is not None:
                self.scheduler.step()
            due = self.ctx.checkpoint_due(self.step, epoch_end=True) or self.ctx.checkpoint_due(self.step)
            if self.ctx.checkpointing and (due or self.stopped):
                self.save_checkpoint(*((epoch + 1, 0) if complete else (epoch, done)))
        return self.metrics

    @property
    def stopped(self) -> bool:
        return self.ctx.max_steps is not None and self.step >= self.ctx.max_steps

    def train_epoch(self, loader, epoch: int, limit_batches: int | None = None) -> tuple[int, bool, float]:
        """Train on the rest of this rank's shard for `epoch`.

        Returns the batches of the epoch now done (counting those before a resume), whether the
        epoch is complete, and the mean loss over all ranks of the batches run here.
        """
        self.model.train()
        start = loader.start_batch
        end = start + len(loader) if limit_batches is None else min(limit_batches, start + len(loader))
        loss_sum = torch.zeros((), device=self.ctx.device)
        window_sum = torch.zeros((), device=self.ctx.device)
        window_start, window_batches, done = time.perf_counter(), 0, start
        batch_iter = iter(loader)
        self.ctx.restore_rng()
        while done < end and not self.stopped:  # checked before fetching: a fetch may draw random numbers
            x, y = next(batch_iter)
            with self.ctx.accumulate(last=done + 1 == end):
                with self.ctx.autocast():
                    loss = self.loss_fn(self.model(x), y)
                self.ctx.backward(loss)
            loss_sum += loss.detach()
            window_sum += loss.detach()
            done += 1
            window_batches += 1
            if not self.ctx.sync_gradients:
                continue
            logging_step = (self.step + 1) % self.log_every == 0
            grad_norm = self.ctx.step(measure_grad_norm=logging_step)
            self.step += 1
            if self.startup_pending:
                self.startup_pending = False
                self.ctx.log(self.step, {"startup_s": time.time() - self.ctx.env.launch_time}, kind=STARTUP)
            if logging_step and self.ctx.is_main:  # the loop's only host synchronisation, every log_every steps
                elapsed = time.perf_counter() - window_start
                window_loss = (window_sum / window_batches).item()
                samples_per_s = window_batches * len(x) * self.ctx.world_size / elapsed
                self.ctx.log(self.step, {
                    "train/loss": window_loss,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "samples_per_s": samples_per_s,
                    "step_time_s": elapsed / window_batches * self.ctx.env.grad_accum,
                })
                self.ctx.progress.update(epoch + 1, self.epochs, done, end, self.step, window_loss, samples_per_s)
            if logging_step:
                window_sum.zero_()
                window_start, window_batches = time.perf_counter(), 0
            if done < end and self.ctx.preempted(self.step):
                self.save_checkpoint(epoch, done)
                self.ctx.stop_for_preemption(self.step)
            if done < end and self.ctx.checkpoint_due(self.step):
                self.save_checkpoint(epoch, done)
        totals = self.ctx.all_reduce(torch.stack([loss_sum, torch.tensor(float(done - start), device=loss_sum.device)]))
        return done, done >= end, (totals[0] / totals[1].clamp(min=1)).item()

    def save_checkpoint(self, epoch: int, batch: int) -> None:
        """Checkpoint with the data position: the next batch to train is `batch` of `epoch`."""
        state = TrainState(step=self.step, epoch=epoch, batch=batch, batch_size=self.batch_size)
        self.ctx.save_checkpoint(state, self.scheduler, self.metrics)

    # Evaluation: a classifier's by default; a recipe for another kind of model overrides these three.

    def evaluate(self, eval_set: Dataset) -> dict[str, Any]:
        """Loss, accuracy, per-class report and confusion matrix over the whole `eval_set`, each
        sample counted once across ranks (a "report" key also goes to eval/epoch_NNN.json)."""
        return evaluate_classifier(self.ctx, self.model, eval_set, self.loss_fn, self.eval_batch_size)

    def evaluation_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        """The scalars logged as eval/<name>."""
        return {"loss": result["loss"], "accuracy": result["accuracy"], "macro_f1": result["report"]["macro_avg"]["f1"]}

    def evaluation_text(self, result: dict[str, Any]) -> str:
        """The evaluation's part of the epoch line."""
        return f" | Test Acc: {100 * result['accuracy']:.2f}%"

    def save_model(self, path=None):
        return self.ctx.save_model(self.model, path)
