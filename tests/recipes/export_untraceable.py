"""The MNIST CNN recipe after a change torch.export cannot trace: the forward branches on the logits' values."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from mnist_cnn import MNISTCNN, export_inputs, parse_args  # noqa: F401 (the export face: dtrain export calls them)


class Branchy(MNISTCNN):
    def forward(self, images):
        logits = super().forward(images)
        if logits.sum() > 0:
            return logits
        return -logits


def export_model(args):
    return Branchy(args.dropout)
