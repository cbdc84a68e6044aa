"""What a worker imports: only what its run uses (the modules, not the seconds; `bench/` has those)."""

from __future__ import annotations

import json

import pytest

from conftest import TEST_RECIPES, run_dtrain

# Imported by dtrain only where a run needs them; torch itself imports none of these. (It does import DDP's
# module, and an optimizer's constructor imports torch._dynamo, which imports FSDP's and DTensor's.)
CHECKPOINT_MODULES = ("torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
                      "dtrain.runtime.dcp_io")
MORE_THAN_ONE_RANK = ("dtrain.runtime.shared_memory",)
NEVER_IN_A_WORKER = ("deepspeed", "wandb", "tensorboard", "mlflow")  # the trackers run in a process of their own


def imported(tmp_path, name: str, *options: str) -> set[str]:
    run_dir = tmp_path / name
    out = run_dtrain("launch", str(TEST_RECIPES / "modules_used.py"), "--cpu", "--wandb", "disabled",
                     "--run-dir", str(run_dir), *options)
    assert out.returncode == 0, out.stderr
    return set(json.loads((run_dir / "modules.json").read_text()))


def test_a_run_without_checkpoints_on_one_process_imports_neither_dcp_nor_the_multi_rank_path(tmp_path):
    modules = imported(tmp_path, "plain", "--checkpoint-every", "never")
    assert "dtrain.runtime" in modules and "torch" in modules
    assert sorted(modules & {*CHECKPOINT_MODULES, *MORE_THAN_ONE_RANK, *NEVER_IN_A_WORKER}) == []


@pytest.mark.parametrize("options, expected", [
    (("--checkpoint-every", "epoch"), CHECKPOINT_MODULES),
    (("--checkpoint-every", "never", "--nproc", "2"), MORE_THAN_ONE_RANK),
], ids=["checkpoints", "two-ranks"])
def test_what_a_run_uses_is_imported(tmp_path, options, expected):
    modules = imported(tmp_path, "used", *options)
    assert set(expected) <= modules
    assert not modules & set(NEVER_IN_A_WORKER)
