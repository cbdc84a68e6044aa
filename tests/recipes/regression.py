"""Test recipe: a regression model (MSE) with an evaluation set of 101 samples in batches of 10, so
the ranks' shares differ (51 and 50 samples: 6 and 5 batches). Rank 0 writes the evaluation set
to $DTRAIN_RUN_DIR/eval_set.pt for the test to check eval/loss against."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.runtime import Trainer, setup

ctx = setup()
generator = torch.Generator().manual_seed(0)
x = torch.randn(357, 6, generator=generator)
y = x @ torch.linspace(-1, 1, 6).unsqueeze(1) + 0.1 * torch.randn(357, 1, generator=generator)
train_set, eval_set = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
if ctx.is_main:
    torch.save({"x": x[256:], "y": y[256:]}, ctx.run_dir / "eval_set.pt")
torch.manual_seed(1)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
trainer = Trainer(ctx, model, torch.optim.SGD(model.parameters(), lr=0.05), nn.MSELoss(), batch_size=16,
                  eval_batch_size=10, blocks=[nn.Linear])
trainer.fit(train_set, eval_set, epochs=2)
trainer.save_model()
ctx.close()
