"""`Trainer`: the standard loop (train an epoch, evaluate, report, checkpoint) on `Context`'s primitives.

Any model: the loss is `loss_fn(model(inputs), targets)` for `(inputs, targets)` batches, or the
recipe's `compute_loss(model, batch)` for a batch of any structure. Evaluation gives the exact
mean loss, the recipe's metrics, and for a classifier its report (`dtrain.runtime.evaluation`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain.core.metrics import EPOCH, EVAL, STARTUP, TARGET
from dtrain.errors import UsageError
from dtrain.runtime.checkpoint import TrainState
from dtrain.runtime.context import Context
from dtrain.runtime.data import batch_size_of, head
from dtrain.runtime.evaluation import evaluate

SCHEDULER_INTERVALS = ("epoch", "step")
_TARGET = re.compile(r"^\s*([\w/.-]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


def parse_target(text: str) -> tuple[str, str, float]:
    """`eval/accuracy>=0.99` -> ("eval/accuracy", ">=", 0.99): stop at the first evaluation that reaches it."""
    match = _TARGET.match(text)
    if not match:
        raise UsageError(f"stop_at {text!r} is not a target; write it as a logged name, >= or <=, and a number, "
                         "as in eval/accuracy>=0.99 or eval/loss<=0.05.")
    return match.group(1), match.group(2), float(match.group(3))


class Trainer:
    """The standard loop around one model and optimizer.

    - `loss_fn(outputs, targets)` for `(inputs, targets)` batches, or `compute_loss(model, batch)`
      for any batch; it returns the loss, or `(loss, outputs)`, or `(loss, outputs, targets)`
      (the outputs and targets that evaluation's metrics take; by default a pair's second item or a
      mapping's "labels").
    - `scheduler` is stepped after every optimizer step (`scheduler_interval="step"`) or after
      every complete epoch ("epoch", the default).
    - `clip_grad_norm`: clip the gradients to this total norm before each step (under every strategy;
      the norm logged as grad_norm is then the one measured before clipping).
    - `metrics`: named objects with `update(outputs, targets)`, `compute()`, `reset()` that gather
      across ranks in `compute()` (torchmetrics' do), or functions of the evaluation's result
      (`lambda result: math.exp(result["loss"])`). Logged as `eval/<name>`.
    - `eval_every`: evaluate every N optimizer steps too, not only at each epoch's end.
    - `stop_at`: stop at the first evaluation that reaches a target, e.g. "eval/accuracy>=0.99";
      a `target` row of metrics.jsonl records when and how long it took.
    - `callbacks`: objects with `after_step(trainer)` and/or `after_evaluation(trainer, result)`
      methods, called on every rank (collectives are allowed), after each optimizer step and after
      each evaluation; `trainer.step` is the number of optimizer steps done.
    """

    def __init__(self, ctx: Context, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, *,
                 compute_loss: Callable[[nn.Module, Any], Any] | None = None, scheduler=None,
                 scheduler_interval: str = "epoch", clip_grad_norm: float | None = None, metrics: Mapping[str, Any] | None = None,
                 eval_every: int | None = None, stop_at: str | None = None, callbacks: Sequence[Any] = (),
                 batch_size: int = 64, eval_batch_size: int | None = None, log_every: int = 50,
                 blocks: Sequence[type | str] = (), collate_fn: Callable | None = None,
                 class_names: Sequence[str] | None = None):
        if (loss_fn is None) == (compute_loss is None):
            raise UsageError("Trainer takes a loss_fn(outputs, targets) or a compute_loss(model, batch), one of them.")
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise UsageError(f"scheduler_interval is 'epoch' or 'step', not {scheduler_interval!r}.")
        if eval_every is not None and eval_every < 1:
            raise UsageError(f"eval_every counts optimizer steps and must be at least 1, got {eval_every}.")
        self.ctx = ctx
        self.model, self.optimizer = ctx.prepare(model, optimizer, blocks=blocks, batch_size=batch_size)
        self.loss_fn, self.compute_loss = loss_fn, compute_loss
        self.scheduler, self.scheduler_interval = scheduler, scheduler_interval
        self.clip = clip_grad_norm
        self.eval_metrics = dict(metrics or {})
        self.eval_every = eval_every
        self.target = parse_target(stop_at) if stop_at else None
        self.callbacks = list(callbacks)
        self.batch_size = batch_size
        # Default: the training batch size, which surely fits; on CPU, larger batches fall out of cache
        # (10,000 MNIST samples: 3.3 s in batches of 1000, 1.3 s in batches of 64; bench/RESULTS.md).
        self.eval_batch_size = eval_batch_size or batch_size
        self.collate_fn = collate_fn
        self.class_names = class_names
        self.log_every = ctx.log_every = log_every
        self.epoch = 0
        self.metrics: dict[str, float] = {}
        self.reached: dict[str, float] | None = None  # the evaluation that reached `stop_at`
        self.launched_at = ctx.env.launch_time  # startup_s is logged once, at this process's first step

    def fit(self, train_set: Dataset, eval_set: Dataset | None = None, *, epochs: int,
            limit_train_batches: int | None = None, limit_eval_batches: int | None = None) -> dict[str, float]:
        """Train for `epochs` (resuming per --resume), evaluating after each; one line per epoch on rank 0.
        `limit_train_batches` and `limit_eval_batches`: at most that many batches per process (smoke runs)."""
        if eval_set is not None and limit_eval_batches is not None:
            eval_set = head(eval_set, limit_eval_batches * self.eval_batch_size * self.ctx.world_size)
        self.epochs, self.eval_set, self.fit_started = epochs, eval_set, time.time()
        self.last_evaluation: tuple[int, dict[str, Any]] | None = None
        loader = self.ctx.loader(train_set, self.batch_size, shuffle=True, train=True, collate_fn=self.collate_fn)
        state = self.ctx.resume(self.scheduler)
        start_epoch, start_batch = 0, 0
        if state is not None:
            start_epoch, start_batch = state.epoch, state.batch_on(self.ctx.world_size, self.batch_size)
            if self.stopped or start_epoch >= epochs:
                why = f"has reached --max-steps {self.ctx.max_steps}" if self.stopped else f"has finished epoch {epochs} of {epochs}"
                self.ctx.print(f"dtrain: nothing left to train: the run resumed at step {self.step} and {why}; "
                               "give a higher limit to train on, or another --name to start a new run.")
        for epoch in range(start_epoch, epochs):
            if self.stopped:
                break
            self.epoch = epoch
            loader.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
            done, complete, train_loss = self.train_epoch(loader, epoch, limit_train_batches)
            self.metrics = {"epoch": epoch + 1, "train/epoch_loss": train_loss}
            line = f"Epoch {epoch + 1}/{epochs} | Train Loss: {train_loss:.4f}"
            if eval_set is not None:
                result = self._evaluation_now(eval_set)
                self.metrics.update({f"eval/{k}": v for k, v in self.evaluation_metrics(result).items()})
                line += self.evaluation_text(result)
                if "report" in result:
                    self.ctx.log_evaluation(self.step, epoch + 1, result)
            self.ctx.log(self.step, self.metrics, kind=EPOCH)
            if self.ctx.progress is not None:
                self.ctx.progress.clear()
            self.ctx.print(line)
            if complete and self.scheduler is not None and self.scheduler_interval == "epoch":
                self.scheduler.step()
            due = self.ctx.checkpoint_due(self.step, epoch_end=True) or self.ctx.checkpoint_due(self.step)
            if self.ctx.checkpointing and (due or self.stopped):
                self.save_checkpoint(*((epoch + 1, 0) if complete else (epoch, done)))
        return self.metrics

    @property
    def step(self) -> int:
        """Optimizer steps taken (`ctx.steps`, restored on resume)."""
        return self.ctx.steps

    @property
    def stopped(self) -> bool:
        """--max-steps reached, or the `stop_at` target."""
        return self.reached is not None or (self.ctx.max_steps is not None and self.step >= self.ctx.max_steps)

    def train_epoch(self, loader, epoch: int, limit_batches: int | None = None) -> tuple[int, bool, float]:
        """Train on the rest of this rank's shard for `epoch`.

        Returns the batches of the epoch now done (counting those before a resume), whether the
        epoch is complete, and the mean loss over all ranks of the batches run here.
        """
        self.model.train()
        start = loader.start_batch
        end = start + len(loader) if hasattr(loader, "__len__") else None  # a stream's length is unknown
        if limit_batches is not None:
            end = limit_batches if end is None else min(limit_batches, end)
        loss_sum = torch.zeros((), device=self.ctx.device)
        window_sum = torch.zeros((), device=self.ctx.device)
        window_start, window_batches, window_samples, done = time.perf_counter(), 0, 0, start
        batches = _with_last(iter(loader), None if end is None else end - start)
        self.ctx.restore_rng()
        while not self.stopped and (end is None or done < end):  # checked before fetching: a fetch may draw random numbers
            item = next(batches, None)
            if item is None:
                break
            batch, last = item
            with self.ctx.accumulate(last=last):
                with self.ctx.autocast():
                    loss = self._loss(batch)
                self.ctx.backward(loss)
            loss_sum += loss.detach()
            window_sum += loss.detach()
            done += 1
            window_batches += 1
            window_samples += batch_size_of(batch)
            if not self.ctx.sync_gradients:
                continue
            logging_step = (self.step + 1) % self.log_every == 0
            clipped = self.ctx.clip_grad_norm(self.clip) if self.clip is not None else None
            before = self.step
            grad_norm = self.ctx.step(measure_grad_norm=logging_step and clipped is None)
            if self.step == before:  # a replica group's step that a failed peer dropped
                continue
            if clipped is not None:
                grad_norm = clipped
            if self.scheduler is not None and self.scheduler_interval == "step":
                self.scheduler.step()
            if self.launched_at is not None:
                self.ctx.log(self.step, {"startup_s": time.time() - self.launched_at}, kind=STARTUP)
                self.launched_at = None
            if logging_step and self.ctx.progress is not None:  # rank 0: the loop's only host synchronisation
                elapsed = time.perf_counter() - window_start
                window_loss = (window_sum / window_batches).item()
                samples_per_s = window_samples * self.ctx.world_size / elapsed
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
                window_start, window_batches, window_samples = time.perf_counter(), 0, 0
            for callback in self.callbacks:
                if hasattr(callback, "after_step"):
                    callback.after_step(self)
            if self.eval_every and self.eval_set is not None and self.step % self.eval_every == 0:
                began = time.perf_counter()
                result = self._evaluation_now(self.eval_set)
                self.ctx.log(self.step, {f"eval/{k}": v for k, v in self.evaluation_metrics(result).items()},
                             kind=EVAL)
                window_start += time.perf_counter() - began  # an interval's samples/s is training's alone
            more = not last and not self.stopped
            if more and self.ctx.preempted(self.step):
                self.save_checkpoint(epoch, done)
                self.ctx.stop_for_preemption(self.step)
            if more and self.ctx.checkpoint_due(self.step):
                self.save_checkpoint(epoch, done)
        totals = self.ctx.all_reduce(torch.stack([loss_sum, torch.tensor(float(done - start), device=loss_sum.device)]))
        complete = end is None and not self.stopped or end is not None and done >= end
        return done, complete, (totals[0] / totals[1].clamp(min=1)).item()

    def _loss(self, batch: Any) -> torch.Tensor:
        return self.forward(batch, evaluation=False)[0]

    def forward(self, batch: Any, evaluation: bool = True) -> tuple[torch.Tensor, Any, Any]:
        """(loss, outputs, targets) of one batch, by `compute_loss` or by `loss_fn`."""
        if self.compute_loss is not None:
            returned = self.compute_loss(self.model, batch)
            loss, outputs, *targets = returned if isinstance(returned, tuple) else (returned, None)
            return loss, outputs, targets[0] if targets else _targets_of(batch)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise UsageError(f"Trainer's loss_fn takes (inputs, targets) batches, and this batch is a "
                             f"{type(batch).__name__}; pass compute_loss=fn(model, batch) for batches of another shape.")
        inputs, targets = batch
        outputs = self.model(inputs)
        scored = outputs.float() if evaluation and isinstance(outputs, torch.Tensor) else outputs
        loss_fn = cast(Callable[[Any, Any], torch.Tensor], self.loss_fn)  # without compute_loss, it is given
        return loss_fn(scored, targets), outputs, targets

    def _evaluation_now(self, eval_set: Dataset) -> dict[str, Any]:
        """This step's evaluation (once per step: an interval's may also end the epoch), with its callbacks
        and the `stop_at` check."""
        if self.last_evaluation is not None and self.last_evaluation[0] == self.step:
            return self.last_evaluation[1]
        result = self.evaluate(eval_set)
        self.last_evaluation = (self.step, result)
        for callback in self.callbacks:
            if hasattr(callback, "after_evaluation"):
                callback.after_evaluation(self, result)
        if self.target is not None and self.reached is None:
            name, op, goal = self.target
            value = {f"eval/{k}": v for k, v in self.evaluation_metrics(result).items()}.get(name)
            if value is None:
                raise UsageError(f"stop_at names {name}, which evaluation does not log; it logs "
                                 f"{', '.join(f'eval/{k}' for k in self.evaluation_metrics(result))}.")
            if value >= goal if op == ">=" else value <= goal:
                self.reached = {name: value}
                row = {"stop_at": f"{name}{op}{goal:g}", name: value, "time_to_target_s": time.time() - self.fit_started}
                if self.ctx.env.launch_time is not None:
                    row["since_launch_s"] = time.time() - self.ctx.env.launch_time
                self.ctx.log(self.step, row, kind=TARGET)
                self.ctx.print(f"dtrain: {name} = {value:.4g} reached {op} {goal:g} at step {self.step}, "
                               f"{row['time_to_target_s']:.1f} s into training; stopping.")
        return result

    def save_checkpoint(self, epoch: int, batch: int) -> None:
        """Checkpoint with the data position: the next batch to train is `batch` of `epoch`."""
        state = TrainState(step=self.step, epoch=epoch, batch=batch, batch_size=self.batch_size)
        self.ctx.save_checkpoint(state, self.scheduler, self.metrics)

    def evaluate(self, eval_set: Dataset) -> dict[str, Any]:
        """The mean loss over the whole `eval_set`, each sample counted once across ranks, the metrics,
        and for a classifier accuracy, confusion matrix and report (a "report" key also goes to
        eval/epoch_NNN.json)."""
        return evaluate(self.ctx, self.model, eval_set, self.forward, batch_size=self.eval_batch_size,
                        metrics=self.eval_metrics, collate_fn=self.collate_fn, class_names=self.class_names)

    def evaluation_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        """The scalars logged as eval/<name>."""
        scalars = {"loss": result["loss"]}
        if "report" in result:
            scalars.update(accuracy=result["accuracy"], macro_f1=result["report"]["macro_avg"]["f1"])
        scalars.update({name: result[name] for name in self.eval_metrics})
        return scalars

    def evaluation_text(self, result: dict[str, Any]) -> str:
        """The evaluation's part of the epoch line: what was computed."""
        text = f" | Test Acc: {100 * result['accuracy']:.2f}%" if "accuracy" in result else ""
        text += f" | Eval Loss: {result['loss']:.4f}"
        return text + "".join(f" | {name}: {result[name]:.4g}" for name in self.eval_metrics)

    def save_model(self, path=None):
        return self.ctx.save_model(self.model, path)


def _targets_of(batch: Any) -> Any:
    """What a batch's metrics compare against, when compute_loss did not say: a pair's second item,
    a mapping's "labels"."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return batch.get("labels")
    return None


def _with_last(batches, count: int | None):
    """(batch, whether it is the epoch's last); with an unknown count (a stream), one batch is read ahead."""
    if count is not None:
        for index, batch in enumerate(batches):
            yield batch, index == count - 1
        return
    batch = next(batches, None)
    while batch is not None:
        following = next(batches, None)
        yield batch, following is None
        batch = following

