"""The `system` row from every rank's measurements, the GPU peak table, and the trace window."""

from __future__ import annotations

import pytest

from dtrain.core.hardware import peak_tflops
from dtrain.core.options import parse_trace
from dtrain.errors import UsageError
from dtrain.runtime.performance import StepClock, system_row


def test_the_rank_that_computed_longest_is_the_slowest_whatever_the_wall_clock():
    # [compute, data, comm per step, samples/s, resident GB, peak GB, 0, 0]: rank 2 computes longest and waits least.
    ranks = [[0.010, 0.001, 0.030, 1600.0, 1.0, 1.2, 0, 0], [0.012, 0.002, 0.028, 1600.0, 1.1, 1.3, 0, 0],
             [0.040, 0.001, 0.000, 1600.0, 0.9, 1.0, 0, 0]]
    row, warning = system_row(ranks, "cpu", flops_per_sample=25e6, peak_tflops=None)
    assert row["slowest_rank"] == 2
    assert (row["compute_s/min"], row["compute_s/median"], row["compute_s/max"]) == (0.010, 0.012, 0.040)
    assert (row["memory/rss_gb"], row["memory/peak_rss_gb"]) == (1.1, 1.3)
    assert row["tflops"] == pytest.approx(25e6 * 1600 / 1e12) and "mfu" not in row and warning is None


def test_mfu_only_against_a_peak_and_never_over_one():
    gpu = [[0.1, 0.0, 0.0, 1000.0, 10.0, 12.0, 1, 0]] * 2
    row, warning = system_row(gpu, "cuda", flops_per_sample=1e11, peak_tflops=400.0)
    assert row["tflops"] == pytest.approx(100.0) and row["mfu"] == pytest.approx(0.25) and warning is None
    assert (row["memory/max_allocated_gb"], row["memory/alloc_retries"], row["memory/ooms"]) == (10.0, 2, 0)
    row, warning = system_row(gpu, "cuda", flops_per_sample=1e11, peak_tflops=50.0)
    assert "mfu" not in row and "exceed the peak of 50" in warning
    row, _ = system_row(gpu, "cuda", flops_per_sample=None, peak_tflops=400.0)
    assert "tflops" not in row and "mfu" not in row


def test_the_peak_table_by_device_name_and_precision():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H200", "fp32") == 66.9
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp16") == 312.0
    assert peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None


def test_waits_of_dtrains_own_collectives_are_counted_from_the_interval_start():
    waited = [2.0]
    clock = StepClock(lambda: waited[0])
    waited[0] += 0.5
    clock.steps = 5
    compute, data, comm, _ = clock.measure()
    assert comm == pytest.approx(0.1) and data == 0.0


def test_the_trace_window():
    assert parse_trace("10,2,3") == (10, 2, 3)
    for text in ("10,2", "a,b,c", "1,1,0"):
        with pytest.raises(UsageError, match="give WAIT,WARMUP,ACTIVE step counts"):
            parse_trace(text)


def test_the_preflight_names_a_rank_slower_than_the_others_median_by_half():
    from dtrain.launch.doctor import preflight_lines, slow_ranks

    assert slow_ranks([1.0, 1.1, 0.95, 1.6]) == [(3, 1.6)]
    assert slow_ranks([1.0, 1.4]) == [] and slow_ranks([0.31, 1.58]) == [(1, 1.58 / 0.31)]
    assert slow_ranks([2.0]) == []
    result = {"device": "cpu", "world_size": 2, "all_reduce": {"bytes": 8 * 2**20, "seconds": 0.0072, "bus_gbps": 1.17},
              "ranks": [{"rank": 1, "host": "b", "matmul_s": 0.00158, "tflops": 0.0212},
                        {"rank": 0, "host": "a", "matmul_s": 0.00031, "tflops": 0.107}]}
    lines, slow = preflight_lines(result)
    assert [rank for rank, _ in slow] == [1]
    assert lines[1] == "  rank 0 (a): matmul 0.31 ms, 107.0 GFLOP/s"
    assert lines[2].startswith("  rank 1 (b): matmul 1.58 ms, 21.2 GFLOP/s   <- 5.1x")
    assert lines[3] == "  all-reduce of 8 MiB: 7.2 ms, bus bandwidth 1.17 GB/s"
    assert lines[4].startswith("dtrain: rank 1 on b is slower than the others: its matmul took 5.1x their median")
