"""Sweeps: many runs of one recipe, each a `dtrain launch` of its own spec in its own run directory.

    dtrain sweep recipes/mnist_mlp.py --grid lr=1e-3,3e-4 --grid batch-size=64,128 -- --epochs 1
    dtrain slurm submit recipes/mnist_mlp.py --grid lr=1e-3,3e-4 --parallel 2   # one job array

A sweep is a list of runs: every combination of the grid's values, times `--draws` seeded random
draws of the `--draw` ranges. Its directory `runs/<sweep>/` holds `sweep.json` (the plan, so that
the same command given again finds the same runs) and one run directory per run, named by its
index and arguments. A run whose last `dtrain launch` exited 0 is finished (`ended.json`, written
by `dtrain launch`); the others run again and resume from their checkpoints.

What decides is pure (the plan, the names, which runs are finished, the summary); `start_runs`
is the one place that starts processes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from dtrain.core import metrics
from dtrain.core.rundir import SUMMARIES, RunDir
from dtrain.core.spec import dtrain_argv
from dtrain.errors import UsageError
from dtrain.launch.job import die_with_parent, ended

PLAN_FORMAT = "dtrain-sweep-1"
INTERRUPTED = (130, 128 + signal.SIGTERM, 128 + signal.SIGHUP)


@dataclasses.dataclass(frozen=True)
class Draw:
    """A recipe argument drawn uniformly from [low, high] (log: log-uniformly); whole numbers if both
    bounds are."""

    low: float
    high: float
    log: bool
    whole: bool

    def sample(self, rng: random.Random) -> str:
        if self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return str(round(value)) if self.whole else f"{value:.4g}"


@dataclasses.dataclass(frozen=True)
class Run:
    index: int
    name: str  # its run directory's name under the sweep's
    params: Mapping[str, str]  # recipe argument (without dashes) -> value, as the recipe gets it


def _key(text: str, flag: str, item: str) -> str:
    key = text.strip().lstrip("-")
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", key):
        raise UsageError(f"{flag} {item!r} does not start with a recipe argument's name; write it as "
                         f"{flag} lr=1e-3,3e-4 (the recipe's --lr).")
    return key


def parse_grid(items: Iterable[str]) -> dict[str, list[str]]:
    """`--grid KEY=V1,V2,...` (repeated) -> {key: values}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        words = [v.strip() for v in values.split(",")]
        if not sep or not all(words):
            raise UsageError(f"--grid {item!r} is not KEY=V1,V2,...; give a recipe argument and its values, as in "
                             "--grid lr=1e-3,3e-4.")
        key = _key(key, "--grid", item)
        if key in grid:
            raise UsageError(f"--grid names {key} twice; give all its values in one --grid {key}=V1,V2,...")
        grid[key] = words
    return grid


def parse_draws(items: Iterable[str]) -> dict[str, Draw]:
    """`--draw KEY=LOW:HIGH[:log]` (repeated) -> {key: Draw}."""
    draws: dict[str, Draw] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = text.split(":")
        try:
            if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                raise ValueError
            low, high = float(parts[0]), float(parts[1])
            if not low < high or (len(parts) == 3 and low <= 0):
                raise ValueError
        except ValueError:
            raise UsageError(f"--draw {item!r} is not KEY=LOW:HIGH or KEY=LOW:HIGH:log with LOW < HIGH (and LOW > 0 "
                             "for log); as in --draw lr=1e-4:1e-2:log.") from None
        key = _key(key, "--draw", item)
        if key in draws:
            raise UsageError(f"--draw names {key} twice; give it one range.")
        whole = all(re.match(r"^-?\d+$", p.strip()) for p in parts[:2])
        draws[key] = Draw(low, high, log=len(parts) == 3, whole=whole)
    return draws


def run_name(index: int, params: Mapping[str, str]) -> str:
    """`003_lr=3e-4_batch-size=64`: the index first (the order they run in), then what differs."""
    words = [f"{index:03d}"] + [f"{k}={v}" for k, v in params.items()]
    return re.sub(r"[^A-Za-z0-9._=-]", "_", "_".join(words))[:120]


def plan(grid: Mapping[str, Sequence[str]], draws: Mapping[str, Draw], count: int | None, seed: int,
         fixed_args: Sequence[str]) -> list[Run]:
    """The runs: every combination of the grid, each with `count` draws of the ranges (seeded)."""
    clash = sorted(set(grid) & set(draws))
    if clash:
        raise UsageError(f"{clash[0]} is in both --grid and --draw; give it one of them.")
    given = {_key(word.split("=")[0], "", word) for word in fixed_args if word.startswith("--") and len(word) > 2}
    clash = sorted((set(grid) | set(draws)) & given)
    if clash:
        raise UsageError(f"--{clash[0]} is both swept and fixed after '--'; leave it out of the recipe arguments.")
    if draws and not count:
        raise UsageError("--draw needs --draws N, the number of random draws per grid point.")
    if count and not draws:
        raise UsageError("--draws needs at least one --draw KEY=LOW:HIGH range to draw from.")
    if not grid and not draws:
        raise UsageError("a sweep needs --grid KEY=V1,V2,... or --draw KEY=LOW:HIGH with --draws N.")
    rng = random.Random(seed)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    combos = [{**point, **{k: d.sample(rng) for k, d in draws.items()}} for point in points for _ in range(count or 1)]
    return [Run(i, run_name(i, params), params) for i, params in enumerate(combos)]


