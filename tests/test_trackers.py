"""TensorBoard and MLflow beside metrics.jsonl, read back with their own readers: the same scalars, one MLflow
run across a crash or a preemption with no step logged twice, a local store and a real `mlflow server`, and
a tracking server that is down or refuses the run does not stop training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dtrain.core import contract
from dtrain.core import metrics as metrics_file
from dtrain.core.hardware import free_port
from dtrain.core.rundir import RunDir
from dtrain.outputs import trackers

import wandb_file
from conftest import DTRAIN, ROOT, metrics, run_dtrain

RECIPE = "recipes/mnist_mlp.py"


def launch_mlp(run_dir: Path, data_dir: str, *options: str, batches: int = 80, env: dict | None = None):
    """The MLP on 1 CPU process, a train row every 5 steps (W&B disabled unless `options` say otherwise)."""
    return run_dtrain("launch", RECIPE, "--cpu", "--wandb", "disabled", "--run-dir", str(run_dir), *options, "--",
                      "--epochs", "1", "--limit-train-batches", str(batches), "--log-every", "5",
                      "--data-dir", data_dir, env=env, timeout=300)


def jsonl_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in metrics(run_dir):
        for key, value in trackers.numbers(row).items():
            series.setdefault(key, []).append((row["step"], value))
    return series


def tensorboard_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_series(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def assert_same(expected: dict, got: dict, rel: float) -> None:
    """The same series, steps and values (a series may hold two values at a step: the recipe logs `lr` in
    its last train row and, after the scheduler's step, in its epoch row)."""
    assert sorted(got) == sorted(expected)
    for key in expected:
        points, found = sorted(expected[key]), sorted(got[key])
        assert [s for s, _ in found] == [s for s, _ in points], key
        assert [v for _, v in found] == pytest.approx([v for _, v in points], rel=rel), key


def test_tensorboard_and_a_local_mlflow_store_hold_metrics_jsonl_across_a_crash(tmp_path, data_dir):
    """W&B (offline), TensorBoard and MLflow at once; killed at the third save (step 60), resumed from step 40."""
    run_dir = tmp_path / "run"
    options = ("--wandb", "offline", "--tensorboard", "--mlflow", "--checkpoint-every", "20")
    crashed = launch_mlp(run_dir, data_dir, *options, env={contract.TEST_CRASH_AT: "started:0:3"})  # at step 60
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    resumed = launch_mlp(run_dir, data_dir, *options)  # while the crashed attempt's trackers may still be ending
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "(step 40," in resumed.stdout
    assert "Traceback" not in resumed.stderr and "INFO" not in resumed.stderr

    expected = jsonl_series(run_dir)
    assert [s for s, _ in expected["train/loss"]] == list(range(5, 85, 5))  # 45-60 replayed, logged once
    assert_same(expected, tensorboard_series(run_dir), rel=1e-6)  # float32 in event files

    store = trackers.mlflow_store("auto", {}, run_dir)
    client = MlflowClient(store["uri"])
    run_id = (RunDir(run_dir).mlflow / "run-id").read_text().strip()
    assert_same(expected, mlflow_series(client, run_id), rel=1e-12)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lr"] == "0.001" and run.data.params["dtrain.checkpoint_every"] == "20"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "dtrain"
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]  # one run, continued
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"model.pth", "report/loss_lr.png", "report/accuracy.png"} <= artifacts, artifacts
    assert experiment.artifact_location.startswith((RunDir(run_dir).mlflow).resolve().as_uri())

    attempts = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(attempts) == 2 and {wandb_file.run_id(a) for a in attempts} == {
        (run_dir / "wandb" / "run-id").read_text().strip()}
    wandb_steps = [row["_step"] for a in attempts for row in wandb_file.history(a) if "train/loss" in row]
    assert wandb_steps == list(range(5, 85, 5))


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on localhost with a SQLite backend; stopped with every process it started."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runners, nor their /dev/shm stores
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.3)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # its job consumers, if any outlived it
    except ProcessLookupError:
        pass
    server.wait()


def test_a_preempted_run_continues_the_same_run_on_an_mlflow_server(tmp_path, data_dir, mlflow_server):
    run_dir = tmp_path / "run"
    command = [DTRAIN, "launch", RECIPE, "--cpu", "--wandb", "disabled", "--run-dir", str(run_dir), "--mlflow",
               mlflow_server, "--mlflow-experiment", "preempted", "--checkpoint-every", "never", "--",
               "--epochs", "1", "--log-every", "10", "--data-dir", data_dir]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(r["kind"] == metrics_file.TRAIN for r in _rows(run_dir)):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    first.send_signal(signal.SIGUSR2)  # as SLURM's pre-timeout signal: checkpoint, stop
    out, err = first.communicate(timeout=120)
    assert "stopped at step" in out, out + err
    run_id = (RunDir(run_dir).mlflow / "run-id").read_text().strip()
    client = MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    assert (RunDir(run_dir).mlflow / "run-id").read_text().strip() == run_id
    expected = jsonl_series(run_dir)
    assert len(expected["train/loss"]) == 93  # 938 batches, a row every 10 steps: none lost, none twice
    assert_same(expected, mlflow_series(client, run_id), rel=1e-12)
    experiment = client.get_experiment_by_name("preempted")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "model.pth" in {a.path for a in client.list_artifacts(run_id)}


def _rows(run_dir: Path) -> list[dict]:
    try:
        return metrics(run_dir)
    except Exception:
        return []


def test_a_tracking_server_that_refuses_the_run_or_is_down_does_not_stop_training(tmp_path, data_dir, mlflow_server):
    client = MlflowClient(mlflow_server)
    client.delete_experiment(client.create_experiment("deleted"))
    refused = launch_mlp(tmp_path / "refused", data_dir, "--mlflow", mlflow_server, "--mlflow-experiment", "deleted",
                         batches=20)
    down = launch_mlp(tmp_path / "down", data_dir, "--mlflow", f"http://user:secret@127.0.0.1:{free_port()}",
                      batches=20)
    for out, run_dir in ((refused, tmp_path / "refused"), (down, tmp_path / "down")):
        assert out.returncode == 0, out.stderr[-2000:]
        warnings = [line for line in out.stderr.splitlines() if "MLflow stopped" in line]
        assert len(warnings) == 1 and warnings[0].startswith("dtrain: MLflow stopped ("), out.stderr
        assert warnings[0].endswith("the run goes on without it (metrics.jsonl has every row).")
        assert "Traceback" not in out.stderr and "secret" not in out.stderr
        assert [r["step"] for r in metrics(run_dir, metrics_file.TRAIN)] == [5, 10, 15, 20]
    assert "deleted" in [line for line in refused.stderr.splitlines() if "MLflow stopped" in line][0]
    config = (tmp_path / "down" / "config.yaml").read_text()
    assert "user:***@127.0.0.1" in config and "secret" not in config
