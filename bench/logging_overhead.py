"""What rank-0 logging costs the training loop, on this machine.

    python bench/logging_overhead.py [--steps 150] [--settle 60] [--blocks 20] [--wandb offline]

One process builds two trainers around one model, optimizer and data set of the MNIST CNN recipe
(1 CPU process, batch 64), each with a Context of its own: one logging every step (metrics.jsonl,
a W&B offline run, gradient norm, samples/s, the host sync that reading them needs), one with W&B
disabled and no logging step. They train in alternating blocks (ABBA order), so both settings see
the same machine and the same tensors: on this virtual machine two runs of the same code minutes
apart differ by up to 15%, and trainers with models of their own by up to 6%, while adjacent
blocks seconds apart over the same tensors do not. Each block first trains `--settle` steps
untimed, long enough for the W&B writer (which reads rows once a second) to finish the previous
block's rows and to reach its steady state, then times `--steps` steps. It prints the steps/s of
both settings over all their blocks and the median and quartiles of the per-pair differences.
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


def make_trainers(wandb: str, data_dir: str) -> dict[str, tuple]:
    """Two (Context, Trainer, loader), "every" and "never", around ONE model, optimizer and data set.

    Each with a Context of its own (world of one, CPU): "every" logs every step with W&B `wandb`,
    "never" never logs, with W&B disabled. Sharing the tensors matters: of trainers built one
    after the other with models of their own, one logging less than another was the slower by
    3-6% on this machine (where their memory landed), more than the effect measured here.
    """
    from torch import nn

    from dtrain.runtime import Trainer, setup

    from mnist_cnn import build, load_mnist, parse_args

    model, optimizer = build(parse_args([]))  # the recipe's defaults
    trainers, loader = {}, None
    for name, w, log_every in (("every", wandb, 1), ("never", "disabled", NEVER)):
        os.environ.update({"DTRAIN_RUN_DIR": tempfile.mkdtemp(prefix="dtrain-bench-log-"), "DTRAIN_WANDB": w,
                           "DTRAIN_DEVICE": "cpu", "DTRAIN_CHECKPOINT_EVERY": "never", "WANDB_SILENT": "true"})
        ctx = setup()
        if loader is None:
            train_set, _ = load_mnist(ctx, data_dir, loader="memory")
            loader = ctx.loader(train_set, 64)
        trainer = Trainer(ctx, model, optimizer, nn.CrossEntropyLoss(), log_every=log_every)
        trainer.epochs = 1
        steps_per_s(trainer, loader, 0, 20)  # warm-up
        trainers[name] = (ctx, trainer, loader)
    return trainers


def steps_per_s(trainer, loader, epoch: int, steps: int, settle: int = 0) -> float:
    loader.set_epoch(epoch)
    if settle:
        trainer.train_epoch(loader, epoch, limit_batches=settle)
    start = time.perf_counter()
    trainer.train_epoch(loader, epoch, limit_batches=steps)
    return steps / (time.perf_counter() - start)


def interleaved(args) -> list[tuple[float, float]]:
    """(every step, never) steps/s for each pair of adjacent blocks."""
    trainers = make_trainers(args.wandb, args.data_dir)
    pairs = []
    for block in range(args.blocks):
        order = ("every", "never") if block % 2 == 0 else ("never", "every")
        rates = {name: steps_per_s(*trainers[name][1:], block, args.steps, args.settle) for name in order}
        pairs.append((rates["every"], rates["never"]))
        if (block + 1) % 10 == 0:
            print(f"{block + 1} pairs: {summary(pairs)}", flush=True)
    for ctx, _, _ in trainers.values():
        ctx.close()
    return pairs


def summary(pairs: list[tuple[float, float]]) -> str:
    """Steps/s of each setting over all its blocks (equal steps per block: harmonic mean), and the
    spread of the per-pair differences."""
    every, never = statistics.harmonic_mean(p[0] for p in pairs), statistics.harmonic_mean(p[1] for p in pairs)
    differences = sorted(100 * (n - e) / n for e, n in pairs)
    quartiles = statistics.quantiles(differences, n=4)
    return (f"logging every step {every:.2f} steps/s, never {never:.2f} steps/s, {100 * (never - every) / never:+.1f}%; "
            f"per-pair difference "
            f"median {statistics.median(differences):+.1f}% (quartiles {quartiles[0]:+.1f}%, {quartiles[2]:+.1f}%; "
            f"{len(pairs)} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per block")
    parser.add_argument("--settle", type=int, default=60, help="untimed steps at the start of each block")
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each setting")
    parser.add_argument("--wandb", default="offline", choices=("offline", "disabled"),
                        help="W&B for the setting that logs every step (metrics.jsonl is written either way)")
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    print(summary(interleaved(args)))


if __name__ == "__main__":
    main()
