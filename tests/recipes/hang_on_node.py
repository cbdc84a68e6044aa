"""Test recipe: Trainer on a small classifier of synthetic data whose rank on the node --hang-node (the cluster
engine's name for it) falls asleep after step --hang-at in the job's first run, not after a requeue: a node that
hangs. With --fail-at, every rank raises there instead: the recipe's own bug."""

import argparse
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.runtime import Trainer, setup

parser = argparse.ArgumentParser()
parser.add_argument("--hang-node", default=None)
parser.add_argument("--hang-at", type=int, default=20)
parser.add_argument("--fail-at", type=int, default=None)
parser.add_argument("--epochs", type=int, default=1)
args = parser.parse_args()

ctx = setup(config=vars(args))


class Trouble:
    def after_step(self, trainer: Trainer) -> None:
        if trainer.step == args.fail_at:
            raise ValueError(f"rank {ctx.rank} fails at step {trainer.step}, as the recipe says")
        if trainer.step == args.hang_at and ctx.env.node_name == args.hang_node and ctx.env.requeue_count == 0:
            time.sleep(3600)


generator = torch.Generator().manual_seed(0)
x = torch.randn(4000, 8, generator=generator)
y = (x[:, :2].sum(1) > 0).long()
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
trainer = Trainer(ctx, model, optimizer, nn.CrossEntropyLoss(), batch_size=8, log_every=10, callbacks=[Trouble()])
trainer.fit(TensorDataset(x, y), TensorDataset(x[:64], y[:64]), epochs=args.epochs)
trainer.save_model()
ctx.close()
