"""Test recipe: Trainer on a small classifier of synthetic data (AdamW, StepLR, an evaluation set).

The checkpoint kept under tests/data/checkpoint-0.1.0/ was written by this recipe with dtrain
0.1.0; every later release must resume it. Keep to the public API a recipe of that release used.
"""

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.runtime import Trainer, setup

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

ctx = setup(config=vars(args))
generator = torch.Generator().manual_seed(0)
x = torch.randn(120, 8, generator=generator)
y = (x[:, :2].sum(1) > 0).long() + 2 * (x[:, 2:4].sum(1) > 0).long()
train_set, eval_set = TensorDataset(x[:96], y[:96]), TensorDataset(x[96:], y[96:])
torch.manual_seed(1)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 4))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
trainer = Trainer(ctx, model, optimizer, nn.CrossEntropyLoss(), scheduler=scheduler, batch_size=8, log_every=2)
trainer.fit(train_set, eval_set, epochs=args.epochs)
trainer.save_model()
ctx.close()
