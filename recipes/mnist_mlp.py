"""MNIST MLP with a hand-written loop: StepLR, gradient clipping and dtrain's primitives.

Shows the custom-loop style: the loop is yours, dtrain only supplies what changes with the
hardware (device, sharded batches, precision, gradient sync, rank-0 outputs).

    dtrain launch recipes/mnist_mlp.py --cpu --nproc 2 -- --epochs 2
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torchvision import datasets

from dtrain.runtime import TrainState, setup
from dtrain.runtime.evaluation import evaluate_classifier

from mnist_cnn import export_eval, export_inputs, load_mnist  # noqa: F401 (export_*: `dtrain export`'s, as the CNN's)


class MNISTMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def export_model(args: argparse.Namespace) -> MNISTMLP:
    """With the CNN's export_inputs and export_eval: `dtrain export` (docs/deploy.md)."""
    return MNISTMLP()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lr-step", type=int, default=1, help="StepLR: decay the LR every N epochs")
    parser.add_argument("--lr-gamma", type=float, default=0.5)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", "./data"))
    parser.add_argument("--limit-train-batches", type=int, default=None)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    ctx = setup(config=vars(args))
    train_set, test_set = load_mnist(ctx, args.data_dir, loader="memory")
    model = MNISTMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model, optimizer = ctx.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step, gamma=args.lr_gamma)
    loss_fn = nn.CrossEntropyLoss()
    loader = ctx.loader(train_set, args.batch_size)

    state = ctx.resume(scheduler) or TrainState()  # --resume auto: continue where the run stopped
    step = state.step
    for epoch in range(state.epoch, args.epochs):
        batch = state.batch if epoch == state.epoch else 0
        loader.set_epoch(epoch, start_batch=batch)
        last = batch + len(loader) if args.limit_train_batches is None else min(args.limit_train_batches,
                                                                               batch + len(loader))
        model.train()
        batches = iter(loader)
        ctx.restore_rng()  # once the iterator exists: a resumed run draws the same random numbers
        while batch < last and not (ctx.max_steps and step >= ctx.max_steps):
            x, y = next(batches)
            with ctx.accumulate(last=batch + 1 == last):  # --grad-accum N: N micro-batches per step
                with ctx.autocast():
                    loss = loss_fn(model(x), y)
                ctx.backward(loss)
            batch += 1
            if not ctx.sync_gradients:
                continue
            grad_norm = ctx.clip_grad_norm(args.clip)
            ctx.step()
            step += 1
            if step % args.log_every == 0:
                ctx.log(step, {"train/loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0]})
            preempted = ctx.preempted(step)  # e.g. SLURM's pre-timeout signal: checkpoint, requeue, exit
            if preempted or ctx.checkpoint_due(step):
                ctx.save_checkpoint(TrainState(step, epoch, batch, batch_size=args.batch_size), scheduler)
            if preempted:
                ctx.stop_for_preemption(step)
        if batch < last:  # --max-steps ended training mid-epoch: keep the position for a resume
            if ctx.checkpointing:
                ctx.save_checkpoint(TrainState(step, epoch, batch, batch_size=args.batch_size), scheduler)
            break
        scheduler.step()
        result = evaluate_classifier(ctx, model, test_set, loss_fn, class_names=datasets.MNIST.classes)
        ctx.log_evaluation(step, epoch + 1, result)  # eval/epoch_NNN.json: report and confusion matrix
        ctx.log(step, {"epoch": epoch + 1, "eval/accuracy": result["accuracy"], "lr": scheduler.get_last_lr()[0]},
                kind="epoch")
        ctx.print(f"Epoch {epoch + 1}/{args.epochs} | LR: {scheduler.get_last_lr()[0]:.2e} "
                  f"| Test Acc: {100 * result['accuracy']:.2f}%")
        if ctx.checkpoint_due(step, epoch_end=True):
            ctx.save_checkpoint(TrainState(step, epoch + 1, 0, batch_size=args.batch_size), scheduler)
    ctx.save_model(model)
    ctx.close()


if __name__ == "__main__":
    main()
