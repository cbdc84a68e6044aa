"""The W&B side of rank 0's logger: a process of its own, at the lowest CPU priority.

    python -m dtrain.wandb_writer FD   # started by `RunLogger`, fed JSON lines on stdin

W&B's client costs the caller about a millisecond of Python per logged row, and its service
(wandb-core) more CPU on top. In the training process that work competes with the training loop
for the GIL and for cores that the loop keeps busy; here it only runs on the cycles training leaves idle
(SCHED_IDLE), and catches up when the run ends. The training
process never imports wandb. It lives outside `dtrain.runtime` so that it does not import torch
(seconds), and in a session of its own: torchrun's SIGTERM to rank 0's process group does not reach
it, so it ends only by its input, and a run that rank 0 ends as failed is recorded so.

Protocol, one JSON object per line. In: first the `wandb.init` arguments; then `{"row": {...}}` (a
metrics.jsonl row, `dtrain.metrics`), `{"step": N, "evaluation": {...}}`, and last `{"exit_code": C}`.
Out, on file descriptor FD, only when `wandb.init` fails: `{"error": "..."}`, then this process ends
(stdout and stderr stay the training process's, for wandb's own messages). End of input without an
exit code (the training process died) ends the run as failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from dtrain import metrics

# Rows are read once a second, in batches: every wake-up of this process (and of wandb-core after
# it) preempts a loop that keeps the cores busy (the MNIST recipe logging every step on 2 cores:
# 7.7-9.5% fewer steps/s with rows read one by one, 2.6-4.5% in batches; bench/RESULTS.md).
BATCH_INTERVAL_S = 1.0


def evaluation_tables(wandb: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    """An evaluation's confusion matrix and per-class report as W&B tables."""
    classes = list(result["report"]["classes"])
    matrix = wandb.Table(columns=["true", *classes],
                         data=[[c, *row] for c, row in zip(classes, result["confusion_matrix"])])
    report = wandb.Table(columns=["class", "precision", "recall", "f1", "support"],
                         data=[[c, r["precision"], r["recall"], r["f1"], r["support"]]
                               for c, r in result["report"]["classes"].items()])
    return {"eval/confusion_matrix": matrix, "eval/report": report}


def lowest_priority() -> None:
    """SCHED_IDLE (Linux): run only when a core would otherwise idle; nice 19 elsewhere. Inherited
    by wandb-core. Nice 19 alone still takes a few percent from a loop that keeps every core busy."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass


def lines_in_batches(fd: int, interval: float) -> Iterator[bytes]:
    """The lines written to `fd`, read whenever some are there but at most once per `interval`."""
    pending = b""
    while chunk := os.read(fd, 1 << 20):
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines
        time.sleep(interval)


def main(reply_fd: int) -> int:
    lowest_priority()
    lines = lines_in_batches(sys.stdin.fileno(), BATCH_INTERVAL_S)
    init = next(lines, None)
    if init is None:  # the training process ended before it could start a run
        return 1
    try:
        import wandb

        arguments = json.loads(init)
        # Process-wide, not only this run's: wandb's usage telemetry goes to W&B's server (a DNS lookup
        # at the least, and the per-row cost of recording it) unless the whole process is offline.
        wandb.setup(wandb.Settings(mode=arguments["mode"]))
        run = wandb.init(**arguments, settings=wandb.Settings(console="off"))
    except Exception as exc:  # read by the training process when it finds this process gone
        with contextlib.suppress(BrokenPipeError), open(reply_fd, "w") as reply:
            reply.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    os.close(reply_fd)
    exit_code = 1
    for line in lines:
        message = json.loads(line)
        if "exit_code" in message:
            exit_code = message["exit_code"]
            break
        if "row" in message:
            run.log(metrics.series(message["row"]), step=message["row"]["step"])
        elif "evaluation" in message:
            run.log(evaluation_tables(wandb, message["evaluation"]), step=message["step"])
    run.finish(exit_code=exit_code)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
