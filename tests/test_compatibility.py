"""Checkpoints across versions: a checkpoint written by an earlier release still resumes exactly.

tests/data/checkpoint-0.1.0/ was made by dtrain 0.1.0 (make.sh there says how): a 2-process run
of tests/recipes/small_trainer.py stopped mid-epoch, and the weights that release reached when it
ran the same recipe uninterrupted. Resumed by today's dtrain, the run must end on those weights.
"""

from __future__ import annotations

import shutil

import torch

from conftest import ROOT, TEST_RECIPES, launch

FIXTURE = ROOT / "tests" / "data" / "checkpoint-0.1.0"


def test_a_checkpoint_of_release_0_1_0_resumes_bit_exact(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run_dir)
    out = launch(run_dir, "--seed", "3", "--checkpoint-every", "never", recipe=str(TEST_RECIPES / "small_trainer.py"))
    assert f"resuming from {run_dir / 'checkpoints' / 'step_0000008'} (step 8, epoch 2, batch 2)" in out.stdout
    resumed = torch.load(run_dir / "model.pth", weights_only=True)
    reference = torch.load(FIXTURE / "straight-model.pth", weights_only=True)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)
