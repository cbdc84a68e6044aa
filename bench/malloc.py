"""What keeping freed memory saves a CPU training step: the MNIST recipe's model trained with glibc's own
malloc thresholds and with the ones `dtrain launch` gives CPU workers (`contract.CPU_MALLOC`), alternated.

    python bench/malloc.py [--pairs 4] [--steps 60] [--settle 10] [--batch-size 256] [--precision bf16]
                           [--out bench/RESULTS.md]

Each run is a child process that builds the recipe's model and optimizer (`mnist_cnn.build`, the recipe's
defaults), trains `--settle` untimed steps and then `--steps` timed ones on random images (autocast in
`--precision`), and prints its samples/s and its page faults per timed step (minor faults: a page touched for
the first time since the system handed it over). The two settings alternate in ABBA order over `--pairs`
pairs; the table gives each one's median and the median speed-up of the pairs with its range.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))
import roofline  # noqa: E402

from dtrain.core import contract, hardware  # noqa: E402

from compare import publish  # noqa: E402

SETTINGS = {"glibc's thresholds": {}, "dtrain's for CPU workers": contract.CPU_MALLOC}


def speedups(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """The median, least and greatest speed-up over (before, after) pairs of samples/s."""
    ratios = [after / before for before, after in pairs]
    return statistics.median(ratios), min(ratios), max(ratios)


def render(args: argparse.Namespace, device: str, runs: dict[str, list[dict[str, float]]], command: str) -> str:
    before, after = SETTINGS
    median, least, most = speedups([(b["samples_per_s"], a["samples_per_s"])
                                    for b, a in zip(runs[before], runs[after], strict=True)])
    lines = [
        f"### Freed memory kept for reuse: the MNIST recipe's step on CPU ({device}), {time.strftime('%Y-%m-%d')}",
        "",
        f"`{command}`: batch {args.batch_size}, {args.precision}, {args.pairs} pairs of child processes "
        f"(ABBA), {args.steps} timed steps each after {args.settle} untimed. dtrain's setting: "
        + ", ".join(f"`{name}={value}`" for name, value in contract.CPU_MALLOC.items()) + ".",
        "",
        "| malloc | samples/s (median) | range | page faults per step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, results in runs.items():
        rates = [r["samples_per_s"] for r in results]
        faults = statistics.median(r["faults_per_step"] for r in results)
        lines.append(f"| {label} | {statistics.median(rates):,.0f} | {min(rates):,.0f}..{max(rates):,.0f} | "
                     f"{faults:,.0f} |")
    lines += ["", f"Speed-up of the pairs: median {median:.2f}x (range {least:.2f}x..{most:.2f}x)."]
    return "\n".join(lines) + "\n"


def child(args: argparse.Namespace) -> None:
    """One run: train the recipe's model and print its samples/s and page faults per step as JSON."""
    import torch
    from torch import nn

    import mnist_cnn

    model, optimizer = mnist_cnn.build(mnist_cnn.parse_args([]))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 1, 28, 28, generator=generator)
    labels = torch.randint(10, (args.batch_size,), generator=generator)
    loss_fn = nn.CrossEntropyLoss()

    def train(steps: int) -> None:
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    train(args.settle)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    train(args.steps)
    seconds = time.perf_counter() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    print(json.dumps({"samples_per_s": args.batch_size * args.steps / seconds, "faults_per_step": faults / args.steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--settle", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    base = {name: value for name, value in os.environ.items() if name not in contract.CPU_MALLOC}
    base["OMP_NUM_THREADS"] = str(hardware.cpu_count())
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in SETTINGS}
    for pair in range(args.pairs):
        for label in (list(SETTINGS) if pair % 2 == 0 else list(SETTINGS)[::-1]):
            out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env={**base, **SETTINGS[label]},
                                 capture_output=True, text=True, check=True)
            runs[label].append(json.loads(out.stdout.splitlines()[-1]))
            print(f"[malloc] pair {pair + 1}, {label}: {runs[label][-1]}", flush=True)
    publish(render(args, roofline.cpu_device(hardware.cpu_count()), runs, " ".join(["python bench/malloc.py", *sys.argv[1:]])), args.out)


if __name__ == "__main__":
    main()
