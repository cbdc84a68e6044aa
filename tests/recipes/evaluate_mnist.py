"""Evaluates one fixed, briefly trained MNIST CNN on the full test set; rank 0 writes the result
to $DTRAIN_RUN_DIR/evaluation.json. The model is the same on every world size."""

import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from dtrain.runtime import setup
from dtrain.runtime.evaluation import evaluate_classifier

from mnist_cnn import MNISTCNN, load_mnist

ctx = setup()
train_set, test_set = load_mnist(ctx, sys.argv[1], loader="memory")
torch.manual_seed(1234)
model = MNISTCNN()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x, y = train_set.tensors[0][:512], train_set.tensors[1][:512]  # the same batches on every rank: no DDP
for i in range(0, 512, 64):
    nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
    optimizer.step()
    optimizer.zero_grad()
model = model.to(ctx.device)
result = evaluate_classifier(ctx, model, test_set, nn.CrossEntropyLoss())
if ctx.is_main:
    (ctx.run_dir / "evaluation.json").write_text(json.dumps(result))
ctx.close()
