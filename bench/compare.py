"""dtrain's MNIST recipe against the plain PyTorch program it replaces, in one run, on the same data.

    python bench/compare.py [--epochs 3] [--nproc 1,2] [--precision auto] [--variants] [--out bench/RESULTS.md]

Measures this machine's roof first (`bench/roofline.py`: fp32 and bf16 matmul rate), then runs
`bench/reference/mnist_plain.py` (1 process, its own DataLoader with 4 workers, fp32), then
`dtrain launch recipes/mnist_cnn.py --precision auto` with the README's other defaults on 1 and 2
CPU processes (or GPUs, where present), each for `--epochs` epochs, one after another. Both print
one line per epoch; this script notes when each line arrives. It reports:
- samples/s: 60,000 training samples over the mean time between consecutive epoch lines
  (training plus the test pass; epoch 1 is left out, as it holds the start-up),
- GFLOP/s: those samples/s times the model's FLOPs per sample (dtrain's count, in its run's
  config.yaml), and that as a fraction of the roof of the precision the program trained in,
- accuracy after epoch 1 and after the last (equal accuracy: within 0.2 points), and the time
  from the command's start to the first epoch line at or above 99.0% test accuracy,
- peak memory: the largest sum of anonymous resident memory (not libraries or other mapped
  files) over the command's process tree, sampled every 0.5 s (DataLoader workers, launcher and
  W&B processes included),
- dtrain's start-up: the seconds from `dtrain launch` to the end of the first optimizer step
  (`startup_s` in the run's metrics.jsonl).
It then runs `bench/step_time.py` on the same process counts: the milliseconds of a step's
compute, gradient all-reduce and optimizer step, which explain how 2 processes scale.
With `--variants` it also trains one epoch of dtrain on 1 process with each of the recipe's
speed options turned the other way (--no-fused, --no-channels-last, --compile) and reports the
median of the logged samples/s, so that the recipe's defaults are measured, not assumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import roofline  # noqa: E402

from dtrain.core import hardware, metrics  # noqa: E402  (no torch: GPU count from CUDA_VISIBLE_DEVICES / nvidia-smi)
from dtrain.core.rundir import RunDir  # noqa: E402

TRAIN_SAMPLES = 60_000
TARGET_ACCURACY = 99.0
STEP_TIME = "STEP_TIME "  # the prefix of bench/step_time.py's result line
_EPOCH_LINE = re.compile(r"Epoch (\d+)/\d+ \| Train Loss: [\d.]+ \| Test Acc: ([\d.]+)%")


@dataclasses.dataclass
class Result:
    label: str
    epoch_times: list[float]  # seconds from the command's start to each epoch line
    accuracies: list[float]  # test accuracy (%) after each epoch
    peak_memory_mib: float
    startup_s: float | None = None
    logged_samples_per_s: float | None = None  # median of the run's logging windows after the first
    precision: str = "fp32"
    flops_per_sample: float | None = None  # forward and backward, dtrain's count


def parse_epoch_line(line: str) -> tuple[int, float] | None:
    """(epoch, test accuracy %) from a line both programs print after each epoch."""
    match = _EPOCH_LINE.search(line)
    return (int(match.group(1)), float(match.group(2))) if match else None


def samples_per_s(epoch_times: list[float]) -> float | None:
    """Training samples over the mean epoch time, epochs 2 onwards (epoch 1 holds the start-up)."""
    if len(epoch_times) < 2:
        return None
    return TRAIN_SAMPLES * (len(epoch_times) - 1) / (epoch_times[-1] - epoch_times[0])


def time_to_accuracy(result: Result, target: float = TARGET_ACCURACY) -> float | None:
    return next((t for t, acc in zip(result.epoch_times, result.accuracies) if acc >= target), None)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc/PID/task/TID/children: no scan of every process)."""
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:  # the process ended meanwhile
            pass
    return tree


