"""The checkpoint commit protocol on a world of one, in this process: what a committed checkpoint
holds, what loading restores, retention, async commits, and the leftovers of an interrupted save.
(Real processes, crashes at every commit point and damaged files: tests/test_checkpoint.py.)"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from torch import nn

from dtrain.core import checkpoints
from dtrain.runtime.checkpoint import Checkpointer, TrainState, save_atomically
from dtrain.runtime.strategies.ddp import DCPState

from conftest import file_size_limit


def trained(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def checkpointer(tmp_path, **kwargs) -> Checkpointer:
    return Checkpointer(tmp_path, rank=0, world_size=1, keep_last=kwargs.get("keep_last"),
                        async_save=kwargs.get("async_save", False), strategy="ddp")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_committed_checkpoint_lists_every_file_and_loads_back_exactly(tmp_path, async_save):
    model, optimizer = trained(0)
    saver = checkpointer(tmp_path, async_save=async_save)
    saver.save(TrainState(step=7, epoch=1, batch=2, batch_size=4), DCPState(model, [optimizer]),
               {"scheduler": {"last_epoch": 1}}, {"eval/accuracy": 0.5})
    root = tmp_path / "checkpoints"
    if async_save:
        assert checkpoints.read_latest(root) is None  # committed by the next save, or by wait()
        saver.wait()
    assert checkpoints.read_latest(root) == "step_0000007"
    manifest = checkpoints.verify(root / "step_0000007")
    files = {p.name for p in (root / "step_0000007").iterdir()} - {"manifest.json", "COMMITTED"}
    assert set(manifest["files"]) == files == {".metadata", "__0_0.distcp", "rng_rank0.json", "trainer_state.json"}
    assert (manifest["step"], manifest["strategy"], manifest["metrics"]) == (7, "ddp", {"eval/accuracy": 0.5})
    assert not checkpoints.partials(root)

    fresh, fresh_optimizer = trained(1)
    path, notes, state, extras, rng = checkpointer(tmp_path).resume("auto", DCPState(fresh, [fresh_optimizer]),
                                                                    {"scheduler": {"last_epoch": 0}})
    assert (path.name, notes, state) == ("step_0000007", [], TrainState(7, 1, 2, 1, 4))
    assert extras == {"scheduler": {"last_epoch": 1}} and rng is not None
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], fresh_optimizer.state_dict()["state"][0]["exp_avg"])


def test_retention_keeps_the_newest_and_a_new_start_removes_interrupted_saves(tmp_path):
    model, optimizer = trained(0)
    saver = checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        saver.save(TrainState(step=step), DCPState(model, [optimizer]), {})
    root = tmp_path / "checkpoints"
    assert [p.name for p in checkpoints.committed(root)] == ["step_0000030", "step_0000020"]
    (root / "step_0000040.partial").mkdir()
    checkpointer(tmp_path)
    assert not checkpoints.partials(root)


def test_a_trainer_state_of_release_0_1_0_reads_without_its_wandb_run_id():
    old = {"step": 8, "epoch": 1, "batch": 2, "world_size": 2, "batch_size": 8, "wandb_run_id": None}
    assert TrainState.from_dict(old) == TrainState(8, 1, 2, 2, 8)
    assert json.loads(json.dumps(TrainState.from_dict(old).__dict__)) == {k: v for k, v in old.items()
                                                                          if k != "wandb_run_id"}


def test_a_model_file_cut_short_by_a_full_disk_raises_its_os_error_and_leaves_the_old_file(tmp_path):
    """torch.save alone says only "unexpected pos" (a RuntimeError) and leaves the half-written file."""
    path = tmp_path / "model.pth"
    save_atomically({"w": torch.arange(4.0)}, path)
    with file_size_limit(100_000), pytest.raises(OSError) as failed:
        save_atomically({"w": torch.zeros(100_000)}, path)
    assert failed.value.errno == errno.EFBIG
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
