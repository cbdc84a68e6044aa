"""The MNIST CNN recipe after a change the trained checkpoint does not fit: a layer added at the end."""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from mnist_cnn import MNISTCNN, export_inputs, parse_args  # noqa: F401 (the export face: dtrain export calls them)


class Calibrated(MNISTCNN):
    def __init__(self, dropout: float):
        super().__init__(dropout)
        self.calibration = nn.Linear(10, 10)

    def forward(self, images):
        return self.calibration(super().forward(images))


def export_model(args):
    return Calibrated(args.dropout)
