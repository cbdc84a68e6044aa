"""Test recipe: a batch of any structure through Trainer. The data set gives dicts; a collate_fn
makes each batch a dataclass that also holds a list of sample ids (not a tensor: left alone); the
loss is the recipe's compute_loss (a per-sample weighted cross-entropy), with dropout in the model."""

import argparse
import dataclasses

import torch
from torch import nn
from torch.utils.data import Dataset

from dtrain.runtime import Trainer, setup


@dataclasses.dataclass
class Batch:
    features: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor
    ids: list[int]


class Samples(Dataset):
    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=generator)
        self.y = (self.x[:, :2].sum(1) > 0).long() + (self.x[:, 2:4].sum(1) > 0).long()
        self.w = torch.rand(n, generator=generator) + 0.5

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "label": self.y[i], "weight": self.w[i], "id": i}


def collate(samples: list[dict]) -> Batch:
    return Batch(torch.stack([s["features"] for s in samples]), torch.stack([s["label"] for s in samples]),
                 torch.stack([s["weight"] for s in samples]), [s["id"] for s in samples])


def compute_loss(model: nn.Module, batch: Batch):
    logits = model(batch.features)
    losses = nn.functional.cross_entropy(logits, batch.label, reduction="none")
    return (losses * batch.weight).sum() / batch.weight.sum(), logits, batch.label


parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()
ctx = setup(config=vars(args))
torch.manual_seed(1)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
trainer = Trainer(ctx, model, optimizer, compute_loss=compute_loss, collate_fn=collate, batch_size=8, log_every=5)
trainer.fit(Samples(160), Samples(33), epochs=args.epochs)
trainer.save_model()
ctx.close()
