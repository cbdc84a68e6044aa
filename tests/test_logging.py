"""Rank-0 logging with real processes: one W&B offline run (read back from its file), evaluation
reports and torchmetrics metrics gathered across ranks, `dtrain report`, no secrets. (A resumed run continuing the same
W&B run: test_preemption.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from dtrain.outputs.report import classification_report

import wandb_file
from conftest import DTRAIN, ROOT, TEST_RECIPES, metrics, processes_with_env, run_dtrain

SECRET = "dummy0123456789abcdef0123456789abcdef0123"  # a WANDB_API_KEY that must never be written down


def rank_stderr(run_dir: Path, rank: int) -> str:
    return "".join(p.read_text() for p in (run_dir / "logs").glob(f"*/attempt_*/{rank}/stderr.log"))


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, data_dir):
    """2 processes, 60 steps, W&B offline, a (dummy) API key in the environment, imports traced."""
    run_dir = tmp_path_factory.mktemp("logging") / "run"
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir),
                     "--wandb", "offline", "--wandb-project", "tests", "--tags", "ci,mnist", "--",
                     "--epochs", "1", "--limit-train-batches", "60", "--log-every", "10", "--data-dir", data_dir,
                     env={"WANDB_API_KEY": SECRET, "PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


def test_one_offline_wandb_run_holds_the_history_and_the_final_evaluation(offline_run):
    run_dir, _ = offline_run
    files = offline_runs(run_dir)
    assert len(files) == 1, files
    history = wandb_file.history(files[0])
    train = [row for row in history if "samples_per_s" in row]
    assert [row["_step"] for row in train] == [10, 20, 30, 40, 50, 60]
    for row in train:
        assert {"train/loss", "lr", "grad_norm", "step_time_s"} <= row.keys() and row["lr"] == 0.001
    final = [row for row in history if "eval/accuracy" in row][-1]
    assert final["eval/accuracy"] == metrics(run_dir, "epoch")[-1]["eval/accuracy"] > 0.8
    assert final["train/epoch_loss"] == metrics(run_dir, "epoch")[-1]["train/epoch_loss"]
    assert wandb_file.run_id(files[0]) == (run_dir / "wandb" / "run-id").read_text().strip()


def test_the_start_up_is_logged_once_from_dtrain_launch_to_the_first_step(offline_run):
    run_dir, _ = offline_run
    startup = metrics(run_dir, "startup")
    assert [r["step"] for r in startup] == [1]
    launched = startup[0]["time"] - startup[0]["startup_s"]
    assert launched < (run_dir / "config.yaml").stat().st_mtime < startup[0]["time"]  # written by setup() in between


def test_only_rank_0_imports_wandb(offline_run):
    """-X importtime (PYTHONPROFILEIMPORTTIME) makes every process list its imports on its stderr."""
    run_dir, _ = offline_run
    imports_wandb = re.compile(r"\|\s+wandb(\.|$)", re.M)  # the wandb package or a module of it
    assert imports_wandb.search(rank_stderr(run_dir, 0))
    assert "| torch" in rank_stderr(run_dir, 1) and not imports_wandb.search(rank_stderr(run_dir, 1))


def test_without_a_terminal_progress_is_plain_lines(offline_run):
    _, out = offline_run
    assert "\r" not in out.stdout and "epoch 1/1 | batch 10/60 | step 10 | loss" in out.stdout


def test_the_api_key_is_in_no_output_and_no_file(offline_run):
    run_dir, out = offline_run
    assert processes_with_env("DTRAIN_RUN_DIR", str(run_dir)) == []  # W&B's service process included
    assert SECRET not in out.stdout + out.stderr
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_config_records_the_launch_hardware_versions_and_commit(offline_run):
    import yaml
    run_dir, _ = offline_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["world_size"] == 2 and config["launch"]["precision"] == "fp32"
    assert config["launch"]["tags"] == ["ci", "mnist"] and config["recipe_args"][:2] == ["--epochs", "1"]
    assert config["hardware"] and config["torch_version"] and config["dtrain_version"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert config["git"].removesuffix("-dirty") == head


def test_dtrain_report_draws_pngs_and_summarises(offline_run):
    run_dir, _ = offline_run
    out = run_dtrain("report", str(run_dir))
    assert out.returncode == 0, out.stderr
    for name in ("loss_lr.png", "accuracy.png", "confusion_matrix.png"):
        data = (run_dir / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert "accuracy" in out.stdout and "macro avg" in out.stdout and "weighted avg" in out.stdout
    # The recipe's class names (torchvision's for MNIST), in the evaluation's JSON (which the plot's axes read) and
    # in the console's report.
    names = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
             "8 - eight", "9 - nine"]
    evaluation = json.loads(sorted((run_dir / "eval").glob("epoch_*.json"))[-1].read_text())
    assert list(evaluation["report"]["classes"]) == names
    assert [line.split()[:3] for line in out.stdout.splitlines() if " - " in line] == [n.split() for n in names]


def test_evaluation_report_and_torchmetrics_from_two_ranks_equal_one_process(tmp_path, data_dir):
    both = {}
    for nproc in ("1", "2"):
        run_dir = tmp_path / f"eval{nproc}"
        out = run_dtrain("launch", str(TEST_RECIPES / "evaluate_mnist.py"), "--cpu", "--nproc", nproc,
                         "--run-dir", str(run_dir), "--wandb", "disabled", "--", data_dir)
        assert out.returncode == 0, out.stderr
        both[nproc] = json.loads((run_dir / "evaluation.json").read_text())
    results = {nproc: result["classifier"] for nproc, result in both.items()}
    assert results["1"]["confusion_matrix"] == results["2"]["confusion_matrix"]
    assert sum(map(sum, results["2"]["confusion_matrix"])) == 2_000
    assert results["1"]["report"] == results["2"]["report"]
    assert results["1"]["loss"] == pytest.approx(results["2"]["loss"], rel=1e-6)  # float32 batch losses
    metered = {nproc: result["torchmetrics"] for nproc, result in both.items()}  # 1,999 images: uneven shares
    for name in ("macro_f1_torchmetrics", "accuracy_torchmetrics", "loss"):
        assert metered["2"][name] == pytest.approx(metered["1"][name], rel=1e-6), name
    assert metered["2"]["accuracy_torchmetrics"] == pytest.approx(metered["2"]["accuracy"], rel=1e-6)
    assert metered["2"]["macro_f1_torchmetrics"] == pytest.approx(metered["2"]["report"]["macro_avg"]["f1"], rel=1e-6)


def test_classification_report_matches_hand_computed_values():
    report = classification_report([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # class 2: never true, never predicted
    assert report["classes"]["0"] == {"precision": 5 / 7, "recall": 5 / 6, "f1": 2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6),
                                      "support": 6}
    assert report["classes"]["1"]["precision"] == 3 / 4 and report["classes"]["1"]["recall"] == 3 / 5
    assert report["classes"]["2"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["accuracy"] == 8 / 11 and report["support"] == 11
    assert report["macro_avg"]["recall"] == pytest.approx((5 / 6 + 3 / 5 + 0) / 3)
    assert report["weighted_avg"]["recall"] == pytest.approx((6 * 5 / 6 + 5 * 3 / 5) / 11)


def test_rank_0_draws_a_progress_bar_on_a_terminal(tmp_path, data_dir):
    import os
    import pty

    args = ["launch", "recipes/mnist_cnn.py", "--cpu", "--run-dir", str(tmp_path / "tty"), "--wandb", "disabled",
            "--", "--epochs", "1", "--limit-train-batches", "30", "--limit-eval-batches", "4", "--log-every", "5", "--data-dir",
            data_dir]
    main, child = pty.openpty()  # a real terminal for dtrain's stdout
    proc = subprocess.Popen([DTRAIN, *args], cwd=ROOT, stdout=child, stderr=subprocess.PIPE)
    os.close(child)
    screen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed: every writer has exited
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=120) == 0
    text = screen.decode(errors="replace")
    frames = [f for f in text.split("\r") if f.startswith("[")]
    assert len(frames) >= 6 and "batch 30/30 | step 30" in frames[-1], text
    assert "Epoch 1/1 | Train Loss" in text


def test_a_failed_job_ends_its_wandb_run_as_failed_and_shows_one_traceback(tmp_path):
    run_dir = tmp_path / "fail"
    out = run_dtrain("launch", str(TEST_RECIPES / "fail_on_rank1.py"), "--cpu", "--nproc", "2",
                     "--run-dir", str(run_dir), "--wandb", "offline", timeout=120)
    assert out.returncode == 1
    assert (out.stdout + out.stderr).count("Traceback (most recent call last)") == 1  # not wandb's second copy
    # The W&B writer may still be finishing (its own session outlives rank 0 by a moment).
    deadline = time.monotonic() + 60
    while True:
        runs = offline_runs(run_dir)
        exits = [r.exit for r in wandb_file.records(runs[0]) if r.WhichOneof("record_type") == "exit"] if runs else []
        if exits or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [e.exit_code for e in exits] == [1]


def test_training_does_not_wait_for_wandb_and_goes_on_when_it_refuses_to_start(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--run-dir", str(run_dir), "--wandb", "offline",
                     "--wandb-project", "bad/name", "--checkpoint-every", "never", "--", "--epochs", "1",
                     "--limit-train-batches", "20", "--limit-eval-batches", "4", "--log-every", "5", "--data-dir", data_dir,
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dtrain: W&B stopped (UsageError: Invalid project name 'bad/name'" in out.stderr
    assert "the run goes on without it (metrics.jsonl has every row)." in out.stderr and "Traceback" not in out.stderr
    assert [r["step"] for r in metrics(run_dir, "train")] == [5, 10, 15, 20]


def test_the_trackers_process_reads_whole_lines_at_most_once_per_interval():
    """Batches keep the trackers' process (and wandb-core) from waking at every logged step."""
    from dtrain.outputs.trackers import line_batches

    read, write = os.pipe()
    os.write(write, b'{"step": 1}\n{"step"')
    batches = line_batches(read, interval=0.3)
    assert next(batches) == [b'{"step": 1}']
    os.write(write, b': 2}\n')
    os.write(write, b'{"step": 3}\n')
    os.close(write)
    start = time.monotonic()
    assert list(batches) == [[b'{"step": 2}', b'{"step": 3}']]  # the line split across writes is whole
    assert time.monotonic() - start >= 0.3
    os.close(read)


def test_an_offline_wandb_run_contacts_no_server(tmp_path, monkeypatch):
    """Offline means no network: on an air-gapped cluster a lookup of W&B's server can hang at the
    end of the run. (W&B's own usage telemetry is sent unless the process-wide mode is offline.)"""
    import socket

    from dtrain.runtime.logging import TrackerProcess

    with socket.create_server(("127.0.0.1", 0)) as server:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("WANDB_SILENT", "true")
        writer = TrackerProcess({"run_dir": str(tmp_path),
                                 "wandb": dict(dir=str(tmp_path), id="offline1", mode="offline", project="tests")})
        for step in range(1, 51):
            writer.send({"row": {"step": step, "kind": "train", "train/loss": 1.0 / step}})
        writer.finish(exit_code=0)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert len(offline_runs(tmp_path)) == 1
