"""Time to 99% test accuracy of the MNIST recipe: dtrain's standard and fast settings, eager and with
--cuda-graph, against the plain program, start-up apart from training.

    python bench/time_to_accuracy.py [--target 0.99] [--seeds 1] [--settings standard,fast] [--budget 150]
                                     [--out bench/RESULTS.md]

One after another, on one GPU (without one: one CPU process, and no --cuda-graph runs):
- `dtrain launch recipes/mnist_cnn.py --precision auto` with the standard setting (the recipe's defaults:
  batch 64, AdamW at 1e-3, 10 epochs) or the fast one (batch 256, dropout 0.25, label smoothing 0.1, OneCycle
  peaking at 2e-2 over `--max-steps 352`, 1.5 epochs: 99% after 1 to 1.24 epochs in each of 5 seeds on a CPU
  here, 2026-12-07; over 1.25 epochs one seed stopped at 98.99%), each eager and with --cuda-graph, evaluating
  every quarter epoch and stopping at the target (`--stop-at`); no checkpoints;
- the reference program (bench/reference/mnist_plain.py), stopped at its first epoch line at the target.
For a dtrain run, from its `target` row: end to end (from `dtrain launch` to the evaluation that reached
the target), training (from the training loop's start: steps and evaluations) and start-up (the rest:
imports, data, model); and the median samples/s of the logged windows after the first (evaluations
left out), the CUDA-graph step against the eager one, and that rate's FLOP/s as a fraction of the roof of
the run's precision (`bench/roofline.py`, measured first, in the same run). With `--seeds N` each dtrain
run is made with seeds 0..N-1 and a row gives the median training time of the seeds, and whether every
seed reached the target. dtrain runs in `--precision auto`. The reference has only its epoch lines: its
time is end to end, at epoch granularity. The published anchor: 0.76 s of training to 99% on a laptop
GTX 1660 Ti (tuomaso/train_mnist_fast: data on the GPU, batch 256, OneCycle). `--budget` caps the
whole benchmark's seconds (a lent GPU's minutes are few): a run that would start past it is skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import roofline  # noqa: E402

from dtrain.core import hardware, metrics  # noqa: E402
from dtrain.core.rundir import RunDir  # noqa: E402

from compare import (  # noqa: E402
    dtrain_launch,
    logged_samples_per_s,
    parse_epoch_line,
    precision_and_flops,
    publish,
    roof_fraction,
)

ANCHOR = "0.76 s of training on a GTX 1660 Ti (tuomaso/train_mnist_fast)"
TRAIN_SAMPLES = 60_000
SETTINGS = {  # launch options, recipe arguments, batch size
    "standard": ([], ["--epochs", "10"], 64),
    "fast": (["--max-steps", "352"], ["--epochs", "2", "--batch-size", "256", "--lr-schedule", "onecycle", "--lr", "2e-2",
                                      "--dropout", "0.25", "--label-smoothing", "0.1"], 256),
}
MIN_RUN_S = 20  # a run is not started with less of the budget left


@dataclasses.dataclass
class Result:
    label: str
    wall_s: float  # the command, start to exit
    accuracy: float | None  # at the target's evaluation, else the best seen
    end_to_end_s: float | None = None  # start to the evaluation that reached the target
    training_s: float | None = None
    step: int | None = None
    samples_per_s: float | None = None
    samples_per_s_range: tuple[float, float] | None = None
    precision: str = "fp32"
    flops_per_sample: float | None = None

    @property
    def startup_s(self) -> float | None:
        return None if self.training_s is None else self.end_to_end_s - self.training_s


def from_metrics(label: str, run_dir: Path, wall_s: float) -> Result:
    """A dtrain run's result from its metrics.jsonl."""
    if not RunDir(run_dir).metrics.is_file():  # stopped before its first row
        return Result(label, wall_s, None)
    target = metrics.read(run_dir, metrics.TARGET)
    evaluations = [r["eval/accuracy"] for r in metrics.read(run_dir) if "eval/accuracy" in r]
    rates = logged_samples_per_s(run_dir)
    precision, flops_per_sample = precision_and_flops(run_dir)
    result = Result(label, wall_s, max(evaluations, default=None), precision=precision,
                    flops_per_sample=flops_per_sample)
    if target:
        row = target[0]
        result.accuracy, result.step = row["eval/accuracy"], row["step"]
        result.end_to_end_s, result.training_s = row["since_launch_s"], row["time_to_target_s"]
    if rates:
        result.samples_per_s, result.samples_per_s_range = statistics.median(rates), (min(rates), max(rates))
    return result


def run_reference(data_dir: str, target: float, timeout: float, env: dict[str, str]) -> Result:
    """The plain program until its first epoch line at `target` (then stopped), at most 10 epochs."""
    argv = [sys.executable, str(ROOT / "bench" / "reference" / "mnist_plain.py"), "--epochs", "10",
            "--data-dir", data_dir]
    print(f"[time-to-accuracy] reference: {' '.join(argv)}", flush=True)
    start = time.monotonic()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    result = Result("plain PyTorch (bench/reference)", 0.0, None)
    for line in process.stdout:
        parsed = parse_epoch_line(line)
        if parsed:
            print(f"[time-to-accuracy] reference: {time.monotonic() - start:6.1f} s  {line.strip()}", flush=True)
            result.accuracy = max(result.accuracy or 0.0, parsed[1] / 100)
            if parsed[1] / 100 >= target:
                result.end_to_end_s = time.monotonic() - start
                break
        if time.monotonic() - start > timeout:
            break
    os.killpg(process.pid, signal.SIGTERM)  # its DataLoader workers too
    process.wait()
    result.wall_s = time.monotonic() - start
    return result


