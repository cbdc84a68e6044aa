"""What a structured batch costs the MNIST recipe's step: (inputs, targets) pairs and `loss_fn`
against dict batches and `compute_loss`, paired in one process.

    python bench/batch_structure.py [--blocks 20] [--steps 100] [--loader memory|dataloader]

Two Trainers around ONE model and optimizer (as bench/logging_overhead.py, so that where the
tensors land does not decide): "pairs" slices a TensorDataset, "dicts" a TensorDictDataset of the
same tensors and computes the loss with compute_loss(model, batch). `--loader dataloader` sends
both through a DataLoader (per-sample dicts collated, then moved to the device by `tree_map`).
Blocks alternate (ABBA); each prints the two settings' mean step time, and the end the paired
difference per block: median and quartiles.
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


class Pairs:
    """A map-style data set of (image, label) pairs (the DataLoader path)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class Dicts(Pairs):
    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def make_trainers(data_dir: str, loader: str) -> dict[str, tuple]:
    from torch import nn
    from torch.utils.data import TensorDataset

    from dtrain.runtime import TensorDictDataset, Trainer, setup

    from mnist_cnn import build, load_mnist, parse_args

    model, optimizer = build(parse_args([]))  # the recipe's defaults
    loss = nn.CrossEntropyLoss()

    def compute_loss(model, batch):
        return loss(model(batch["image"]), batch["label"])

    os.environ.update({"DTRAIN_RUN_DIR": tempfile.mkdtemp(prefix="dtrain-bench-batch-"), "DTRAIN_WANDB": "disabled",
                       "DTRAIN_DEVICE": "cpu", "DTRAIN_CHECKPOINT_EVERY": "never"})
    contexts = {"pairs": setup(), "dicts": setup()}  # a Context prepares one model: one each, around the same model
    train_set, _ = load_mnist(contexts["pairs"], data_dir, loader="memory")
    images, labels = train_set.tensors
    sets = {"pairs": TensorDataset(images, labels), "dicts": TensorDictDataset(image=images, label=labels)}
    if loader == "dataloader":
        sets = {"pairs": Pairs(images, labels), "dicts": Dicts(images, labels)}
    trainers = {}
    for name, kwargs in (("pairs", {"loss_fn": loss}), ("dicts", {"compute_loss": compute_loss})):
        ctx = contexts[name]
        trainer = Trainer(ctx, model, optimizer, log_every=10**9, **kwargs)
        trainer.epochs = 1
        trainers[name] = (trainer, ctx.loader(sets[name], 64))
        step_time(trainer, trainers[name][1], 0, 20)  # warm-up
    return trainers


def step_time(trainer, loader, epoch: int, steps: int) -> float:
    loader.set_epoch(epoch)
    start = time.perf_counter()
    trainer.train_epoch(loader, epoch, limit_batches=steps)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each setting")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per block")
    parser.add_argument("--loader", choices=("memory", "dataloader"), default="memory")
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    trainers = make_trainers(args.data_dir, args.loader)
    differences = []
    for block in range(args.blocks):
        order = ("pairs", "dicts") if block % 2 == 0 else ("dicts", "pairs")
        times = {name: step_time(*trainers[name], block + 1, args.steps) for name in order}
        differences.append(100 * (times["dicts"] - times["pairs"]) / times["pairs"])
        print(f"block {block + 1}: pairs {1000 * times['pairs']:.2f} ms/step, dicts {1000 * times['dicts']:.2f} ms/step",
              flush=True)
    quartiles = statistics.quantiles(differences, n=4)
    print(f"{args.loader}: dict batches + compute_loss against pairs + loss_fn, per block: median "
          f"{statistics.median(differences):+.2f}% (quartiles {quartiles[0]:+.2f}%, {quartiles[2]:+.2f}%; "
          f"{args.blocks} blocks of {args.steps} steps)")


if __name__ == "__main__":
    main()
