"""Test recipe: Trainer on IterableDatasets (a training stream of 40 elements, an evaluation
stream of 37) with evaluation every 3 optimizer steps and two callbacks. Each rank writes to
$DTRAIN_RUN_DIR/rank<R>.json the steps its callbacks saw and the element ids it trained and evaluated on."""

import json
import os

import torch
from torch import nn
from torch.utils.data import IterableDataset

from dtrain.runtime import Trainer, setup


class Stream(IterableDataset):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.n)
        for i in range(self.n):
            x = torch.randn(4, generator=generator)
            yield {"id": torch.tensor(i), "x": x, "y": x.sum(0, keepdim=True)}


class Record:
    def __init__(self):
        self.steps, self.evaluations = [], []

    def after_step(self, trainer):
        self.steps.append(trainer.step)

    def after_evaluation(self, trainer, result):
        self.evaluations.append(trainer.step)


seen = {"train": [], "eval": []}


def compute_loss(model, batch):
    seen["train" if model.training else "eval"].extend(batch["id"].tolist())
    return nn.functional.mse_loss(model(batch["x"]), batch["y"])


ctx = setup()
torch.manual_seed(0)
model = nn.Linear(4, 1)
record = Record()
trainer = Trainer(ctx, model, torch.optim.SGD(model.parameters(), lr=0.01), compute_loss=compute_loss, batch_size=4,
                  eval_every=3, callbacks=[record])
trainer.fit(Stream(40), Stream(37), epochs=2)
with open(os.path.join(os.environ["DTRAIN_RUN_DIR"], f"rank{ctx.rank}.json"), "w") as fh:
    json.dump({"steps": record.steps, "evaluations": record.evaluations, **seen}, fh)
ctx.close()