def run_dtrain(label: str, recipe_args: list[str], launch_options: list[str], workdir: Path, gpu: bool,
               timeout: float, env: dict[str, str]) -> Result:
    run_dir = workdir / label.replace(" ", "-").replace(",", "")
    argv = dtrain_launch(ROOT / "recipes" / "mnist_cnn.py", 1, run_dir, gpu, "--wandb", "disabled",
                         "--checkpoint-every", "never", *launch_options, "--", *recipe_args)
    print(f"[time-to-accuracy] {label}: {' '.join(argv)}", flush=True)
    start = time.monotonic()
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[time-to-accuracy] {label}: stopped after {timeout:.0f} s", flush=True)
        return from_metrics(label, run_dir, time.monotonic() - start)
    if out.returncode != 0:
        sys.exit(f"{label} failed with exit code {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    result = from_metrics(label, run_dir, time.monotonic() - start)
    print(f"[time-to-accuracy] {label}: {result}", flush=True)
    return result


def fmt(value: float | None, pattern: str = "{:.1f} s") -> str:
    return "-" if value is None else pattern.format(value)


def seeds_summary(runs: list[Result]) -> tuple[float | None, bool]:
    """The median training seconds of a setting's seeds, and whether every seed reached the target."""
    reached = [r.training_s for r in runs if r.training_s is not None]
    return (statistics.median(reached) if reached else None), len(reached) == len(runs)


def render(results: list[Result], seeds: dict[str, list[Result]], roof: roofline.Roof, target: float,
           command: str) -> str:
    lines = [
        f"### Time to {target:.0%} test accuracy, MNIST CNN (1 process, {roof.device})",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}. End to end: from the command's start to the evaluation that "
        "reached the target (the reference: its epoch line); training: from the training loop's start (steps and "
        "evaluations); start-up: the rest. samples/s: median (min..max) of the windows logged every 50 steps after "
        "the first, evaluations left out; of the roof: that rate's FLOP/s against the matmul rate of the run's "
        f"precision ({roof.describe()}). Anchor: {ANCHOR}.",
        "",
        "| run | precision | end to end | training | start-up | step | accuracy | samples/s | of the roof "
        "| command wall |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rate = "-" if r.samples_per_s is None else (
            f"{r.samples_per_s:,.0f} ({r.samples_per_s_range[0]:,.0f}..{r.samples_per_s_range[1]:,.0f})")
        achieved = roof_fraction(r.samples_per_s, r.flops_per_sample, roof, r.precision)
        reached = "-" if r.accuracy is None else f"{r.accuracy:.2%}" + ("" if r.end_to_end_s else " (not reached)")
        lines.append(f"| {r.label} | {r.precision} | {fmt(r.end_to_end_s)} | {fmt(r.training_s, '{:.2f} s')} | "
                     f"{fmt(r.startup_s)} | {fmt(r.step, '{}')} | {reached} | {rate} | "
                     f"{fmt(achieved and achieved[1], '{:.1%}')} | {r.wall_s:.1f} s |")
    for label, runs in seeds.items():
        if len(runs) > 1:
            median, every = seeds_summary(runs)
            lines.append(f"\n{label}: median training time of {len(runs)} seeds {fmt(median, '{:.2f} s')}; "
                         + ("every seed reached the target." if every else "NOT every seed reached the target."))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--settings", default="standard,fast", help=f"comma-separated: {', '.join(SETTINGS)}")
    parser.add_argument("--seeds", type=int, default=1, help="runs of each dtrain setting, seeds 0..N-1")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the whole benchmark")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()

    roof = roofline.measure_apart(seconds=0.5)
    deadline = time.monotonic() + args.budget
    gpu = hardware.visible_gpus() > 0
    data_dir = str(Path(args.data_dir).resolve())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DTRAIN_DATA_DIR": data_dir}
    stop = ["--stop-at", f"eval/accuracy>={args.target}", "--log-every", "50"]
    results, seeds = [], {}
    with tempfile.TemporaryDirectory(prefix="dtrain-time-to-accuracy-") as tmp:
        for setting in args.settings.split(","):
            launch_options, recipe_args, batch_size = SETTINGS[setting]
            quarter_epoch = str(TRAIN_SAMPLES // batch_size // 4)
            for graphed in ([False, True] if gpu else [False]):
                label = f"dtrain, {setting}" + (", --cuda-graph" if graphed else "")
                seeds[label] = []
                for seed in range(args.seeds):
                    if deadline - time.monotonic() < MIN_RUN_S:
                        print(f"[time-to-accuracy] {label}: skipped, the budget is spent", flush=True)
                        break
                    launch = ["--precision", "auto", "--seed", str(seed), *launch_options,
                              *(["--cuda-graph"] if graphed else [])]
                    run = run_dtrain(label + (f", seed {seed}" if args.seeds > 1 else ""),
                                     [*recipe_args, *stop, "--eval-every", quarter_epoch], launch, Path(tmp), gpu,
                                     deadline - time.monotonic(), env)
                    results.append(run)
                    seeds[label].append(run)
    if not args.no_reference:  # last: what the budget cannot spare is the comparison, not dtrain's own runs
        results.insert(0, run_reference(data_dir, args.target, deadline - time.monotonic(), env))
    command = "python bench/time_to_accuracy.py " + " ".join(sys.argv[1:])
    publish(render(results, seeds, roof, args.target, command.strip()), args.out)


if __name__ == "__main__":
    main()
