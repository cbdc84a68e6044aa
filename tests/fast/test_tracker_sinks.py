"""The trackers' process, in-process: where MLflow writes, secrets kept out of messages, rows passed on in
batches to a real TensorBoard writer and read back with TensorBoard's reader, a failing tracker dropped."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dtrain.core.rundir import RunDir
from dtrain.outputs import trackers


def test_mlflow_without_a_uri_uses_the_environments_or_a_store_in_the_run_directory(tmp_path):
    local = trackers.mlflow_store("auto", {}, tmp_path)
    assert local == {"uri": f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}",
                     "artifact_location": (tmp_path.resolve() / "mlflow" / "artifacts").as_uri()}
    assert trackers.mlflow_store("auto", {"MLFLOW_TRACKING_URI": "http://h:5000"}, tmp_path)["uri"] == "http://h:5000"
    assert trackers.mlflow_store("http://x:1", {"MLFLOW_TRACKING_URI": "http://h:5000"}, tmp_path) == \
        {"uri": "http://x:1", "artifact_location": None}


def test_a_password_in_a_uri_is_never_shown():
    assert trackers.redact("failed: https://me:t0ken@host:443/api/x") == "failed: https://me:***@host:443/api/x"
    assert trackers.redact("postgresql://u:p@db/mlflow and http://h:5000") == "postgresql://u:***@db/mlflow and http://h:5000"


def test_only_numbers_go_to_a_tracker():
    row = {"step": 3, "time": 1.0, "kind": "train", "train/loss": 0.5, "epoch": 2, "note": "x", "flag": True}
    assert trackers.numbers(row) == {"train/loss": 0.5, "epoch": 2.0}


def test_rows_reach_tensorboard_and_a_tracker_that_fails_is_dropped_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    group = trackers.Trackers({"run_dir": str(tmp_path), "tensorboard": {},
                               "mlflow": {"uri": "http://u:pw@127.0.0.1:9", "artifact_location": None,
                                          "experiment": "e", "run_name": "r"}})
    assert [type(s) for s in group.sinks] == [trackers.TensorBoardSink]
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1 and said[0].startswith("dtrain: MLflow stopped (") and "pw" not in said[0]
    messages = [{"row": {"step": s, "time": 100.0 + s, "kind": "train", "train/loss": 1 / s}} for s in (1, 2)]
    assert group.take([*messages, {"step": 2, "evaluation": {}}, {"exit_code": 0}]) == 0
    group.each("finish", 0)
    events = EventAccumulator(str(RunDir(Path(tmp_path)).tensorboard))
    events.Reload()
    assert [(e.step, e.value, e.wall_time) for e in events.Scalars("train/loss")] == [(1, 1.0, 101.0), (2, 0.5, 102.0)]
