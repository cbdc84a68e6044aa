"""Evaluates one fixed, briefly trained MNIST CNN twice: on the first 2,000 test images (evaluate_classifier),
and on 1,999 (odd: the ranks' shares differ) through Trainer.evaluate with torchmetrics metrics; rank 0
writes both results to $DTRAIN_RUN_DIR/evaluation.json. The model is the same on every world size."""

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from dtrain.runtime import Trainer, setup
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
metrics = {"macro_f1_torchmetrics": MulticlassF1Score(10, average="macro"),
           "accuracy_torchmetrics": MulticlassAccuracy(10, average="micro")}
trainer = Trainer(ctx, model, optimizer, nn.CrossEntropyLoss(), metrics=metrics, eval_batch_size=500)
results = {"classifier": evaluate_classifier(ctx, model, TensorDataset(*(t[:2000] for t in test_set.tensors)),
                                             nn.CrossEntropyLoss()),
           "torchmetrics": trainer.evaluate(TensorDataset(*(t[:1999] for t in test_set.tensors)))}
if ctx.is_main:
    (ctx.run_dir / "evaluation.json").write_text(json.dumps(results))
ctx.close()
