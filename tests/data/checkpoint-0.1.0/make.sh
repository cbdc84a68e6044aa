#!/usr/bin/env bash
# How the checkpoint beside this file was made: dtrain 0.1.0 (commit 0d89135), 2 CPU processes,
# tests/recipes/small_trainer.py stopped by --max-steps 8 (mid-epoch 2 of 3: 6 steps per epoch),
# with checkpoints every 5 steps; and the same recipe's final weights uninterrupted (18 steps).
# tests/test_compatibility.py resumes run/ with today's dtrain and compares with straight-model.pth.
# Run from the repository root of that commit: tests/data/checkpoint-0.1.0/make.sh
set -euo pipefail
out="tests/data/checkpoint-0.1.0"
tmp="$(mktemp -d)"
common=(launch tests/recipes/small_trainer.py --cpu --nproc 2 --wandb disabled --seed 3)
dtrain "${common[@]}" --run-dir "$tmp/run" --checkpoint-every 5 --max-steps 8
dtrain "${common[@]}" --run-dir "$tmp/straight" --checkpoint-every never
rm -rf "$out/run" && mkdir -p "$out/run"
cp -r "$tmp/run/checkpoints" "$tmp/run/metrics.jsonl" "$tmp/run/config.yaml" "$out/run/"
cp "$tmp/straight/model.pth" "$out/straight-model.pth"
rm -rf "$tmp"
