"""Checkpoints with real DCP saves from real torchrun processes: exact resume, crashes, damage."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtrain.core import checkpoints, contract
from dtrain.core.metrics import TRAIN
from dtrain.runtime.checkpoint import model_weights

from conftest import DTRAIN, ROOT, TEST_RECIPES, metrics, processes_with_env, run_dtrain

sys.path.insert(0, str(ROOT / "recipes"))

FAST = ["--limit-train-batches", "60", "--limit-eval-batches", "4", "--log-every", "1"]


def launch(run_dir: Path, data_dir: str, *options: str, nproc: int = 2, recipe: str = "recipes/mnist_cnn.py",
           recipe_args=(), env=None, timeout=300):
    return run_dtrain("launch", recipe, "--cpu", "--nproc", str(nproc), "--run-dir", str(run_dir), *options,
                      "--", "--data-dir", data_dir, *recipe_args, env=env, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    """Per-step training losses from metrics.jsonl (the last record wins for a step run twice)."""
    return {record["step"]: record["train/loss"] for record in metrics(run_dir, TRAIN)}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def snapshot(run_dir: Path) -> dict[str, str]:
    root = run_dir / "checkpoints"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir) -> Path:
    """2 processes, 2 epochs of 60 batches each in one go: the reference for every resume."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    out = launch(run_dir, data_dir, "--checkpoint-every", "never", recipe_args=["--epochs", "2", *FAST])
    assert out.returncode == 0, out.stderr
    return run_dir


def test_resumes_after_an_epoch_and_mid_epoch_from_async_checkpoints_are_bit_exact(tmp_path, data_dir, straight_run):
    """One run stopped twice: after its first epoch (a synchronous epoch checkpoint), then 30 batches into the
    second, having saved in the background every 25 steps and kept the newest 2; it ends on the straight run's
    weights, with its losses after each resume."""
    run_dir = tmp_path / "run"
    first = launch(run_dir, data_dir, recipe_args=["--epochs", "1", *FAST])
    assert first.returncode == 0, first.stderr
    second = launch(run_dir, data_dir, "--async-checkpoint", "--checkpoint-every", "25", "--max-steps", "90",
                    "--keep-last", "2", recipe_args=["--epochs", "2", *FAST])
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "step_0000060" in second.stdout
    manifests = [checkpoints.read_manifest(p) for p in checkpoints.committed(run_dir / "checkpoints")]
    assert [m["step"] for m in manifests] == [90, 75]  # 60 retired by --keep-last 2
    state = json.loads((run_dir / "checkpoints" / "step_0000090" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 30)  # 30 batches into the second epoch
    third = launch(run_dir, data_dir, "--async-checkpoint", recipe_args=["--epochs", "2", *FAST])
    assert third.returncode == 0, third.stderr
    assert "resuming from" in third.stdout and "step_0000090" in third.stdout
    assert_bit_equal(weights(straight_run / "model.pth"), weights(run_dir / "model.pth"))
    reference, resumed = losses(straight_run), losses(run_dir)
    assert [reference[s] for s in range(61, 121)] == [resumed[s] for s in range(61, 121)]
    assert [r["epoch"] for r in metrics(run_dir, "epoch")] == [1, 2, 2]  # the stopped run's partial epoch too


CRASH_POINTS = [  # (point, rank, LATEST afterwards, resumed): the second save (step 8) is interrupted
    ("started", 1, "step_0000004", True),
    ("shards", 1, "step_0000004", False),
    ("shards", 0, "step_0000004", False),
    ("gathered", 0, "step_0000004", False),
    ("manifest", 0, "step_0000004", False),
    ("marker", 0, "step_0000004", False),
    ("rename", 0, "step_0000004", True),
    ("latest", 0, "step_0000008", True),
]


@pytest.mark.slow
@pytest.mark.parametrize("point, rank, latest, resumed", CRASH_POINTS,
                         ids=[f"{p}@rank{r}" for p, r, _, _ in CRASH_POINTS])
def test_a_kill_at_any_point_of_a_save_leaves_a_loadable_latest(tmp_path, point, rank, latest, resumed):
    """The commit protocol does not depend on the model: a small one saves in milliseconds. After every kill the
    checkpoint that a resume would choose verifies (every file against its manifest); after the first point, a
    complete save not yet named (rename) and a named one (latest), one process resumes what two saved (a reshard:
    every shard is read) and the next start removes the partial save."""
    run_dir = tmp_path / "run"
    recipe = str(TEST_RECIPES / "small_trainer.py")
    args = ["--run-dir", str(run_dir), "--checkpoint-every", "4", "--max-steps", "10"]
    crashed = run_dtrain("launch", recipe, "--cpu", "--nproc", "2", *args,
                         env={contract.TEST_CRASH_AT: f"{point}:{rank}:2"})
    assert crashed.returncode == 137, crashed.stderr  # the worker's SIGKILL, as a shell reports it
    root = run_dir / "checkpoints"
    assert checkpoints.read_latest(root) == latest
    choice = checkpoints.choose_for_resume(run_dir, "auto")
    assert choice.path is not None and choice.path.name >= latest
    for path in {root / latest, choice.path}:  # each read once
        checkpoints.verify(path)
    if not resumed:
        return
    out = run_dtrain("launch", recipe, "--cpu", *args)
    assert out.returncode == 0, out.stderr
    assert f"resuming from {choice.path}" in out.stdout
    assert not checkpoints.partials(root), "a .partial folder must be cleaned up at the next start"
    assert checkpoints.read_latest(root) == "step_0000010"


def _worker_pid(run_dir: Path, rank: int) -> int | None:
    for pid in processes_with_env("DTRAIN_RUN_DIR", str(run_dir)):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RESTART_COUNT=0" in environ:
            return pid
    return None


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines[-3:] if line.endswith("}")), default=0)