def recipe_args(run: Run, fixed_args: Sequence[str]) -> tuple[str, ...]:
    return tuple(itertools.chain.from_iterable((f"--{k}", v) for k, v in run.params.items())) + tuple(fixed_args)


def default_name(recipe: str, runs: Sequence[Run], fixed_args: Sequence[str]) -> str:
    """The same recipe, runs and fixed arguments give the same name: the same command continues the sweep."""
    digest = hashlib.sha1(json.dumps([[dict(r.params) for r in runs], list(fixed_args)]).encode()).hexdigest()
    return f"{Path(recipe).stem}-sweep-{digest[:8]}"


def plan_record(recipe: str, runs: Sequence[Run], fixed_args: Sequence[str]) -> dict[str, Any]:
    return {"format": PLAN_FORMAT, "recipe": recipe, "fixed_args": list(fixed_args),
            "runs": [{"index": r.index, "name": r.name, "params": dict(r.params)} for r in runs]}


def read_plan(sweep_dir: str | Path) -> dict[str, Any] | None:
    path = RunDir.of(sweep_dir).plan
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != PLAN_FORMAT:
            raise ValueError
        return record
    except (OSError, ValueError):
        raise UsageError(f"{path} is not a sweep plan this dtrain wrote; pass another --name.") from None


def check_same_plan(sweep_dir: str | Path, record: Mapping[str, Any]) -> bool:
    """True if the sweep directory already holds this plan, False if it holds none; refuses another plan."""
    existing = read_plan(sweep_dir)
    if existing is None:
        return False
    if existing["runs"] != record["runs"] or existing["fixed_args"] != record["fixed_args"]:
        raise UsageError(f"{sweep_dir} holds a sweep of other runs ({len(existing['runs'])} runs, recipe arguments "
                         f"{' '.join(existing['fixed_args']) or 'none'}); pass another --name, or the same grid.")
    return True


def runs_of(record: Mapping[str, Any]) -> list[Run]:
    return [Run(r["index"], r["name"], r["params"]) for r in record["runs"]]


# --- how runs ended, and the summary ----------------------------------------------------------------

def finished(run_dir: str | Path) -> bool:
    record = ended(run_dir)
    return record is not None and record.get("exit_code") == 0


def status(run_dir: str | Path) -> str:
    record = ended(run_dir)
    if record is None:
        return "running or stopped" if RunDir.of(run_dir).metrics.is_file() else "not run"
    code = record.get("exit_code")
    return "finished" if code == 0 else "interrupted" if code in INTERRUPTED else f"failed (exit {code})"


