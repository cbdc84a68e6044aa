"""Three SGD steps of a small MLP with ctx.clip_grad_norm(0.05) (far below the gradients' norm, so it
clips), each rank on batches of its own; rank 0 writes the norms clip_grad_norm returned (read after
ctx.step(), as under ZeRO) to $DTRAIN_RUN_DIR/norms.json, and the model to model.pth."""

import json

import torch
from torch import nn

from dtrain.runtime import setup

ctx = setup()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
model, optimizer = ctx.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5), batch_size=16)
norms = []
for step in range(3):
    generator = torch.Generator().manual_seed(100 * step + ctx.rank)
    x, y = torch.randn(16, 20, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    ctx.backward(nn.functional.cross_entropy(model(x), y))
    norm = ctx.clip_grad_norm(0.05)
    ctx.step()
    norms.append(norm.item())
ctx.save_model(model)
if ctx.is_main:
    (ctx.run_dir / "norms.json").write_text(json.dumps(norms))
ctx.close()
