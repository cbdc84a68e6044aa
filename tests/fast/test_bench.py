"""bench/compare.py's arithmetic: what it reads from the programs' epoch lines and how it reports it."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import compare


def test_both_programs_epoch_lines_are_read_and_others_ignored():
    assert compare.parse_epoch_line("Epoch 2/3 | Train Loss: 0.0521 | Test Acc: 98.91%\n") == (2, 98.91)
    assert compare.parse_epoch_line("[rank0]: Epoch 1/10 | Train Loss: 0.2547 | Test Acc: 98.23%") == (1, 98.23)
    assert compare.parse_epoch_line("epoch 1/1 | batch 50/100 | step 50 | loss 1.0750 | 1,840 samples/s") is None


def test_samples_per_s_leaves_out_the_first_epoch_and_its_start_up():
    assert compare.samples_per_s([100.0, 160.0, 220.0]) == pytest.approx(1000.0)
    assert compare.samples_per_s([100.0]) is None


def result(label, times, accuracies, **extra):
    return compare.Result(label, times, accuracies, peak_memory_mib=512.0, **extra)


def test_time_to_accuracy_is_the_first_epoch_at_or_above_the_target():
    assert compare.time_to_accuracy(result("r", [80, 160, 240], [98.4, 99.0, 99.1])) == 160
    assert compare.time_to_accuracy(result("r", [80, 160], [98.4, 98.9])) is None


def test_the_table_holds_ratios_against_the_reference():
    reference = result("plain", [90.0, 170.0, 250.0], [98.4, 98.9, 99.1])
    dtrain = result("dtrain, 1 process", [50.0, 90.0, 130.0], [98.3, 99.0, 99.1], startup_s=9.5)
    text = compare.render([dtrain], reference, [], [], "2 CPU cores", 3, "python bench/compare.py")
    row = next(line for line in text.splitlines() if line.startswith("| dtrain, 1 process"))
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "dtrain, 1 process", "1,500", "2.00x", "98.30%", "99.10%", "90.0 s", "0.36", "9.5 s", "512 MiB"]
