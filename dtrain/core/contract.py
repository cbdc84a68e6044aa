"""The worker contract: the environment `dtrain launch` gives every worker, and the workers' reader.

Both sides import this module (it imports no torch): `worker_env` writes the variables from a
LaunchSpec, `read_env` reads them back in a worker, under `dtrain launch`, plain `torchrun`,
a cluster engine that starts the workers itself (its `Job`) or plain `python recipe.py` (a world of one). The variables are the
worker options of `dtrain.core.options` (one each) and the few below that the launch derives.
`python -m dtrain.core.contract` prints the table docs/architecture.md holds.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtrain.core.fields import WorkerOptions
from dtrain.core.options import WORKER_OPTIONS, Option, for_command
from dtrain.core.rundir import DEFAULT, RunDir
from dtrain.errors import UsageError

if TYPE_CHECKING:
    from dtrain.core.spec import LaunchSpec

DEVICE = "DTRAIN_DEVICE"
RUN_DIR = "DTRAIN_RUN_DIR"
WORLD_SIZE = "DTRAIN_WORLD_SIZE"
MIN_WORLD_SIZE = "DTRAIN_MIN_WORLD_SIZE"
NODE_RANK = "DTRAIN_NODE_RANK"
DEEPSPEED_CONFIG = "DTRAIN_DEEPSPEED_CONFIG"
LAUNCH_TIME = "DTRAIN_LAUNCH_TIME"
TTY = "DTRAIN_TTY"
ERROR_SPOOL = "DTRAIN_ERROR_SPOOL"
SOURCES = "DTRAIN_SOURCES"
TEST_CRASH_AT = "DTRAIN_TEST_CRASH_AT"  # "point:rank:save": SIGKILL this rank there (crash tests only)
NETWORK_INTERFACES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")  # set for a multi-node job, unless set already
# glibc's malloc hands a freed block of over 128 KiB (32 MiB at most, as its threshold adapts) back to the system,
# so a CPU step that frees and remakes its activations pays a page fault per 4 KiB of them, every step: the MNIST
# recipe trains 1.7x faster on CPU with freed blocks of up to 64 MiB kept for reuse (bench/malloc.py). Larger ones,
# rare in a CPU step (a data set decoded once), still go back: keeping those too cost 0.5 GiB of peak memory. torch's
# own CPU launcher (torch.backends.xeon.run_cpu) gets this by preloading jemalloc or tcmalloc; glibc's two
# thresholds need no library. Set for CPU workers, unless set already.
CPU_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}

# The variables the launch derives (not options): name -> (set by, meaning), for the documented table.
DERIVED = {
    DEVICE: ("`--cpu` / `--gpus`", "`cpu` or `cuda`; unset: cuda when available"),
    RUN_DIR: ("`--name` / `--run-dir`", "the run directory (default `runs/<recipe>-<timestamp>`)"),
    WORLD_SIZE: ("every launch", "the world launched; a worker that sees another one stops at `setup()`"),
    MIN_WORLD_SIZE: ("`--min-nodes`", "the smallest world the job may shrink to (its nodes times the processes per "
                     "node): a worker in a world from it up to `DTRAIN_WORLD_SIZE` goes on"),
    NODE_RANK: ("every launch", "this node's `--node-rank`: after a shrink, the ranks say which nodes are left"),
    DEEPSPEED_CONFIG: ("ZeRO strategies", "`<run_dir>/deepspeed.json`: the merged DeepSpeed config"),
    LAUNCH_TIME: ("`dtrain launch` (not `--dry-run`)", "Unix time it started: `Trainer` logs `startup_s` once"),
    TTY: ("`dtrain launch`, when its stdout is a terminal", "where rank 0 draws its progress bar"),
    ERROR_SPOOL: ("`dtrain launch` (not `--dry-run`)", "a folder of this node's, off the run directory's disk, where a "
                  "failed rank leaves its error record"),
    SOURCES: ("every launch", "where each worker option given was set, as JSON: option -> `the command line`, its "
              "`DTRAIN_*` variable, or `profile PATH`; `config.yaml` notes it beside the value"),
}
# dtrain's other variables, read by its recipes, scripts and tests: exported in a shell, they are no misspelling.
OTHERS = ("DTRAIN_DATA_DIR", "DTRAIN_SLURM_DIR", "DTRAIN_SLURM_PORT", TEST_CRASH_AT, "DTRAIN_WRITE_EXPECTED")
COMMAND_LINE = "the command line"
VARIABLES = frozenset({option.variable for option in WORKER_OPTIONS} | DERIVED.keys())  # every variable a launch sets


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker learns of the cluster job it runs in, from its engine (`dtrain.engines`). The ranks are
    set only where the engine started the workers itself (no launcher set RANK)."""

    engine: str
    job_id: str
    requeue_count: int = 0  # how often the engine has put this job back in the queue
    node_name: str | None = None  # the engine's name for this node (logical nodes may share a hostname)
    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None


