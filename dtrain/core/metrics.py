"""metrics.jsonl, the run's record of every logged scalar: its schema and its one reader.

One JSON object per line, written by rank 0 (`dtrain.runtime.logging`), read back by `dtrain
report`, the W&B writer and the tests through this module:

    {"step": 120, "time": 1796016403.9, "kind": "train", "train/loss": 0.31, "lr": 0.001, ...}

`step` is the count of optimizer steps done, `time` Unix time, `kind` what the row is; every
other key is one series, and a series' name means one thing in every row that holds it:

    train    every --log-every steps: train/loss (the mean over those steps), lr, grad_norm,
             samples_per_s, step_time_s; a custom loop's `ctx.log` rows are of this kind too
    epoch    at each epoch's end: epoch, train/epoch_loss (the mean over the epoch), eval/* (its
             evaluation, if any)
    eval     an evaluation between epochs' ends (Trainer's eval_every): eval/*
    target   the evaluation that reached Trainer's stop_at: stop_at (the target), the value,
             time_to_target_s (since fit began), since_launch_s (since `dtrain launch` started)
    startup  once per launch: startup_s, from `dtrain launch` to this process's first step
    restart  the first step after the workers restarted (--max-restarts, --min-nodes): world_size (now),
             previous_world_size (the checkpoint's), heal_s (from the first rank's failure to this step, where
             a failed rank left its error record; a rank its launcher stopped first leaves none)
    heal     a replica group's first step on a live peer's state (--replica-groups): previous_step (this group's
             own count before), peer_heal_s (from asking the lighthouse to join to that step's commit), participants
             (the groups in that step)
    system   every log interval (and at `ctx.close()`), over all ranks: compute_s, data_wait_s and
             comm_wait_s (seconds per step; /min, /median, /max), slowest_rank (the longest
             compute), memory/* (the highest rank's; CPU: rss_gb, peak_rss_gb; GPU, since the process
             began: max_allocated_gb, max_reserved_gb, and over all ranks alloc_retries, ooms), tflops
             (per device) and mfu where FLOPs and a peak are known

Rows written by dtrain 0.1.0 carry no kind; `kind` tells them apart the way that release wrote them.
No torch here: the launch side reads it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dtrain.core.rundir import METRICS, RunDir
from dtrain.errors import UsageError

TRAIN, EPOCH, EVAL, TARGET, STARTUP, SYSTEM, RESTART, HEAL = ("train", "epoch", "eval", "target", "startup", "system",
                                                              "restart", "heal")
KINDS = (TRAIN, EPOCH, EVAL, TARGET, STARTUP, SYSTEM, RESTART, HEAL)
META = ("step", "time", "kind")  # what a row says about itself; every other key is a series


def row(step: int, kind: str, values: Mapping[str, Any]) -> dict[str, Any]:
    if kind not in KINDS:
        raise UsageError(f"a metrics row's kind is one of {', '.join(KINDS)}, not {kind!r}.")
    clash = sorted(set(META) & set(values))
    if clash:
        raise UsageError(f"{clash[0]!r} names a metrics row's own field; log that value under another name.")
    return {"step": step, "time": round(time.time(), 3), "kind": kind, **values}


def kind(record: Mapping[str, Any]) -> str:
    if "kind" in record:
        return record["kind"]
    return EPOCH if "epoch" in record else STARTUP if "startup_s" in record else TRAIN  # written by 0.1.0


def series(record: Mapping[str, Any]) -> dict[str, Any]:
    """The row's values, without its own fields (and, for a 0.1.0 epoch row, under today's names)."""
    values = {k: v for k, v in record.items() if k not in META}
    if "kind" not in record and kind(record) == EPOCH and "train/loss" in values:
        values["train/epoch_loss"] = values.pop("train/loss")
    return values


def read(run_dir: str | Path, of_kind: str | None = None) -> list[dict[str, Any]]:
    """The rows of a run (each with its kind), in the order written; a last line cut short by a crash is
    left out. With `of_kind`, only rows of that kind."""
    path = RunDir.of(run_dir).metrics
    if not path.is_file():
        raise UsageError(f"{run_dir} has no {METRICS}; pass the run directory of a dtrain run (runs/NAME).")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise UsageError(f"{path} line {number} is not JSON; the file is damaged.") from None
            continue
        rows.append({"step": record["step"], "time": record.get("time"), "kind": kind(record), **series(record)})
    return [r for r in rows if of_kind is None or r["kind"] == of_kind]
