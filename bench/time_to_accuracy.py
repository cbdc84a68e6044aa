"""Time to 99% test accuracy of the MNIST recipe: dtrain's standard and fast settings, eager and with
--cuda-graph, against the plain program, start-up apart from training.

    python bench/time_to_accuracy.py [--target 0.99] [--budget 150] [--out bench/RESULTS.md]

One after another, on one GPU (without one: one CPU process, and no --cuda-graph runs):
- `dtrain launch recipes/mnist_cnn.py` with the standard setting (the recipe's defaults: batch 64, AdamW
  at 1e-3) and the fast one (batch 256, OneCycle peaking at 1e-2, dropout 0.25, 2 epochs: 99.26% on a CPU
  here, 2026-11-30), each eager and with
  --cuda-graph, evaluating every quarter epoch and stopping at the target (`--stop-at`); no checkpoints;
- the reference program (bench/reference/mnist_plain.py), stopped at its first epoch line at the target.
For a dtrain run, from its `target` row: end to end (from `dtrain launch` to the evaluation that reached
the target), training (from the training loop's start: steps and evaluations) and start-up (the rest:
imports, data, model); and the median samples/s of the logged windows after the first (evaluations
left out), the CUDA-graph step against the eager one. The reference has only its epoch lines: its
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
from dtrain.core import hardware, metrics  # noqa: E402
from dtrain.core.rundir import RunDir  # noqa: E402

from compare import dtrain_launch, logged_samples_per_s, parse_epoch_line, publish  # noqa: E402

ANCHOR = "0.76 s of training on a GTX 1660 Ti (tuomaso/train_mnist_fast)"
TRAIN_SAMPLES = 60_000
SETTINGS = {  # recipe arguments and batch size of each setting
    "standard": (["--epochs", "10"], 64),
    "fast": (["--epochs", "2", "--batch-size", "256", "--lr-schedule", "onecycle", "--lr", "1e-2", "--dropout", "0.25"],
             256),
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
    result = Result(label, wall_s, max(evaluations, default=None))
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


def render(results: list[Result], device: str, target: float, command: str) -> str:
    lines = [
        f"### Time to {target:.0%} test accuracy, MNIST CNN ({device})",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}. End to end: from the command's start to the evaluation that "
        "reached the target (the reference: its epoch line); training: from the training loop's start (steps and "
        "evaluations, every quarter epoch); start-up: the rest. samples/s: median (min..max) of the windows logged "
        f"every 50 steps after the first, evaluations left out. Anchor: {ANCHOR}.",
        "",
        "| run | end to end | training | start-up | step | accuracy | samples/s | command wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rate = "-" if r.samples_per_s is None else (
            f"{r.samples_per_s:,.0f} ({r.samples_per_s_range[0]:,.0f}..{r.samples_per_s_range[1]:,.0f})")
        reached = "-" if r.accuracy is None else f"{r.accuracy:.2%}" + ("" if r.end_to_end_s else " (not reached)")
        lines.append(f"| {r.label} | {fmt(r.end_to_end_s)} | {fmt(r.training_s, '{:.2f} s')} | {fmt(r.startup_s)} | "
                     f"{fmt(r.step, '{}')} | {reached} | {rate} | {r.wall_s:.1f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--settings", default="standard,fast", help="comma-separated: standard, fast")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the whole benchmark")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("DTRAIN_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()

    deadline = time.monotonic() + args.budget
    gpu = hardware.visible_gpus() > 0
    device = "1 GPU" if gpu else "1 CPU process"
    data_dir = str(Path(args.data_dir).resolve())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DTRAIN_DATA_DIR": data_dir}
    stop = ["--stop-at", f"eval/accuracy>={args.target}", "--log-every", "50"]
    results = []
    with tempfile.TemporaryDirectory(prefix="dtrain-time-to-accuracy-") as tmp:
        for setting in args.settings.split(","):
            recipe_args, batch_size = SETTINGS[setting]
            quarter_epoch = str(TRAIN_SAMPLES // batch_size // 4)
            for graphed in ([False, True] if gpu else [False]):
                label = f"dtrain, {setting}" + (", --cuda-graph" if graphed else "")
                if deadline - time.monotonic() < MIN_RUN_S:
                    print(f"[time-to-accuracy] {label}: skipped, the budget is spent", flush=True)
                    continue
                results.append(run_dtrain(label, [*recipe_args, *stop, "--eval-every", quarter_epoch],
                                          ["--cuda-graph"] if graphed else [], Path(tmp), gpu,
                                          deadline - time.monotonic(), env))
    if not args.no_reference:  # last: what the budget cannot spare is the comparison, not dtrain's own runs
        results.insert(0, run_reference(data_dir, args.target, deadline - time.monotonic(), env))
    command = "python bench/time_to_accuracy.py " + " ".join(sys.argv[1:])
    publish(render(results, device, args.target, command.strip()), args.out)


if __name__ == "__main__":
    main()
