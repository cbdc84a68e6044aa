"""What `--precision auto` picks on this machine, and bf16 against fp32 here, paired in one run.

    DTRAIN_DATA_DIR=../shared/data python bench/precision_auto.py [--rounds 3] [--batches 120]

The MNIST recipe on one CPU process (or one GPU), `--precision fp32` and `--precision bf16` alternated
(ABBA), W&B and checkpoints off; each run's speed is the median of its logged samples/s after the first
row. Prints the CPU's bf16 features, auto's choice, and the bf16 / fp32 ratio per round: auto's speed-up
is that ratio where it picks bf16, and 1 where it picks fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dtrain.core import hardware, spec  # noqa: E402

from compare import logged_samples_per_s  # noqa: E402

DTRAIN = str(Path(sys.executable).parent / "dtrain")


def samples_per_s(precision: str, batches: int, data_dir: str, scratch: Path) -> float:
    run_dir = scratch / f"{precision}-{len(list(scratch.iterdir()))}"
    device = ["--gpus", "1"] if hardware.visible_gpus() else ["--cpu"]
    subprocess.run([DTRAIN, "launch", "recipes/mnist_cnn.py", *device, "--precision", precision, "--wandb", "disabled",
                    "--checkpoint-every", "never", "--run-dir", str(run_dir), "--", "--epochs", "1",
                    "--limit-train-batches", str(batches), "--log-every", "20", "--data-dir", data_dir],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return statistics.median(logged_samples_per_s(run_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT / "data")))
    args = parser.parse_args()
    flags = hardware.cpu_flags()
    gpus = hardware.visible_gpus()
    capability = hardware.min_compute_capability() if gpus else None
    chosen = spec.auto_precision("cuda" if gpus else "cpu", flags, capability)
    print(json.dumps({"bf16 features": sorted(f for f in flags if "bf16" in f or f.startswith("amx")),
                      "compute capability": capability, "auto picks": chosen}))
    scratch = Path(tempfile.mkdtemp(prefix="dtrain-bench-precision-"))
    ratios = []
    for i in range(args.rounds):
        order = ("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")
        speed = {p: samples_per_s(p, args.batches, args.data_dir, scratch) for p in order}
        ratios.append(speed["bf16"] / speed["fp32"])
        print(f"round {i + 1}: fp32 {speed['fp32']:,.0f} samples/s, bf16 {speed['bf16']:,.0f}, "
              f"bf16 / fp32 {ratios[-1]:.3f}", flush=True)
    median = statistics.median(ratios)
    print(f"bf16 / fp32: median {median:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.rounds} rounds; "
          f"auto ({chosen}) / fp32: {median if chosen == 'bf16' else 1.0:.3f}")


if __name__ == "__main__":
    main()
