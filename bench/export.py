"""`dtrain export`'s cost on this machine: seconds per format and artifact size, for the MNIST CNN and tiny_gpt.

    python bench/export.py [--repeats 3] [--out bench/RESULTS.md]

Each model is trained a few steps on one CPU process (the weights' values do not change the cost), then exported
to every format `--repeats` times; the table gives each step's median and range over the repeats, from export.json:
tracing with torch.export (shared by pt2 and onnx), writing each format, loading all of them back in a fresh
process and running them (the check), and the whole command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compare import dtrain_launch, publish

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # label -> (recipe, recipe arguments, export options)
    "MNIST CNN": ("recipes/mnist_cnn.py", ["--epochs", "1"], ["--dynamic-batch"]),
    "tiny_gpt (4 layers, d 128, block 128)": ("recipes/tiny_gpt.py", ["--max-chars", "100000"], []),
}


def run(*argv: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True,
                   env={**os.environ, "WANDB_MODE": "disabled"})
    return time.perf_counter() - start


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dtrain-bench-export-"))
    rows = []
    for label, (recipe, recipe_args, options) in MODELS.items():
        run_dir = work / Path(recipe).stem
        run(*dtrain_launch(ROOT / recipe, 1, run_dir, False, "--max-steps", "5", "--", *recipe_args))
        records, wall = [], []
        for repeat in range(args.repeats):
            out = work / f"{run_dir.name}-{repeat}"
            wall.append(run(sys.executable, "-m", "dtrain.cli", "export", str(run_dir), "--out", str(out), *options))
            records.append(json.loads((out / "export.json").read_text()))
        formats = records[0]["formats"]
        rows.append((label, "trace (torch.export)", "", spread([r["trace_seconds"] for r in records]), ""))
        for name, entry in formats.items():
            size = sum(entry["files"].values()) / 1e6
            rows.append((label, name, f"{size:.2f} MB", spread([r["formats"][name]["seconds"] for r in records]),
                         f"{max(r['formats'][name]['max_abs_diff'] for r in records):.2g}"))
        rows.append((label, "check (fresh process)", "", spread([r["check_seconds"] for r in records]), ""))
        rows.append((label, "the whole `dtrain export`", "", spread(wall), ""))
    lines = [f"### Export ({os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')})", "",
             f"`python bench/export.py --repeats {args.repeats}`: seconds as median (min-max) of {args.repeats}; "
             "the max abs diff is the artifact's largest distance from the eager fp32 model's outputs.", "",
             "| model | step | size | seconds | max abs diff |", "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    publish("\n".join(lines) + "\n", args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