def anonymous_mib(pids: list[int]) -> float:
    """Resident memory that is not a mapped file (heap, tensors), summed: /proc/PID/statm, cheap to read.

    (PSS would also share out the libraries' pages, but reading it walks the page tables: ~0.3 s
    per sample here, which would slow the programs being measured.)
    """
    pages = 0
    for pid in pids:
        try:
            resident, shared = map(int, Path(f"/proc/{pid}/statm").read_text().split()[1:3])
        except OSError:
            continue
        pages += resident - shared
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run(label: str, argv: list[str], cwd: Path, env: dict[str, str]) -> Result:
    """Run one program to its end, timing its epoch lines and sampling its memory."""
    print(f"[compare] {label}: {' '.join(argv)}", flush=True)
    start = time.monotonic()
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], anonymous_mib(process_tree(process.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times, accuracies, tail = [], [], []
    for line in process.stdout:
        tail = (tail + [line])[-20:]
        parsed = parse_epoch_line(line)
        if parsed:
            times.append(time.monotonic() - start)
            accuracies.append(parsed[1])
            print(f"[compare] {label}: {times[-1]:6.1f} s  {line.strip()}", flush=True)
    process.wait()
    done.set()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"{label} failed with exit code {process.returncode}:\n{''.join(tail)}")
    return Result(label, times, accuracies, peak[0])


def logged_samples_per_s(run_dir: Path) -> list[float]:
    """The samples/s of a run's logged windows after the first (which holds the first step's warm-up)."""
    return [r["samples_per_s"] for r in metrics.read(run_dir, metrics.TRAIN) if "samples_per_s" in r][1:]


def precision_and_flops(run_dir: Path) -> tuple[str, float | None]:
    """The precision a dtrain run trained in and its FLOPs per sample, from its config.yaml."""
    config = yaml.safe_load(RunDir(run_dir).config.read_text())
    return config["precision"], config.get("flops_per_sample")


def read_metrics(run_dir: Path, result: Result) -> Result:
    startup = [r["startup_s"] for r in metrics.read(run_dir, metrics.STARTUP)]
    rates = logged_samples_per_s(run_dir)
    result.startup_s = startup[0] if startup else None
    result.logged_samples_per_s = statistics.median(rates) if rates else None
    result.precision, result.flops_per_sample = precision_and_flops(run_dir)
    return result


def roof_fraction(samples_per_second: float | None, flops_per_sample: float | None, roof: roofline.Roof,
                  precision: str) -> tuple[float, float] | None:
    """(GFLOP/s, fraction of the roof of `precision`) of a program training `samples_per_second`."""
    if not samples_per_second or not flops_per_sample:
        return None
    achieved = samples_per_second * flops_per_sample
    return achieved / 1e9, roofline.fraction(achieved, roof.of(precision))


def dtrain_launch(recipe: Path, nproc: int, run_dir: Path, gpu: bool, *options: str) -> list[str]:
    devices = ["--gpus", str(nproc)] if gpu else ["--cpu", "--nproc", str(nproc)]
    return [sys.executable, "-m", "dtrain.cli", "launch", str(recipe), *devices, "--run-dir", str(run_dir),
            "--resume", "never", *options]


def run_dtrain(label: str, nproc: int, recipe_args: list[str], workdir: Path, env: dict[str, str],
               gpu: bool, precision: str) -> Result:
    run_dir = workdir / re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
    argv = dtrain_launch(ROOT / "recipes" / "mnist_cnn.py", nproc, run_dir, gpu, "--precision", precision, "--",
                         *recipe_args)
    return read_metrics(run_dir, run(label, argv, workdir, env))


def step_breakdown(nproc: int, workdir: Path, env: dict[str, str], gpu: bool) -> dict[str, float]:
    """bench/step_time.py's result on `nproc` processes."""
    argv = dtrain_launch(ROOT / "bench" / "step_time.py", nproc, workdir / f"step-time-{nproc}", gpu,
                         "--wandb", "disabled", "--checkpoint-every", "never")
    out = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True)
    line = next((text for text in out.stdout.splitlines() if text.startswith(STEP_TIME)), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"bench/step_time.py on {nproc} processes failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return json.loads(line[len(STEP_TIME):])


def fmt(value: float | None, pattern: str = "{:,.0f}") -> str:
    return "-" if value is None else pattern.format(value)


def render(results: list[Result], reference: Result, variants: list[Result], breakdowns: list[dict[str, float]],
           device: str, roof: roofline.Roof, epochs: int, command: str) -> str:
    """The Markdown section for bench/RESULTS.md."""
    ref_rate, ref_99 = samples_per_s(reference.epoch_times), time_to_accuracy(reference)
    flops_per_sample = next((r.flops_per_sample for r in results if r.flops_per_sample), None)  # the same model
    lines = [
        f"### dtrain vs the plain PyTorch program (MNIST CNN, {device}, {epochs} epochs)",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}. samples/s: 60,000 over the mean time between consecutive "
        "epoch lines (training + test pass, epochs 2 onwards); GFLOP/s: samples/s x "
        f"{fmt(flops_per_sample and flops_per_sample / 1e6, '{:.1f}')}M FLOPs per sample (dtrain's count), and "
        f"its fraction of the roof of the program's precision; time to 99.0%: from the command's start to the first "
        "epoch line at or above it; memory: peak of the anonymous resident memory summed over the process tree. "
        f"Roof: {roof.describe()}.",
        "",
        "| program | precision | samples/s | x reference | GFLOP/s | of the roof | acc. epoch 1 | acc. last epoch "
        "| time to 99.0% | x reference | start-up to 1st step | peak memory |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in [reference, *results]:
        rate, t99 = samples_per_s(r.epoch_times), time_to_accuracy(r)
        achieved = roof_fraction(rate, flops_per_sample, roof, r.precision)
        lines.append(" | ".join([
            f"| {r.label}", r.precision, fmt(rate), fmt(rate / ref_rate if rate and ref_rate else None, "{:.2f}x"),
            fmt(achieved and achieved[0]), fmt(achieved and achieved[1], "{:.1%}"),
            f"{r.accuracies[0]:.2f}%", f"{r.accuracies[-1]:.2f}%", fmt(t99, "{:.1f} s"),
            fmt(t99 / ref_99 if t99 and ref_99 else None, "{:.2f}"), fmt(r.startup_s, "{:.1f} s"),
            f"{r.peak_memory_mib:,.0f} MiB |"]))
    lines += ["", "Accuracy after the last epoch against the reference's: " + ", ".join(
        f"{r.label} {r.accuracies[-1] - reference.accuracies[-1]:+.2f} points" for r in results) + "."]
    if breakdowns:
        lines += ["", "Step breakdown (`bench/step_time.py`, per process, batch 64 each; mean ms per step, compute "
                  "of the slowest rank):", "",
                  "| processes x threads | forward+backward | waiting for the other rank | all-reduce of the gradients "
                  "| optimizer | real step (all-reduce overlapped) | samples/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {b['world_size']} x {b['threads']} | {b['compute_ms']:.1f} | {b['wait_ms']:.2f} | "
                  f"{b['all_reduce_ms']:.2f} ({b['gradient_mb']:.1f} MB) | {b['optimizer_ms']:.2f} | {b['step_ms']:.1f} | "
                  f"{b['samples_per_s']:,.0f} |" for b in breakdowns]
    if variants:
        lines += ["", "Recipe speed options against its defaults (fused AdamW, channels_last), 1 process, median of "
                  "the samples/s logged every 50 steps (options: 1 epoch each):", "",
                  "| options | samples/s | acc. epoch 1 |", "| --- | ---: | ---: |"]
        lines += [f"| {v.label} | {fmt(v.logged_samples_per_s)} | {v.accuracies[0]:.2f}% |"
                  for v in [dataclasses.replace(results[0], label="defaults"), *variants]]
    return "\n".join(lines) + "\n"


def publish(table: str, out: str | None) -> None:
    """Print a Markdown section and, with --out, append it to that file (bench/RESULTS.md)."""
    print(table)
    if out:
        with open(out, "a") as fh:
            fh.write("\n" + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--nproc", default="1,2", help="dtrain's process counts, comma-separated")
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--precision", default="auto", help="dtrain's --precision (the reference trains in fp32)")
    parser.add_argument("--variants", action="store_true", help="also measure the recipe's speed options")
    parser.add_argument("--out", default=None, help="append the tables to this Markdown file")
    args = parser.parse_args()

    gpus = hardware.visible_gpus()  # what the reference program and dtrain's defaults will use
    gpu = gpus > 0
    data_dir = str(Path(args.data_dir).resolve())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DTRAIN_DATA_DIR": data_dir}
    epochs = ["--epochs", str(args.epochs)]
    roof = roofline.measure_apart()
    print(f"[compare] roof: {roof.describe()}", flush=True)
    device = f"{gpus} GPU(s), {roof.device}" if gpu else roof.device
    with tempfile.TemporaryDirectory(prefix="dtrain-compare-") as tmp:
        workdir = Path(tmp)
        reference = run("plain PyTorch (bench/reference), 1 process",
                        [sys.executable, str(ROOT / "bench" / "reference" / "mnist_plain.py"), *epochs,
                         "--data-dir", data_dir], workdir, env)
        nprocs = [int(n) for n in args.nproc.split(",")]
        results = [run_dtrain(f"dtrain, {n} process{'es' if n > 1 else ''}", n, epochs, workdir, env, gpu,
                              args.precision) for n in nprocs]
        breakdowns = [step_breakdown(n, workdir, env, gpu) for n in nprocs]
        variants = []
        if args.variants:
            for options in (["--no-fused"], ["--no-channels-last"], ["--compile"]):
                variants.append(run_dtrain(" ".join(options), 1, ["--epochs", "1", *options], workdir, env, gpu,
                                           args.precision))
    command = "python bench/compare.py " + " ".join(sys.argv[1:])
    publish(render(results, reference, variants, breakdowns, device, roof, args.epochs, command.strip()), args.out)


if __name__ == "__main__":
    main()
