"""metrics.jsonl's schema and its one reader: kinds in the row, one name per series, old runs read alike."""

from __future__ import annotations

import json
import shutil

import pytest

from dtrain.core import metrics
from dtrain.core.rundir import RunDir
from dtrain.errors import UsageError

from conftest import ROOT, file_size_limit


def test_rows_state_their_kind_and_keep_their_own_fields_apart():
    row = metrics.row(40, metrics.TRAIN, {"train/loss": 0.5})
    assert (row["step"], row["kind"], row["train/loss"]) == (40, "train", 0.5) and row["time"] > 0
    assert metrics.series(row) == {"train/loss": 0.5}
    with pytest.raises(UsageError, match="kind is one of train, epoch, eval, target, startup"):
        metrics.row(1, "bogus", {})
    with pytest.raises(UsageError, match="'step' names a metrics row's own field"):
        metrics.row(1, metrics.TRAIN, {"step": 3})


def test_a_run_of_release_0_1_0_reads_with_todays_kinds_and_names(tmp_path):
    """Its rows carry no kind, and its epoch rows call the epoch mean train/loss."""
    shutil.copy(ROOT / "tests" / "data" / "checkpoint-0.1.0" / "run" / "metrics.jsonl", tmp_path)
    rows = metrics.read(tmp_path)
    assert [r["kind"] for r in rows] == ["startup", "train", "train", "train", "epoch", "train", "epoch"]
    epoch = metrics.read(tmp_path, of_kind=metrics.EPOCH)[0]
    assert "train/loss" not in epoch and epoch["train/epoch_loss"] == pytest.approx(1.4322, abs=1e-4)
    assert [r["step"] for r in metrics.read(tmp_path, of_kind=metrics.TRAIN)] == [2, 4, 6, 8]


def test_a_last_line_cut_short_is_left_out_and_damage_elsewhere_is_named(tmp_path):
    good = json.dumps(metrics.row(1, metrics.TRAIN, {"lr": 0.1}))
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n{good}\n{good[:10]}")
    assert len(metrics.read(tmp_path)) == 2
    (tmp_path / "metrics.jsonl").write_text(f"{good[:10]}\n{good}\n")
    with pytest.raises(UsageError, match="line 1 is not JSON"):
        metrics.read(tmp_path)
    with pytest.raises(UsageError, match="has no metrics.jsonl"):
        metrics.read(tmp_path / "nothing")


def test_a_report_that_does_not_fit_is_one_sentence_and_leaves_no_partial_png(tmp_path):
    """RLIMIT_FSIZE cuts the PNG short, as a full disk does; the next report, with room, draws it."""
    from dtrain.outputs import report

    rows = [metrics.row(step, metrics.TRAIN, {"train/loss": 1 / step, "lr": 0.1}) for step in range(1, 30)]
    RunDir(tmp_path).metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records, evaluations = report.read_run(tmp_path)
    with file_size_limit(2000), pytest.raises(UsageError) as refused:
        report.plot(tmp_path, records, evaluations)
    assert str(refused.value) == (f"cannot write {tmp_path / 'report' / 'loss_lr.png'} (File too large); free space in "
                                  f"{tmp_path / 'report'}, or report a copy of the run directory on a disk with room.")
    assert not list((tmp_path / "report").iterdir())
    assert [png.name for png in report.plot(tmp_path, records, evaluations)] == ["loss_lr.png"]
    assert (tmp_path / "report" / "loss_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
