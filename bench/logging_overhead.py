"""What rank-0 logging costs the training loop, on this machine.

    python bench/logging_overhead.py [--steps 300] [--rounds 3] [--data-dir ../shared/data]

One process trains the MNIST CNN recipe's model with `Trainer.train_epoch` for `--steps` steps,
alternating two configurations in the same process: logging every step (metrics.jsonl, a W&B
offline run, gradient norm, samples/s, the host sync that reading them needs) and logging never
(W&B disabled, no logging step). It reports the median steps/s of each and the difference.
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


def run(steps: int, log_every: int, wandb: str, data_dir: str) -> float:
    """Steps per second of one fresh Context + Trainer (world of one, CPU)."""
    import torch
    from torch import nn

    from dtrain.runtime import Trainer, setup
    from mnist_cnn import MNISTCNN, load_mnist

    run_dir = tempfile.mkdtemp(prefix="dtrain-bench-log-")
    os.environ.update({"DTRAIN_RUN_DIR": run_dir, "DTRAIN_WANDB": wandb, "DTRAIN_DEVICE": "cpu",
                       "DTRAIN_CHECKPOINT_EVERY": "never", "WANDB_SILENT": "true"})
    ctx = setup()
    train_set, _ = load_mnist(ctx, data_dir, loader="memory")
    model = MNISTCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    trainer = Trainer(ctx, model, optimizer, nn.CrossEntropyLoss(), log_every=log_every)
    trainer.epochs = 1
    loader = ctx.loader(train_set, 64)
    loader.set_epoch(0)
    trainer.train_epoch(loader, 0, limit_batches=20)  # warm-up, not timed
    loader.set_epoch(1)
    start = time.perf_counter()
    trainer.train_epoch(loader, 1, limit_batches=steps)
    seconds = time.perf_counter() - start
    ctx.close()
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    logged, silent = [], []
    for _ in range(args.rounds):
        logged.append(run(args.steps, 1, "offline", args.data_dir))
        silent.append(run(args.steps, 10**9, "disabled", args.data_dir))
        print(f"every step: {logged[-1]:.1f} steps/s   never: {silent[-1]:.1f} steps/s", flush=True)
    a, b = statistics.median(logged), statistics.median(silent)
    print(f"median: logging every step {a:.1f} steps/s, logging disabled {b:.1f} steps/s, "
          f"difference {100 * (b - a) / b:+.1f}%")


if __name__ == "__main__":
    main()