@dataclasses.dataclass(frozen=True)
class WorkerEnv(WorkerOptions):
    """What a worker learns from its environment: every worker option (`WorkerOptions`: its default where the
    variable is absent), then where it runs."""

    rank: int
    local_rank: int
    world_size: int
    node_name: str  # the cluster engine's name for this node (logical nodes may share a hostname), else the hostname
    engine: str | None  # the cluster engine whose job this is (`dtrain.engines`), None outside one
    job_id: str | None
    requeue_count: int  # how often the engine has requeued this job
    device: str | None  # "cuda", "cpu", or None: cuda when available
    run_dir: str
    launched_world_size: int | None  # what `dtrain launch` asked the launcher for
    min_world_size: int | None  # with --min-nodes: the smallest world the job goes on in
    node_rank: int  # this node's --node-rank (not the launcher's, which a shrink renumbers)
    launch_time: float | None
    tty: str | None
    deepspeed_config: str | None
    error_spool: str | None
    sources: Mapping[str, str]  # DTRAIN_SOURCES: where each worker option given was set

    @property
    def options(self) -> dict[str, Any]:
        return {option.name: getattr(self, option.name) for option in WORKER_OPTIONS}


def read_env(environ: Mapping[str, str] | None = None, job: Job | None = None) -> WorkerEnv:
    """The worker's view; `job` (`dtrain.engines.job`) is what the cluster engine says, where the launcher did not."""
    environ = os.environ if environ is None else environ

    def first(name: str, fallback: int | None, default: int) -> int:
        return int(environ[name]) if environ.get(name) else default if fallback is None else fallback

    options = {option.name: option.decode(environ.get(option.variable)) for option in WORKER_OPTIONS}
    requeue_count = job.requeue_count if job is not None else 0
    if requeue_count > 0:  # a requeued job continues from its own newest checkpoint, whatever --resume said
        options["resume"] = "auto"
    return WorkerEnv(
        rank=first("RANK", job.rank if job else None, 0),
        local_rank=first("LOCAL_RANK", job.local_rank if job else None, 0),
        world_size=first("WORLD_SIZE", job.world_size if job else None, 1),
        node_name=job.node_name if job and job.node_name else socket.gethostname(),
        engine=job.engine if job is not None else None,
        job_id=job.job_id if job is not None else None,
        requeue_count=requeue_count,
        device=environ.get(DEVICE) or None,
        run_dir=environ.get(RUN_DIR) or str(DEFAULT / "default"),
        launched_world_size=int(environ[WORLD_SIZE]) if environ.get(WORLD_SIZE) else None,
        min_world_size=int(environ[MIN_WORLD_SIZE]) if environ.get(MIN_WORLD_SIZE) else None,
        node_rank=int(environ.get(NODE_RANK) or 0),
        launch_time=float(environ[LAUNCH_TIME]) if environ.get(LAUNCH_TIME) else None,
        tty=environ.get(TTY) or None,
        deepspeed_config=environ.get(DEEPSPEED_CONFIG) or None,
        error_spool=environ.get(ERROR_SPOOL) or None,
        sources=json.loads(environ.get(SOURCES) or "{}"),
        **options,
    )


