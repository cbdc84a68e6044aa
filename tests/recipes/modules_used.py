"""Trains a small classifier for a few steps, then writes the modules this process imported to
<run_dir>/modules.json: what a run that needs no checkpoint, or no second rank, never imports."""

import json
import sys

import torch
from torch import nn

from dtrain.runtime import Trainer, setup

ctx = setup()
torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
trainer = Trainer(ctx, model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), batch_size=8)
trainer.fit(data, data, epochs=1)
if ctx.is_main:
    (ctx.run_dir / "modules.json").write_text(json.dumps(sorted(sys.modules)))
ctx.close()
