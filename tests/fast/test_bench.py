"""The benchmarks' arithmetic on fixed inputs: what compare.py reads from the programs' epoch lines, the roof's
FLOPs and fractions, lm.py's cost per step, MFU and model sizes, time_to_accuracy.py's medians over seeds."""

from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import lm
import roofline

import compare

ROOF = roofline.Roof("AMD EPYC (AVX-512 BF16), 2 threads", {"fp32": 400.0, "bf16": 800.0}, (1024,))


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
    dtrain.precision, dtrain.flops_per_sample = "bf16", 25e6
    text = compare.render([dtrain], reference, [], [], ROOF.device, ROOF, 3, "python bench/compare.py")
    cells = {}
    for line in text.splitlines():
        if line.startswith(("| plain", "| dtrain")):
            cell = [c.strip() for c in line.strip("|").split("|")]
            cells[cell[0]] = cell
    # 1,500 samples/s x 25 MFLOP = 37.5 GFLOP/s, 4.7% of the bf16 roof; the reference's 750 of the fp32 one
    assert cells["dtrain, 1 process"] == ["dtrain, 1 process", "bf16", "1,500", "2.00x", "38", "4.7%", "98.30%",
                                          "99.10%", "90.0 s", "0.36", "9.5 s", "512 MiB"]
    assert cells["plain"][1:6] == ["fp32", "750", "1.00x", "19", "4.7%"]
    assert "AMD EPYC (AVX-512 BF16), 2 threads" in text.splitlines()[0]
    assert "dtrain, 1 process +0.00 points" in text


def test_the_roof_counts_two_flops_per_multiply_add_and_names_the_bf16_isa():
    assert roofline.matmul_flops(1024) == 2 * 1024 ** 3
    assert roofline.fraction(150e9, 400e9) == pytest.approx(0.375)
    assert ROOF.of("bf16") == 800e9
    assert roofline.bf16_isa(frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})) == "AMX"
    assert roofline.bf16_isa(frozenset({"avx512f", "avx512_bf16"})) == "AVX-512 BF16"
    assert roofline.bf16_isa(frozenset({"avx2", "fma"})) == "neither"


def test_the_cpu_is_named_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\nflags\t: fpu\n")
    assert roofline.cpu_name(str(cpuinfo)) == "AMD EPYC 9R14"
    assert roofline.cpu_name(str(tmp_path / "absent")) == "CPU"


def test_the_trainers_cost_is_the_median_and_quartiles_of_the_per_pair_differences():
    pairs = [(1.01, 1.00), (0.99, 1.00), (1.04, 1.00), (1.02, 1.00), (1.00, 1.00)]  # +1, -1, +4, +2, 0 %
    median, q1, q3 = lm.cost_percent(pairs)
    assert median == pytest.approx(1.0)
    assert q1 == pytest.approx(-0.5) and q3 == pytest.approx(3.0)
    assert lm.cost_percent([(1.1, 1.0)]) == pytest.approx((10.0, 10.0, 10.0))


def test_tokens_per_s_and_mfu_follow_from_the_step_time_and_the_roof():
    size = lm.SIZES["cpu"]
    assert lm.tokens_per_s(0.5, size) == size.batch * size.block * 2
    # 2,048 tokens/s x 60 MFLOP per token = 122.9 GFLOP/s, against an 800 GFLOP/s roof
    assert lm.mfu(2048, 60e6, ROOF.of("bf16")) == pytest.approx(0.1536)


def test_the_gpt_sizes_are_the_issues_and_the_count_is_the_models():
    sys.path.insert(0, str(ROOT / "recipes"))
    import tiny_gpt

    small = lm.Size(d_model=64, layers=2, heads=4, block=32, batch=2)
    model = tiny_gpt.TinyGPT(lm.VOCAB, small.block, small.d_model, small.layers, small.heads)
    assert small.parameters() == sum(p.numel() for p in model.parameters()) and len(tiny_gpt.VOCAB) == lm.VOCAB
    assert 10e6 <= lm.SIZES["cpu"].parameters() <= 30e6
    assert 340e6 <= lm.SIZES["gpu"].parameters() <= 360e6


def test_the_lm_table_gives_both_loops_and_the_trainers_cost():
    pairs = [(0.101, 0.100), (0.102, 0.100), (0.100, 0.100)]
    text = lm.render("cpu", lm.SIZES["cpu"], "bf16", ROOF, 60e6, pairs, "python bench/lm.py")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 100.0 | 10,240 | 76.8% |" in rows["hand-written loop"]  # 1,024 tokens per 0.1 s, x 60 MFLOP / 800 G
    assert "| 101.0 | 10,139 |" in rows["dtrain Trainer"]
    assert "median +1.00% (quartiles +0.00%, +2.00%)" in text


def test_time_to_accuracy_gives_the_median_of_the_seeds_and_whether_every_seed_reached_it():
    import time_to_accuracy as tta

    def run(seed, training_s):
        return tta.Result(f"dtrain, fast, seed {seed}", 20.0, 0.991 if training_s else 0.987,
                          end_to_end_s=training_s and training_s + 2.5, training_s=training_s, step=400,
                          samples_per_s=10_000.0, samples_per_s_range=(9_000.0, 11_000.0), precision="bf16",
                          flops_per_sample=25e6)

    runs = [run(seed, t) for seed, t in enumerate([12.0, 14.0, 11.0, 13.5, 12.5])]
    assert tta.seeds_summary(runs) == (12.5, True)
    assert tta.seeds_summary([*runs[:4], run(4, None)]) == (12.75, False)
    text = tta.render(runs, {"dtrain, fast": runs}, ROOF, 0.99, "python bench/time_to_accuracy.py --seeds 5")
    assert "| dtrain, fast, seed 0 | bf16 | 14.5 s | 12.00 s | 2.5 s | 400 | 99.10% | 10,000 (9,000..11,000) | 31.2% |" in text
    assert "dtrain, fast: median training time of 5 seeds 12.50 s; every seed reached the target." in text


def test_the_malloc_table_gives_each_settings_median_and_the_pairs_speed_up():
    import argparse

    import malloc

    assert malloc.speedups([(5_000.0, 9_000.0), (6_000.0, 9_000.0), (4_000.0, 8_000.0)]) == (1.8, 1.5, 2.0)
    before, after = malloc.SETTINGS
    runs = {before: [{"samples_per_s": 5_000.0, "faults_per_step": 15_000.0},
                     {"samples_per_s": 6_000.0, "faults_per_step": 14_000.0}],
            after: [{"samples_per_s": 9_000.0, "faults_per_step": 0.0},
                    {"samples_per_s": 9_600.0, "faults_per_step": 2.0}]}
    args = argparse.Namespace(batch_size=256, precision="bf16", pairs=2, steps=60, settle=10)
    text = malloc.render(args, "AMD EPYC (AVX-512 BF16), 2 threads", runs, "python bench/malloc.py --pairs 2")
    assert "| glibc's thresholds | 5,500 | 5,000..6,000 | 14,500 |" in text
    assert "| dtrain's for CPU workers | 9,300 | 9,000..9,600 | 1 |" in text
    assert "Speed-up of the pairs: median 1.70x (range 1.60x..1.80x)." in text
