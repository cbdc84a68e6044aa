"""The preemption signal outside SLURM, with real torchrun processes: every rank checkpoints at
the same step, the job stops, and the same command resumes from that checkpoint (and W&B run)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from dtrain.core.metrics import TRAIN

import wandb_file
from conftest import DTRAIN, ROOT, metrics, processes_with_env, run_dtrain


def logged_steps(run_dir: Path) -> list[int]:
    """Steps of the periodic training rows."""
    return [r["step"] for r in metrics(run_dir, TRAIN)] if (run_dir / "metrics.jsonl").exists() else []


def start(run_dir: Path, recipe: str, *args: str) -> subprocess.Popen:
    """`args`: launch options, then the recipe's (from the first that the recipe takes, --epochs)."""
    split = args.index("--epochs")
    return subprocess.Popen([DTRAIN, "launch", recipe, "--cpu", "--nproc", "2", "--run-dir", str(run_dir),
                             "--checkpoint-every", "never", *args[:split], "--", *args[split:]],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while max(logged_steps(run_dir), default=0) < step:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def test_signal_to_dtrain_launch_checkpoints_every_rank_and_the_rerun_continues_the_run(tmp_path, data_dir):
    """SIGTERM as the preemption signal, as in a Kubernetes pod (SLURM's USR2 is test_slurm_cluster's); also the W&B
    side (offline): the rerun continues the same W&B run, with no step logged twice."""
    run_dir = tmp_path / "run"
    args = ("--epochs", "1", "--limit-train-batches", "120", "--limit-eval-batches", "4", "--log-every", "10", "--data-dir", data_dir)
    proc = start(run_dir, "recipes/mnist_cnn.py", "--wandb", "offline", "--preempt-signal", "TERM", *args)
    wait_for_step(run_dir, 20, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = [line for line in out.splitlines() if line.startswith("dtrain: stopped at step")]
    assert len(stopped) == 1 and "not in a cluster job" in stopped[0], out + err
    step = int(stopped[0].split()[4])
    assert (run_dir / "checkpoints" / f"step_{step:07d}" / "COMMITTED").is_file()
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step_{step:07d}"
    assert not (run_dir / "model.pth").exists()  # the recipe's final save belongs to the run that finishes
    assert processes_with_env("DTRAIN_RUN_DIR", str(run_dir)) == []

    rerun = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir),
                       "--checkpoint-every", "never", "--wandb", "offline", "--preempt-signal", "TERM", "--", *args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from {run_dir}/checkpoints/step_{step:07d} (step {step}," in rerun.stdout
    assert logged_steps(run_dir) == list(range(10, 121, 10))  # continued: no step trained twice or skipped
    assert (run_dir / "model.pth").is_file()

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and {wandb_file.run_id(f) for f in files} == {(run_dir / "wandb" / "run-id").read_text().strip()}
    first, second = ([row["_step"] for row in wandb_file.history(f) if "samples_per_s" in row] for f in files)
    assert first[-1] == step and first + second == list(range(10, 121, 10))


def test_signal_reaching_one_rank_stops_all_ranks_at_the_same_step(tmp_path, data_dir):
    """Custom loop (mnist_mlp): only rank 1's worker gets the signal; the ranks agree and both save."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "recipes/mnist_mlp.py", "--epochs", "1", "--log-every", "10", "--data-dir", data_dir)
    wait_for_step(run_dir, 20, proc)
    rank1 = [pid for pid in processes_with_env("DTRAIN_RUN_DIR", str(run_dir))
             if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err  # dtrain itself got no signal: the workers stopped cleanly
    stopped = [line for line in out.splitlines() if line.startswith("dtrain: stopped at step")]
    assert len(stopped) == 1, out + err
    step = int(stopped[0].split()[4])
    assert step % 10 == 0
    checkpoint = run_dir / "checkpoints" / f"step_{step:07d}"
    assert (checkpoint / "COMMITTED").is_file()
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