def final_values(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Each series' last value, from the rows that describe training (not the start-up or system rows)."""
    values: dict[str, Any] = {}
    for row in rows:
        if row["kind"] in (metrics.TRAIN, metrics.EPOCH, metrics.EVAL, metrics.TARGET):
            values.update({k: v for k, v in row.items() if k not in metrics.META})
    values["step"] = max((row["step"] for row in rows), default=0)
    return values


def parse_metric(text: str) -> tuple[str, str]:
    """`NAME[:min|max]` -> (name, goal); without a goal, names with "loss" or "error" are minimised."""
    name, _, goal = text.partition(":")
    if goal not in ("", "min", "max") or not name:
        raise UsageError(f"--metric {text!r} is not NAME, NAME:min or NAME:max (as in eval/accuracy:max).")
    return name, goal or ("min" if "loss" in name or "error" in name else "max")


def summary(sweep_dir: str | Path, runs: Sequence[Run], read: Callable[[Path], list[dict]] = metrics.read
            ) -> list[dict[str, Any]]:
    """A row per run: its name, arguments (as --KEY: apart from the series, such as an `lr` it logs), status and
    the final value of each series it logged."""
    rows = []
    for run in runs:
        run_dir = Path(sweep_dir) / run.name
        try:
            values = final_values(read(run_dir))
        except UsageError:  # not started, or no metrics yet
            values = {}
        rows.append({"run": run.name, **{f"--{k}": v for k, v in run.params.items()}, "status": status(run_dir),
                     **values})
    return rows


def best(rows: Sequence[Mapping[str, Any]], metric: tuple[str, str], required: bool = True) -> int | None:
    """The index of the best row by `metric` (name, goal); refuses a metric that no run logged, if `required`."""
    name, goal = metric
    scored = [(row[name], i) for i, row in enumerate(rows) if isinstance(row.get(name), (int, float))]
    if not scored and not required:
        return None
    if not scored:
        logged = sorted({k for row in rows for k in row if "/" in k})
        raise UsageError(f"no run of this sweep logged {name!r}; pass --metric with one of "
                         f"{', '.join(logged) or 'the series in its runs metrics.jsonl files'}.")
    return (max if goal == "max" else min)(scored)[1]


def columns(rows: Sequence[Mapping[str, Any]], runs: Sequence[Run], metric: str | None) -> list[str]:
    """The table's columns: run, arguments, status, the metric, then the evaluation series and the loss."""
    params = dict.fromkeys(f"--{k}" for run in runs for k in run.params)
    series = sorted(({k for row in rows for k in row if k.startswith("eval/")} | {"train/loss"}) - {metric})
    present = [s for s in ([metric] if metric else []) + series if any(s in row for row in rows)]
    return ["run", *params, "status", "step", *present]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(rows: Sequence[Mapping[str, Any]], names: Sequence[str], best_index: int | None) -> str:
    cells = [list(names)] + [[_cell(row.get(c)) for c in names] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(names))]
    lines = []
    for i, line in enumerate(cells):
        mark = "*" if best_index is not None and i - 1 == best_index else " "
        lines.append(f"{mark} " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    return "\n".join(lines)


def summary_files(rows: Sequence[Mapping[str, Any]], names: Sequence[str], best_index: int | None,
                  metric: tuple[str, str] | None) -> dict[str, str]:
    """summary.csv (the table's columns) and summary.json (every final value) -> their text."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*names, "best"])
    for i, row in enumerate(rows):
        writer.writerow([row.get(c, "") for c in names] + [int(i == best_index)])
    record = {"metric": dict(zip(("name", "goal"), metric)) if metric else None,
              "best": rows[best_index]["run"] if best_index is not None else None, "runs": list(rows)}
    return {SUMMARIES[0]: out.getvalue(), SUMMARIES[1]: json.dumps(record, indent=1) + "\n"}


# --- starting runs --------------------------------------------------------------------------------

def slot_devices(device: str, parallel: int, per_run: int, available: int) -> list[dict[str, str]]:
    """Each of the `parallel` slots' environment: its own GPUs (CUDA_VISIBLE_DEVICES), or its share of the
    CPUs (OMP_NUM_THREADS). Refuses more at once than the machine holds."""
    if device == "cuda":
        if parallel * per_run > available:
            raise UsageError(f"--parallel {parallel} runs of {per_run} GPU(s) need {parallel * per_run} GPUs and "
                             f"{available} are visible; pass --parallel {max(available // per_run, 1)}.")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(s * per_run, (s + 1) * per_run))}
                for s in range(parallel)]
    if parallel * per_run > available:
        raise UsageError(f"--parallel {parallel} runs of {per_run} CPU process(es) need {parallel * per_run} cores "
                         f"and this machine has {available}; pass --parallel {max(available // per_run, 1)}.")
    threads = str(max(available // (parallel * per_run), 1))
    return [{"OMP_NUM_THREADS": threads} for _ in range(parallel)]


def start_runs(commands: Sequence[tuple[str, list[str], Path | None]], slots: Sequence[Mapping[str, str]],
               say: Callable[[str], None]) -> tuple[dict[str, int], int | None]:
    """Run each (name, argv, console file or None for this console), len(slots) at a time, each with its
    slot's environment. SIGINT or SIGTERM stops every running run (as Ctrl-C stops `dtrain launch`) and
    starts no more. Returns each started run's exit code, and the signal that stopped the sweep.

    Each run is in a session of its own, so that the terminal's Ctrl-C reaches it once, from here, and
    dies with this process; only `os.wait` here reaps them, so a pid signalled is still the run's."""
    pending = list(commands)
    running: dict[int, tuple[subprocess.Popen, str, int, IO[str] | None, float]] = {}  # pid -> its run
    codes: dict[str, int] = {}
    free = list(range(len(slots)))
    stopping: list[int] = []

    def stop(signum, _frame):
        if not stopping:
            say(f"got {signal.Signals(signum).name}: stopping the runs in progress; the same command resumes them.")
        stopping.append(signum)
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            while pending and free and not stopping:
                name, argv, console = pending.pop(0)
                slot = free.pop(0)
                fh: IO[str] | None = open(console, "a") if console is not None else None
                proc = subprocess.Popen(argv, env={**os.environ, **slots[slot]}, stdout=fh, stderr=fh,
                                        start_new_session=True, preexec_fn=die_with_parent)
                running[proc.pid] = (proc, name, slot, fh, time.monotonic())
                say(f"run {name}: started" + (f" (output in {console})" if console else ""))
            if not running:
                break
            pid, wait_status = os.wait()
            if pid not in running:
                continue
            proc, name, slot, fh, began = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(wait_status)
            code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
            codes[name] = code
            if fh is not None:
                fh.close()
            free.append(slot)
            say(f"run {name}: exit {code} after {time.monotonic() - began:.0f} s")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return codes, (stopping[0] if stopping else None)


def launch_argv(spec_file: Path) -> list[str]:
    return [*dtrain_argv(), "launch", "--spec", str(spec_file)]
