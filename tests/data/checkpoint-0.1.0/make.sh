#!/usr/bin/env bash
# How the checkpoint beside this file was made: dtrain 0.1.0 (commit 0d89135), 2 CPU processes,
# tests/recipes/small_trainer.py stopped by --max-steps 8 (mid-epoch 2 of 3: 6 steps per epoch),
# with checkpoints every 5 steps; and the same recipe's final weights uninterrupted (18 steps).
# tests/test_compatibility.py resumes run/ with today's dtrain and compares with straight-model.pth.
# Arithmetic pinned to what every x86-64 CPU computes alike (the same variables as PINNED in that test):
# ATen's scalar kernels, oneDNN's SSE4.1 ones, MKL's reproducible path, one thread per process. Without
# them the weights depend on the CPU (AVX2, AVX-512, AMX: about 1e-8 apart after 18 steps).
# Run from the repository root of that commit, with tests/recipes/small_trainer.py copied in:
#   tests/data/checkpoint-0.1.0/make.sh
set -euo pipefail
export ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1
out="tests/data/checkpoint-0.1.0"
tmp="$(mktemp -d)"
common=(launch tests/recipes/small_trainer.py --cpu --nproc 2 --wandb disabled --seed 3)
dtrain "${common[@]}" --run-dir "$tmp/run" --checkpoint-every 5 --max-steps 8
dtrain "${common[@]}" --run-dir "$tmp/straight" --checkpoint-every never
rm -rf "$out/run" && mkdir -p "$out/run"
cp -r "$tmp/run/checkpoints" "$tmp/run/metrics.jsonl" "$tmp/run/config.yaml" "$out/run/"
cp "$tmp/straight/model.pth" "$out/straight-model.pth"
rm -rf "$tmp"
