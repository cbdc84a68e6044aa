"""MNIST CNN, the reference recipe: the classic plain-PyTorch program, run by dtrain on any hardware.

    dtrain launch recipes/mnist_cnn.py --cpu --nproc 2 -- --epochs 1
    python recipes/mnist_cnn.py --epochs 1          # also works: a world of one
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchvision import datasets, transforms

from dtrain.errors import UsageError
from dtrain.runtime import Context, Trainer, setup
from dtrain.runtime.data import steps_per_epoch


class MNISTCNN(nn.Module):
    """The classic program's model. Each ReLU comes after its max-pool, not before: the two commute exactly
    (max and ReLU only select values, gradients included), and the ReLU then reads a quarter of the values
    (the step 10-15% faster on CPU, bench/RESULTS.md); the parameters and their names are the same."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        )
        self.fc_layers = nn.Sequential(
            nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(dropout), nn.Linear(128, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc_layers(self.conv_layers(images).flatten(1))


MEAN, STD = 0.1307, 0.3081
TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])


def to_tensors(dataset: datasets.MNIST) -> TensorDataset:
    """TRANSFORM applied to the whole set at once: the same float32 values, without per-sample PIL."""
    images = dataset.data.unsqueeze(1).float().div(255).sub(MEAN).div(STD)
    return TensorDataset(images, dataset.targets)


def load_mnist(ctx: Context, data_dir: str, loader: str):
    """Train and test sets; local rank 0 downloads them if missing while the other ranks wait."""
    if ctx.env.local_rank == 0:
        for train in (True, False):
            try:
                datasets.MNIST(data_dir, train=train, download=True)
            except RuntimeError as exc:  # torchvision's account of a failed download: what it tried, and why
                lines = [line.strip("<> ") for line in str(exc).splitlines() if line.strip()]
                raise UsageError(f"MNIST is not in {data_dir} and could not be downloaded ({lines[0].rstrip(':')}: "
                                 f"{lines[-1]}); point --data-dir (or DTRAIN_DATA_DIR) at a folder that holds "
                                 "MNIST/raw/.") from None
    ctx.barrier()
    sets = [datasets.MNIST(data_dir, train=train, download=False, transform=TRANSFORM) for train in (True, False)]
    if loader == "memory":
        sets = [to_tensors(s) for s in sets]
    return sets


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=1e-3, help="the learning rate (onecycle: its peak)")
    parser.add_argument("--lr-schedule", choices=("constant", "onecycle"), default="constant",
                        help="onecycle: OneCycleLR over the whole run (its epochs, or --max-steps if fewer), stepped "
                             "every optimizer step")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="CrossEntropyLoss's label_smoothing")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", "./data"))
    parser.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch, per process")
    parser.add_argument("--limit-eval-batches", type=int, default=None, help="evaluation batches, per process")
    parser.add_argument("--log-every", type=int, default=50, help="log the training loss every N steps")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluate every N optimizer steps too (default: at each epoch's end only)")
    parser.add_argument("--stop-at", default=None,
                        help="stop at the first evaluation that reaches this, e.g. eval/accuracy>=0.99")
    parser.add_argument("--loader", choices=("memory", "dataloader"), default="memory",
                        help="memory: decode once, keep tensors on the device; dataloader: torch DataLoader")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                        help="AdamW's fused kernel (CPU and CUDA) instead of its multi-tensor one")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last layout: oneDNN's fast convolutions on CPU (bench/RESULTS.md)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[MNISTCNN, torch.optim.Optimizer]:
    """The model and optimizer as the options ask (the benchmarks build theirs here too)."""
    model = MNISTCNN(args.dropout)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()  # in place: state_dict keys stay those of the plain model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=args.fused)
    return model, optimizer


def onecycle_steps(epochs: int, batches: int, grad_accum: int, max_steps: int | None) -> int:
    """The optimizer steps OneCycleLR spans: the run's, `batches` per epoch, or --max-steps if that ends it sooner
    (as Lightning's `estimated_stepping_batches`). One too few and the schedule raises at the end; too many and
    the run ends before the schedule's low end."""
    total = epochs * math.ceil(batches / grad_accum)
    return min(total, max_steps or total)


# --- what `dtrain export` builds and checks (docs/deploy.md) ----------------------------------------------------

def export_model(args: argparse.Namespace) -> MNISTCNN:
    return MNISTCNN(args.dropout)


def export_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """A fixed batch of normalized-looking images: exporting needs no data set."""
    return {"images": torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))}


def export_eval(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The 10,000 test images, normalized as in training, and their labels."""
    try:
        test_set = datasets.MNIST(args.data_dir, train=False, download=False)
    except RuntimeError:
        raise UsageError(f"MNIST's test set is not in {args.data_dir}; export --eval where --data-dir (or "
                         "DTRAIN_DATA_DIR) holds MNIST/raw/.") from None
    images, labels = to_tensors(test_set).tensors
    return {"images": images}, labels


def main() -> None:
    args = parse_args()
    ctx = setup(config=vars(args))
    train_set, test_set = load_mnist(ctx, args.data_dir, args.loader)
    model, optimizer = build(args)
    scheduler = None
    if args.lr_schedule == "onecycle":
        batches = steps_per_epoch(len(train_set), args.batch_size, ctx.world_size, args.limit_train_batches)
        total = onecycle_steps(args.epochs, batches, ctx.env.grad_accum, ctx.max_steps)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    trainer = Trainer(ctx, model, optimizer, loss_fn, batch_size=args.batch_size, class_names=datasets.MNIST.classes,
                      scheduler=scheduler, scheduler_interval="step", log_every=args.log_every,
                      eval_every=args.eval_every, stop_at=args.stop_at)
    trainer.fit(train_set, test_set, epochs=args.epochs, limit_train_batches=args.limit_train_batches,
                limit_eval_batches=args.limit_eval_batches)
    trainer.save_model()
    ctx.close()


if __name__ == "__main__":
    main()