def test_a_killed_worker_is_restarted_and_the_job_ends_as_if_nothing_happened(tmp_path, data_dir, straight_run):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [DTRAIN, "launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir),
         "--max-restarts", "1", "--checkpoint-every", "20", "--", "--data-dir", data_dir, "--epochs", "2", *FAST],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _last_step(run_dir) < 70 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    victim = _worker_pid(run_dir, rank=1)
    assert victim is not None and _last_step(run_dir) < 120, "the job must still be in its second epoch"
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "resuming from" in stdout
    assert_bit_equal(weights(straight_run / "model.pth"), weights(run_dir / "model.pth"))


def test_a_checkpoint_reshards_from_two_processes_to_one_and_back(tmp_path, data_dir):
    two = tmp_path / "two"
    out = launch(two, data_dir, "--max-steps", "30", recipe_args=["--epochs", "1", *FAST])
    assert out.returncode == 0, out.stderr
    exported = model_weights(two / "checkpoints" / "step_0000030")  # in this process: `dtrain ckpt export` itself is
    assert_bit_equal(exported, weights(two / "model.pth"))              # test_ckpt_ls_and_export's

    # 2 -> 1: load the 2-process checkpoint on 1 process; the weights arrive unchanged ...
    one = launch(two, data_dir, "--max-steps", "30", nproc=1, recipe_args=["--epochs", "1", *FAST])
    assert one.returncode == 0 and "resuming from" in one.stdout, one.stderr
    assert_bit_equal(exported, weights(two / "model.pth"))
    # ... and training continues from the same samples seen: 30 steps x 2 ranks = batch 60 on one rank.
    more = launch(two, data_dir, "--max-steps", "40", nproc=1, recipe_args=["--epochs", "2", *FAST])
    assert more.returncode == 0, more.stderr
    assert "(step 30, epoch 1, batch 30)" in more.stdout
    state = json.loads((two / "checkpoints" / "step_0000040" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"], state["world_size"]) == (1, 10, 1)

    # 1 -> 2
    back = launch(two, data_dir, "--max-steps", "40", recipe_args=["--epochs", "2", *FAST])
    assert back.returncode == 0 and "step_0000040" in back.stdout, back.stderr
    assert_bit_equal(model_weights(two / "checkpoints" / "step_0000040"), weights(two / "model.pth"))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, data_dir) -> Path:
    """A 1-process run with committed checkpoints at steps 10 and 20."""
    run_dir = tmp_path_factory.mktemp("two-ckpts") / "run"
    out = launch(run_dir, data_dir, "--checkpoint-every", "10", "--max-steps", "20", nproc=1,
                 recipe_args=["--epochs", "1", *FAST])
    assert out.returncode == 0, out.stderr
    return run_dir


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _damage(run_dir: Path, case: str, tmp_path: Path) -> str:
    """Damage step 20 (or LATEST) the way `case` says; return the words the message must contain."""
    newest = run_dir / "checkpoints" / "step_0000020"
    if case == "truncated shard":
        shard = newest / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
        return "__0_0.distcp has 1000 bytes"
    if case == "missing marker":
        (newest / "COMMITTED").unlink()
        return "has no COMMITTED marker"
    if case == "garbage in LATEST":
        (run_dir / "checkpoints" / "LATEST").write_bytes(b"\x00\xffnot a checkpoint")
        return "LATEST does not name a checkpoint"
    if case == "pickle that runs code":
        payload = pickle.dumps(_RunsCode(tmp_path / "pwned"))
        (newest / ".metadata").write_bytes(payload)
        manifest = json.loads((newest / "manifest.json").read_text())  # a forger fixes the manifest too
        manifest["files"][".metadata"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        (newest / "manifest.json").write_text(json.dumps(manifest))
        return "asks to run posix.system"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated shard", "missing marker", "garbage in LATEST", "pickle that runs code"])
def test_damaged_checkpoints_are_refused_or_fallen_back_from_and_never_touched(tmp_path, data_dir, two_checkpoints,
                                                                               case):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    words = _damage(run_dir, case, tmp_path)
    before = snapshot(run_dir)

    # An explicit --resume of the damaged folder: one sentence naming the file, non-zero, no traceback.
    if case != "garbage in LATEST":
        explicit = launch(run_dir, data_dir, "--resume", str(run_dir / "checkpoints" / "step_0000020"), nproc=1,
                          recipe_args=["--epochs", "1", *FAST])
        assert explicit.returncode != 0
        assert words in explicit.stderr and "Traceback" not in explicit.stderr + explicit.stdout, explicit.stderr
        assert snapshot(run_dir) == before

    # --resume auto falls back to the previous committed checkpoint and says why.
    auto = launch(run_dir, data_dir, "--max-steps", "10", nproc=1, recipe_args=["--epochs", "1", *FAST])
    assert auto.returncode == 0, auto.stderr
    assert words in auto.stdout
    expected = "step_0000020" if case == "garbage in LATEST" else "step_0000010"
    assert f"resuming from {run_dir / 'checkpoints' / expected}" in auto.stdout
    assert snapshot(run_dir) == before
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path, data_dir, two_checkpoints):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    before = snapshot(run_dir)
    out = launch(run_dir, data_dir, nproc=1, recipe="recipes/mnist_mlp.py", recipe_args=["--epochs", "1"])
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not fit this model and optimizer" in lines[0], out.stderr
    assert "step_0000020" in lines[0]
    assert snapshot(run_dir) == before


def test_ckpt_ls_and_export(tmp_path, two_checkpoints):
    listing = run_dtrain("ckpt", "ls", str(two_checkpoints))
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()
    assert rows[1].startswith("*  step_0000020  20") and "committed" in rows[1]
    assert rows[2].startswith("   step_0000010  10")
    out = tmp_path / "model.pth"
    exported = run_dtrain("ckpt", "export", str(two_checkpoints), "--step", "20", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    from mnist_cnn import MNISTCNN
    model = MNISTCNN()
    model.load_state_dict(torch.load(out, weights_only=True))
    assert_bit_equal(model.state_dict(), weights(two_checkpoints / "model.pth"))
    assert exported.stderr.startswith("dtrain: `dtrain ckpt export` is `dtrain export")  # the old name, in one line
    refused = run_dtrain("ckpt", "export", str(two_checkpoints), "--out", str(out / "inside-a-file.pth"))
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr.splitlines()[-1] == (f"dtrain: error: cannot write {out / 'inside-a-file.pth'} (File exists); "
                                               "pass an --out that can be written, with room for the model.")


def test_the_custom_loop_recipe_resumes_bit_exact_with_its_scheduler(tmp_path, data_dir):
    """mnist_mlp.py's own loop (StepLR, clipping) with ctx.resume / checkpoint_due / save_checkpoint."""
    args = ["--epochs", "2", "--limit-train-batches", "40", "--lr-step", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = launch(straight, data_dir, "--checkpoint-every", "30", nproc=1, recipe="recipes/mnist_mlp.py",
                 recipe_args=args)
    assert out.returncode == 0, out.stderr
    state = json.loads((straight / "checkpoints" / "step_0000060" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (1, 20)
    out = launch(resumed, data_dir, "--resume", str(straight / "checkpoints" / "step_0000060"), nproc=1,
                 recipe="recipes/mnist_mlp.py", recipe_args=args)
    assert out.returncode == 0, out.stderr
    assert "resuming from" in out.stdout and "LR: 2.50e-04" in out.stdout  # StepLR state came back
    assert_bit_equal(weights(straight / "model.pth"), weights(resumed / "model.pth"))


def test_a_checkpoint_of_a_newer_format_stops_the_run_in_one_sentence(tmp_path, data_dir, two_checkpoints):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    manifest_path = run_dir / "checkpoints" / "step_0000020" / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "format": "dtrain-checkpoint-9"}))
    before = snapshot(run_dir)
    out = launch(run_dir, data_dir, nproc=1, recipe_args=["--epochs", "1", *FAST])
    assert out.returncode == 1
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "is of format 'dtrain-checkpoint-9', and dtrain 0.1.0 reads dtrain-checkpoint-1" \
        in lines[0], out.stderr
    assert snapshot(run_dir) == before
