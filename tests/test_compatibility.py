"""Checkpoints across versions: a checkpoint written by an earlier release still resumes exactly.

tests/data/checkpoint-0.1.0/ was made by dtrain 0.1.0 (make.sh there says how): a 2-process run
of tests/recipes/small_trainer.py stopped mid-epoch, and the weights that release reached when it
ran the same recipe uninterrupted. Resumed by today's dtrain, the run must end on the weights an
uninterrupted run reaches.

Floats differ between CPUs: ATen's AVX2 and AVX-512 kernels, oneDNN's and MKL's, round differently
(about 6e-8 apart after the 18 steps, measured here between ATen's AVX2 and scalar kernels). Both
the fixture and these runs are made with the arithmetic pinned to what every x86-64 CPU computes
alike (PINNED), so the runs made in this test on this machine are compared bit for bit.
"""

from __future__ import annotations

import shutil

import torch

from conftest import ROOT, TEST_RECIPES, launch

FIXTURE = ROOT / "tests" / "data" / "checkpoint-0.1.0"
# ATen's scalar kernels, oneDNN's SSE4.1 ones, MKL's reproducible path, one thread per process (make.sh: the same).
PINNED = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
          "OMP_NUM_THREADS": "1"}
# Should a CPU still round differently, the weights stay within this of the fixture's: 16x the 6e-8 that
# two kernel sets differ by; a resume that misread any state (its data position, its RNG) lands far off
# (another seed: up to 7.5e-2 apart).
ACROSS_CPUS = 1e-6


def test_a_checkpoint_of_release_0_1_0_resumes_bit_exact(tmp_path):
    recipe, common = str(TEST_RECIPES / "small_trainer.py"), ("--seed", "3", "--checkpoint-every", "never")
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run_dir)
    out = launch(run_dir, *common, recipe=recipe, env=PINNED)
    assert f"resuming from {run_dir / 'checkpoints' / 'step_0000008'} (step 8, epoch 2, batch 2)" in out.stdout
    launch(tmp_path / "straight", *common, recipe=recipe, env=PINNED)

    resumed = torch.load(run_dir / "model.pth", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "model.pth", weights_only=True)
    reference = torch.load(FIXTURE / "straight-model.pth", weights_only=True)
    assert resumed.keys() == straight.keys() == reference.keys()
    assert all(torch.equal(resumed[key], straight[key]) for key in reference)
    assert all(torch.allclose(resumed[key], reference[key], rtol=0, atol=ACROSS_CPUS) for key in reference)
