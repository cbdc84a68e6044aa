"""Faults at the edges, with real processes: a disk that fills up (a real tmpfs), writes that fail on
one rank (a DCP StorageWriter that raises, sync and async), a run directory that cannot be written."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dtrain.core import checkpoints
from dtrain.core.hardware import free_port

from conftest import TEST_RECIPES, launch, mounted_tmpfs, run_dtrain

STORAGE = str(TEST_RECIPES / "faulty_storage.py")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pth", weights_only=True)


def one_error(out) -> str:
    """The one `dtrain: error:` sentence of a failed run; no traceback anywhere."""
    console = out.stdout + out.stderr
    errors = [line for line in console.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "Traceback" not in console, console
    return errors[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("storage") / "straight"
    launch(run_dir, "--checkpoint-every", "never", recipe=STORAGE)
    return run_dir


@pytest.mark.parametrize("code", ["ENOSPC", "EIO"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_write_that_fails_on_one_rank_stops_every_rank_and_commits_nothing(tmp_path, straight, code, mode):
    run_dir = tmp_path / "run"
    options = ("--checkpoint-every", "5", *(("--async-checkpoint",) if mode == "async" else ()))
    failed = run_dtrain("launch", STORAGE, "--cpu", "--nproc", "2", "--run-dir", str(run_dir), "--wandb", "disabled",
                        *options, env={"FAULT": f"{code}:1:2"}, timeout=300)
    assert failed.returncode == 1
    sentence = one_error(failed)
    root = run_dir / "checkpoints"
    assert f"rank 1 could not write checkpoint step_0000010 into {root}: {os.strerror(getattr(errno, code))}" \
        in sentence and "LATEST names step_0000005, complete" in sentence, sentence
    assert checkpoints.read_latest(root) == "step_0000005"
    assert [p.name for p in checkpoints.step_dirs(root)] == ["step_0000005"] and not checkpoints.partials(root)
    checkpoints.verify(root / "step_0000005")
    if code == "EIO":  # ENOSPC leaves the same files (asserted above): one resume per mode
        resumed = launch(run_dir, *options, recipe=STORAGE)
        assert "resuming from" in resumed.stdout and "step_0000005" in resumed.stdout
        expected, got = weights(straight), weights(run_dir)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.fixture
def tmpfs(tmp_path):
    """A real small file system (tmpfs, 13 MB), mounted for the test and unmounted after it."""
    with mounted_tmpfs(tmp_path / "disk", "13m") as disk:
        yield disk


def test_a_disk_that_fills_up_stops_the_run_in_one_sentence_and_the_run_resumes_once_there_is_room(tmpfs, data_dir):
    run_dir = tmpfs / "run"
    args = ("--checkpoint-every", "20", "--", "--epochs", "1", "--limit-train-batches", "100", "--limit-eval-batches",
            "4", "--log-every", "20", "--data-dir", data_dir)
    full = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir),
                      "--wandb", "disabled", *args, timeout=300)
    assert full.returncode == 1
    sentence = one_error(full)
    root = run_dir / "checkpoints"
    latest = checkpoints.read_latest(root)
    assert latest is not None and "rank 0 could not start checkpoint " in sentence and str(root) in sentence \
        and f"LATEST names {latest}, complete" in sentence, sentence
    checkpoints.verify(root / latest)
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)  # space is freed
    resumed = launch(run_dir, *args)
    assert f"resuming from {root / latest}" in resumed.stdout
    assert not checkpoints.partials(root) and checkpoints.read_latest(root) == "step_0000100"


def test_a_first_save_that_hits_a_full_disk_says_no_checkpoint_is_complete(tmpfs, data_dir):
    (tmpfs / "filler").write_bytes(bytes(10 << 20))  # 3 MB left: less than one checkpoint
    run_dir = tmpfs / "run"
    full = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir),
                      "--wandb", "disabled", "--checkpoint-every", "10", "--", "--epochs", "1",
                      "--limit-train-batches", "30", "--data-dir", data_dir, timeout=300)
    assert full.returncode == 1
    sentence = one_error(full)
    assert "could not write checkpoint step_0000010 into" in sentence and "No space left on device" in sentence \
        and "no complete checkpoint was written yet" in sentence, sentence
    assert not checkpoints.partials(run_dir / "checkpoints")
    assert not list(run_dir.rglob("*.tmp")), list(run_dir.rglob("*"))  # no half-written record left behind
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["world_size"] == 2


def test_a_model_file_that_does_not_fit_is_one_sentence_and_no_partial_file(tmpfs, data_dir):
    """The MNIST CNN's model.pth (1.7 MB) on a disk with 1 MB left, and no checkpoint to export it from."""
    (tmpfs / "filler").write_bytes(bytes(12 << 20))
    run_dir = tmpfs / "run"
    full = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir),
                      "--wandb", "disabled", "--checkpoint-every", "never", "--max-steps", "5", "--", "--epochs", "1",
                      "--limit-train-batches", "5", "--limit-eval-batches", "4", "--data-dir", data_dir, timeout=300)
    assert full.returncode == 1
    assert one_error(full) == (f"dtrain: error: rank 0 could not write {run_dir / 'model.pth'} (No space left on "
                               "device); free space and run again (the run wrote no checkpoint).")
    assert not (run_dir / "model.pth").exists() and not list(run_dir.rglob("*.tmp"))


def test_mnist_that_cannot_be_downloaded_is_one_sentence_naming_where_to_point(tmp_path):
    """No network: a proxy on a closed port refuses at once (tests never download)."""
    closed = f"http://127.0.0.1:{free_port()}"
    empty = tmp_path / "no-data"
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(tmp_path / "run"),
                     "--wandb", "disabled", "--", "--data-dir", str(empty),
                     env={"https_proxy": closed, "http_proxy": closed, "no_proxy": "", "NO_PROXY": ""}, timeout=300)
    assert out.returncode == 1
    sentence = one_error(out)
    assert sentence.startswith(f"dtrain: error: MNIST is not in {empty} and could not be downloaded (Error downloading "
                               "train-images-idx3-ubyte.gz: urlopen error "), sentence
    assert sentence.endswith("); point --data-dir (or DTRAIN_DATA_DIR) at a folder that holds MNIST/raw/."), sentence


def test_a_run_directory_that_cannot_be_written_is_refused_before_anything_starts(tmp_path):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)],
                      capture_output=True).returncode:
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        out = run_dtrain("launch", str(TEST_RECIPES / "report_process.py"), "--cpu", "--run-dir", str(readonly / "run"))
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.strip() == (f"dtrain: error: run directory {readonly / 'run'} cannot be written (Read-only "
                                      "file system); pass another --run-dir (or --name), or make it writable.")
    finally:
        subprocess.run(["umount", "-l", str(readonly)], check=False)
