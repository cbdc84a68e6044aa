"""What rank-0 logging costs the training loop, on this machine.

    python bench/logging_overhead.py [--steps 200] [--rounds 16]

One process trains the MNIST CNN recipe's model with `Trainer.train_epoch` on 1 CPU process, in
`--rounds` pairs of runs of `--steps` steps, each run with a Context of its own: one logging every
step (metrics.jsonl, a W&B offline run, gradient norm, samples/s, the host sync that reading them
needs), one with W&B disabled and no logging step. Pairs alternate which runs first (ABBA):
on this machine the first of a pair is often faster or slower by several percent. It prints the
median steps/s of both settings and the median and quartiles of the per-pair differences.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

NEVER = 10**9  # log_every that never comes


def make_trainer(wandb: str, log_every: int, data_dir: str):
    """A fresh Context (world of one, CPU) with the recipe's model, optimizer and in-memory data."""
    from torch import nn

    from dtrain.runtime import Trainer, setup
    from mnist_cnn import build, load_mnist, parse_args

    os.environ.update({"DTRAIN_RUN_DIR": tempfile.mkdtemp(prefix="dtrain-bench-log-"), "DTRAIN_WANDB": wandb,
                       "DTRAIN_DEVICE": "cpu", "DTRAIN_CHECKPOINT_EVERY": "never", "WANDB_SILENT": "true"})
    ctx = setup()
    train_set, _ = load_mnist(ctx, data_dir, loader="memory")
    model, optimizer = build(parse_args([]))  # the recipe's defaults
    trainer = Trainer(ctx, model, optimizer, nn.CrossEntropyLoss(), log_every=log_every)
    trainer.epochs = 1
    loader = ctx.loader(train_set, 64)
    steps_per_s(trainer, loader, 0, 20)  # warm-up
    return ctx, trainer, loader


def steps_per_s(trainer, loader, epoch: int, steps: int) -> float:
    loader.set_epoch(epoch)
    start = time.perf_counter()
    trainer.train_epoch(loader, epoch, limit_batches=steps)
    return steps / (time.perf_counter() - start)


def fresh_run(steps: int, log_every: int, wandb: str, data_dir: str) -> float:
    ctx, trainer, loader = make_trainer(wandb, log_every, data_dir)
    result = steps_per_s(trainer, loader, 1, steps)
    ctx.close()
    return result


def rounds(args) -> list[tuple[float, float]]:
    """(every step, never) steps/s for each round; even rounds run "every step" first, odd ones "never"."""
    pairs = []
    for round_ in range(args.rounds):
        settings = [(1, "offline"), (NEVER, "disabled")]
        if round_ % 2:
            settings.reverse()
        result = {log_every: fresh_run(args.steps, log_every, wandb, args.data_dir) for log_every, wandb in settings}
        pairs.append((result[1], result[NEVER]))
        report_pair(f"round {round_ + 1}", pairs[-1])
    return pairs


def report_pair(label: str, pair: tuple[float, float]) -> None:
    every, never = pair
    print(f"{label}: every step {every:.1f} steps/s, never {never:.1f} steps/s, "
          f"difference {100 * (never - every) / never:+.1f}%", flush=True)


def summary(pairs: list[tuple[float, float]]) -> str:
    every, never = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    differences = sorted(100 * (n - e) / n for e, n in pairs)
    quartiles = statistics.quantiles(differences, n=4)
    return (f"logging every step {every:.1f} steps/s, never {never:.1f} steps/s; per-pair difference "
            f"median {statistics.median(differences):+.1f}% (quartiles {quartiles[0]:+.1f}%, {quartiles[2]:+.1f}%; "
            f"{len(pairs)} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per fresh run")
    parser.add_argument("--rounds", type=int, default=16, help="pairs of runs")
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    print(summary(rounds(args)))


if __name__ == "__main__":
    main()
