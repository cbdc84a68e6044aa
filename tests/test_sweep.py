"""`dtrain sweep` with real processes: a 2x2 grid of the MNIST MLP, interrupted during its third run and
given again (the first two skipped, the third resumed from its checkpoint), and two runs at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from dtrain.launch import sweep

from conftest import DTRAIN, ROOT, metrics, run_dtrain

GRID = ("--grid", "lr=1e-3,3e-3", "--grid", "batch-size=32,64")
RUN_NAMES = ["000_lr=1e-3_batch-size=32", "001_lr=1e-3_batch-size=64", "002_lr=3e-3_batch-size=32",
             "003_lr=3e-3_batch-size=64"]


def sweep_command(sweep_dir: Path, data_dir: str, *extra: str) -> list[str]:
    # 200 batches with a checkpoint every 5 steps: a run lasts seconds after its first checkpoint
    return [DTRAIN, "sweep", "recipes/mnist_mlp.py", "--cpu", "--wandb", "disabled", "--run-dir", str(sweep_dir),
            "--checkpoint-every", "5", "--keep-last", "2", *GRID, "--metric", "eval/accuracy", *extra, "--",
            "--epochs", "1", "--limit-train-batches", "200", "--data-dir", data_dir]


def test_a_grid_interrupted_in_its_third_run_skips_two_and_resumes_the_third(tmp_path, data_dir):
    sweep_dir = tmp_path / "grid"
    third = sweep_dir / RUN_NAMES[2]
    proc = subprocess.Popen(sweep_command(sweep_dir, data_dir), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (third / "checkpoints" / "LATEST").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # as Ctrl-C would: the run in progress stops, no other starts
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, first
    assert [sweep.status(sweep_dir / name) for name in RUN_NAMES] == ["finished", "finished", "interrupted", "not run"]
    stopped_at = int((third / "checkpoints" / "LATEST").read_text().split("_")[1])
    assert stopped_at < 200

    again = subprocess.run(sweep_command(sweep_dir, data_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    for name in RUN_NAMES[:2]:
        assert f"run {name}: finished before, skipped" in out
    assert f"resuming from {third / 'checkpoints'}" in out and f"(step {stopped_at}," in out, out
    assert out.count("resuming from") == 1  # the fourth run started afresh

    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [row["run"] for row in summary["runs"]] == RUN_NAMES
    assert all(row["status"] == "finished" and 0.8 < row["eval/accuracy"] <= 1 and row["step"] == 200
               for row in summary["runs"])
    assert summary["best"] == max(summary["runs"], key=lambda row: row["eval/accuracy"])["run"]
    assert [row["--lr"] for row in summary["runs"]] == ["1e-3", "1e-3", "3e-3", "3e-3"]
    csv_lines = (sweep_dir / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,--lr,--batch-size,status,step,eval/accuracy") and len(csv_lines) == 5
    for name in RUN_NAMES:  # each run's own directory, with its arguments recorded
        spec = json.loads((sweep_dir / name / "spec.json").read_text())
        assert spec["recipe_args"][:4] == ["--lr", name.split("_")[1][3:], "--batch-size", name.split("=")[-1]]
        assert spec["options"]["wandb_group"] == "grid"  # the runs of a sweep are one W&B group
        assert len(metrics(sweep_dir / name, "epoch")) == 1

    report = run_dtrain("report", str(sweep_dir), "--metric", "train/loss")
    assert report.returncode == 0, report.stderr
    table = [line for line in report.stdout.splitlines() if "_lr=" in line]
    assert [line[2:].split()[0] for line in table] == RUN_NAMES and sum(line.startswith("*") for line in table) == 1
    assert "best run by train/loss (min)" in report.stderr
    assert (sweep_dir / "report" / "sweep.png").stat().st_size > 10_000
    written = (sweep_dir / "summary.json").read_text()
    refused = run_dtrain("report", str(sweep_dir), "--metric", "eval/precision")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip() == ("dtrain: error: no run of this sweep logged 'eval/precision'; pass --metric with "
                                      "one of eval/accuracy, train/loss.")
    assert (sweep_dir / "summary.json").read_text() == written  # nothing overwritten


def test_two_runs_at_once_each_with_its_own_console_log(tmp_path, data_dir):
    sweep_dir = tmp_path / "pair"
    out = subprocess.run([DTRAIN, "sweep", "recipes/mnist_mlp.py", "--cpu", "--wandb", "disabled", "--run-dir",
                          str(sweep_dir), "--checkpoint-every", "never", "--grid", "lr=1e-3,3e-3", "--parallel", "2",
                          "--", "--epochs", "1", "--limit-train-batches", "100", "--data-dir", data_dir],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stdout + out.stderr
    events = [line.split(": ", 2)[1:] for line in out.stderr.splitlines() if line.startswith("dtrain sweep pair:")]
    assert [e[1].split()[0] for e in events[:4]] == ["started", "started", "exit", "exit"], events  # both at once
    for name in ("000_lr=1e-3", "001_lr=3e-3"):
        assert "Test Acc:" in (sweep_dir / name / "logs" / "console.log").read_text()
        assert sweep.status(sweep_dir / name) == "finished"