def worker_env(spec: LaunchSpec, cpus: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment every worker process gets: the caller's, plus the DTRAIN_* contract."""
    env = dict(base)
    sources = {option.name: spec.sources[option.name] for option in WORKER_OPTIONS if option.name in spec.sources}
    values = {DEVICE: spec.device, RUN_DIR: spec.run_dir, WORLD_SIZE: str(spec.world_size),
              MIN_WORLD_SIZE: str(spec.min_nodes * spec.nproc) if spec.min_nodes else None,
              NODE_RANK: str(spec.node_rank),
              DEEPSPEED_CONFIG: spec.deepspeed_config_path, SOURCES: json.dumps(sources) if sources else None}
    values.update({option.variable: option.encode(getattr(spec, option.name)) for option in WORKER_OPTIONS})
    for key, value in values.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // spec.nproc)))
    if spec.device == "cpu":
        for name, value in CPU_MALLOC.items():
            env.setdefault(name, value)
    if spec.network:  # the interface toward node 0, unless the user named one
        for name in NETWORK_INTERFACES:
            env.setdefault(name, spec.network["interface"])
    return env


def options_from_environment(environ: Mapping[str, str], command: str) -> tuple[dict[str, Any], list[str]]:
    """The options of `command` that `DTRAIN_*` variables of the user's shell set, checked as their flags are; and a
    warning for each `DTRAIN_*` variable that dtrain does not read (a misspelling, named with its nearest option's).

    These come after the command line and before a profile; a submitted spec (`dtrain launch --spec`) read them
    when it was submitted, so the job's nodes do not read them again."""
    values = {}
    for option in for_command(command):
        text = environ.get(option.env) if option.env else None
        if text:
            values[option.name] = _from_variable(option, text)
    warnings = []
    for name in sorted(n for n in environ if n.startswith("DTRAIN_") and n not in VARIABLES | set(OTHERS)):
        near = difflib.get_close_matches(name, [option.variable for option in WORKER_OPTIONS], n=1)
        hint = f"did you mean {near[0]}?" if near else "the options' variables are listed in docs/architecture.md."
        warnings.append(f"{name} is not a variable dtrain reads, and is ignored; {hint}")
    return values, warnings


_BOOLEAN = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_KINDS = {int: "a whole number", float: "a number", bool: "1 or 0"}


def _from_variable(option: Option, text: str) -> Any:
    """A variable's text as its option's value, or one sentence naming the variable and what it takes."""
    shown = f"{option.env}={text!r}"
    try:
        value: Any
        if option.kind is bool:
            value = _BOOLEAN[text.strip().lower()]
        elif option.kind in (int, float):
            value = option.kind(text)
        else:  # words: Option.value splits a tuple's
            value = text
    except (KeyError, ValueError):
        example = f", e.g. {option.example}" if option.kind is not bool else ""
        raise UsageError(f"{shown} is not {_KINDS[option.kind]}, which {option.flag} takes{example}; fix or unset "
                         f"{option.env}.") from None
    try:
        return option.value(value)
    except UsageError as exc:
        raise UsageError(f"{str(exc).rstrip('.')} (from {shown}); fix or unset {option.env}.") from None


def markdown_table() -> str:
    """The contract as docs/architecture.md shows it: every variable, what sets it, what it means."""
    rows = [(f"`{option.variable}`", f"`{option.flag}`", option.help.replace("|", "\\|")) for option in WORKER_OPTIONS]
    rows += [(f"`{name}`", set_by, meaning) for name, (set_by, meaning) in DERIVED.items()]
    lines = ["| variable | set by | meaning |", "| --- | --- | --- |"]
    return "\n".join(lines + [f"| {a} | {b} | {c} |" for a, b, c in rows])


if __name__ == "__main__":
    print(markdown_table())


# --- the workers' error records (written by `dtrain.runtime.dist`, read by `dtrain launch` and a restarted world) ---

@dataclasses.dataclass(frozen=True)
class RankFailure:
    """The exception that stopped a worker, as `dtrain.runtime.dist` recorded it."""

    rank: int
    message: str
    time: float
    attempt: int  # the launcher's restart count
    usage: bool  # a UsageError: one sentence, no traceback


def failures(folder: str, world_size: int, since: float) -> list[RankFailure]:
    """The errors recorded in `folder` (`dtrain launch`'s spool or the run directory) since `since`, one per rank
    at most (a rank's record is replaced by its next attempt's)."""
    found = (read_error_record(RunDir.of(folder).error_record(rank)) for rank in range(world_size))
    return [f for f in found if f is not None and f.time >= since]


def first_failure(folder: str, world_size: int, since: float) -> RankFailure | None:
    """The earliest error recorded by a worker of the newest attempt since `since`; a usage error first: its
    sentence says what to do."""
    recorded = failures(folder, world_size, since)
    newest = [f for f in recorded if f.attempt == max((f.attempt for f in recorded), default=0)]
    return min(newest, key=lambda f: (not f.usage, f.time), default=None)


def read_error_record(path: Path) -> RankFailure | None:
    try:
        data = json.loads(path.read_text())
        return RankFailure(rank=int(data["rank"]), message=str(data["message"]), time=float(data["time"]),
                           attempt=int(data.get("attempt", 0)), usage=bool(data["usage"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
