"""The launch options: one table, the only place an option is declared.

A row says an option's flag (`--` + its name with dashes), type or choices, default, the
`DTRAIN_*` variable that carries it to every worker (if it reaches them), its help, the commands
that take it, and an example value for the tests generated from this table. The click commands
(`dtrain.cli`), the spec's defaults and checks (`dtrain.core.spec`), the workers' environment and its
reader (`dtrain.core.contract`) and the contract's table in docs/architecture.md all come from here:
a new option is one row plus the code that uses it.

No torch, no click here: the launch side reads it, and so do the workers (through the contract).
"""

from __future__ import annotations

import dataclasses
import re
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dtrain.core import launchers, strategies
from dtrain.errors import UsageError

LAUNCH, DEBUG, SUBMIT, SWEEP = "launch", "debug", "submit", "sweep"
RUN = frozenset({LAUNCH, DEBUG, SUBMIT, SWEEP})  # every command that runs a recipe
JOB = frozenset({LAUNCH, SUBMIT, SWEEP})  # the commands that start processes through a launcher

SCOPES = {
    "workers": "every worker, through its DTRAIN_* variable (and the launch side, which checks it)",
    "launcher": "the launcher program (how it starts, restarts and joins the processes)",
    "job": "resolved into the job's shape: device, processes, nodes, rendezvous, run directory",
    "engine": "a cluster engine's job: what `dtrain <engine> submit` asks of the scheduler (each engine's own rows)",
    "command": "the command itself (where its options come from, what it prints)",
    "sweep": "the runs of a sweep: which recipe arguments each gets, how many run at once, which is best",
}
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: decided on the node that computes (spec.auto_precision)
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class Option:
    """One launch option."""

    name: str  # the Python name; the flag is --name-with-dashes, a profile key either spelling
    kind: type  # int, str, bool (a flag), or tuple (comma-separated words)
    help: str
    scope: str = "workers"  # who uses it: see SCOPES
    default: Any = None  # the value when nothing sets it; None: unset (absent from the workers' environment)
    env: str | None = None  # the DTRAIN_* variable that carries the resolved value to every worker
    commands: frozenset[str] = RUN
    choices: tuple[str, ...] | None = None
    check: Callable[[str, Any], Any] | None = None  # (flag, value) -> the value to use, or UsageError
    example: str | int | float | bool | None = None  # a value other than the default, as typed on the command line
    group: str | None = None  # rows whose examples exclude each other's are in different groups
    flag_value: str | None = None  # the value of the bare flag, for an option whose value is optional
    metavar: str | None = None
    multiple: bool = False  # repeatable: the value is the tuple of every occurrence
    decided: bool = False  # no default in the table, yet `resolve` always decides it: a spec's is never None

    def __post_init__(self) -> None:
        if self.scope not in SCOPES or (self.env is None) == (self.scope == "workers"):
            raise ValueError(f"option {self.name}: a DTRAIN_* variable is what makes the scope 'workers', "
                             f"and {self.scope!r} is one of {', '.join(SCOPES)}")

    @property
    def variable(self) -> str:
        """The DTRAIN_* variable of a worker option."""
        if self.env is None:
            raise AttributeError(f"option {self.name} is not a worker option: it has no variable")
        return self.env

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, given: Any) -> Any:
        """The option's value from what the user gave (None: not given), checked."""
        value = self.default if given is None else given
        if value is None:
            return None
        if self.kind is tuple and isinstance(value, str):
            value = tuple(word.strip() for word in value.split(",") if word.strip())
        if self.choices and value not in self.choices:
            raise UsageError(f"unknown {self.flag} {value!r}; use one of {', '.join(self.choices)}.")
        return self.check(self.flag, value) if self.check else value

    def encode(self, value: Any) -> str | None:
        """The variable's text for a resolved value; None: the variable is left out."""
        if value is None or value is False or value == ():
            return None
        if value is True:
            return "1"
        return ",".join(value) if self.kind is tuple else str(value)

    def decode(self, text: str | None) -> Any:
        """A worker's reading of the variable: the launch's value, or the default when it is absent."""
        if not text:
            return self.default
        if self.kind is bool:
            return text == "1"
        if self.kind is tuple:
            return tuple(word for word in text.split(",") if word)
        return self.kind(text)

    def shown(self, value: Any) -> str:
        """The option as a user would type it with `value`."""
        return self.flag if self.kind is bool else f"{self.flag} {self.encode(value)}"

    def argv(self, value: Any) -> list[str]:
        """The command-line words that give this option `value`."""
        if self.kind is bool:
            return [self.flag] if value else []
        return [self.flag, str(value)]


# --- checks: (flag, value) -> value, or a UsageError naming the problem and the fix ----------------------

def at_least(minimum: int, fix: str = "") -> Callable[[str, int], int]:
    def check(flag: str, value: int) -> int:
        if value < minimum:
            problem = "cannot be negative" if minimum == 0 else f"must be at least {minimum}"
            raise UsageError(f"{flag} {problem}, got {value}{fix}.")
        return value
    return check


def positive(flag: str, value: float) -> float:
    if not value > 0:
        raise UsageError(f"{flag} must be a positive number, got {value}.")
    return value


def parse_trace(text: str) -> tuple[int, int, int]:
    """`WAIT,WARMUP,ACTIVE` -> steps to skip, to warm up (traced, then dropped) and to keep, as in
    torch.profiler.schedule."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[2]) < 1:
        raise UsageError(f"--trace {text!r} is not a window of steps; give WAIT,WARMUP,ACTIVE step counts, as in "
                         "--trace 10,2,3 (skip 10, warm up 2, trace 3).")
    wait, warmup, active = map(int, parts)
    return wait, warmup, active


def trace(flag: str, value: str) -> str:
    parse_trace(value)
    return value


def rank_numbers(flag: str, value: tuple[str, ...]) -> tuple[str, ...]:
    if not all(word.isdigit() for word in value):
        raise UsageError(f"{flag} takes rank numbers, comma-separated, as in 0,1; got {','.join(value)!r}.")
    return value


def signal_name(flag: str, text: str) -> str:
    """`USR2`, `SIGUSR2` or `12` -> `USR2`: a signal a process can catch."""
    name = str(text).strip().upper().removeprefix("SIG")
    if name.isdigit():
        try:
            name = signal.Signals(int(name)).name.removeprefix("SIG")
        except ValueError:
            name = ""
    if not name or not hasattr(signal, f"SIG{name}") or name in ("KILL", "STOP"):
        raise UsageError(f"{text!r} is not a signal a process can catch; use a name such as USR2.")
    return name


def parse_checkpoint_every(value: str) -> tuple[int | None, bool]:
    """`N`, `epoch`, `N,epoch` or `never` -> (save every N steps or None, save at each epoch end)."""
    steps, epoch = None, False
    for part in filter(None, (p.strip() for p in str(value).split(","))):
        if part == "epoch":
            epoch = True
        elif part == "never":
            continue
        elif part.isdigit() and int(part) > 0:
            steps = int(part)
        else:
            raise UsageError(f"--checkpoint-every {value!r} is not understood; use a step count (500), "
                             "epoch, both (500,epoch) or never.")
    return steps, epoch


def checkpoint_every(flag: str, value: str) -> str:
    parse_checkpoint_every(value)
    return value


def resume(flag: str, value: str) -> str:
    if value not in ("auto", "never"):
        from dtrain.core.checkpoints import check_committed

        check_committed(Path(value))
    return value


_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def class_names(flag: str, value: str) -> str:
    if value == "auto":
        return value
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if not names or not all(_CLASS_NAME.match(n) for n in names):
        raise UsageError(f"{flag} takes class names such as TransformerEncoderLayer (comma-separated), not "
                         f"{value!r}; or give no value for the recipe's blocks.")
    return ",".join(names)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def run_name(flag: str, value: str) -> str:
    if not _NAME.match(value):
        raise UsageError(f"run name {value!r} may hold only letters, digits, '.', '_' and '-'.")
    return value


def port(flag: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise UsageError(f"{flag} must be between 1 and 65535, got {value}.")
    return value


ONE_NODE = frozenset({LAUNCH})  # one node of a job: a cluster engine gives these to a job's nodes itself
CLUSTER = frozenset({SUBMIT})
SWEEPS = frozenset({SWEEP, SUBMIT})  # a sweep runs here, or as one cluster job

OPTIONS: tuple[Option, ...] = (
    # What runs, and how: every command that runs a recipe.
    Option("cpu", bool, "Run on CPU processes (gloo), even if GPUs exist.", "job", example=True),
    Option("precision", str, "Numeric precision: fp32 (default), bf16 autocast, fp16 autocast with a GradScaler, "
           "or auto: bf16 where the device computes it natively (CUDA compute capability 8.0+, CPUs with AMX or "
           "AVX-512 BF16), else fp32.", default="fp32", env="DTRAIN_PRECISION", choices=PRECISIONS, example="bf16"),
    Option("seed", int, "Base random seed (default 0); rank r uses seed + r, the data order uses seed.",
           default=0, env="DTRAIN_SEED", example=7),
    Option("max_steps", int, "Stop after this many optimizer steps (smoke runs).", env="DTRAIN_MAX_STEPS",
           check=at_least(1), example=5),
    Option("name", str, "Run name: the run directory is runs/NAME (default: recipe-timestamp).", "job",
           check=run_name),
    Option("run_dir", str, "Run directory (overrides runs/NAME).", "job", metavar="DIRECTORY"),
    Option("checkpoint_every", str, "When to checkpoint: N steps, epoch (default), N,epoch, or never.",
           default="epoch", env="DTRAIN_CHECKPOINT_EVERY", check=checkpoint_every, example="100,epoch"),
    Option("keep_last", int, "Keep only the newest K committed checkpoints (default: all).", env="DTRAIN_KEEP_LAST",
           check=at_least(1, "; leave it out to keep every checkpoint"), example=2),
    Option("resume", str, "auto (default: continue from the run directory's newest good checkpoint), never, or a "
           "checkpoints/step_N folder.", default="auto", env="DTRAIN_RESUME", check=resume, example="never"),
    Option("async_checkpoint", bool, "Write checkpoints in the background while training goes on.", default=False,
           env="DTRAIN_ASYNC_CHECKPOINT", example=True, group="dcp"),
    Option("wandb", str, "Weights & Biases from rank 0: auto (default: online with credentials, else offline), "
           "online, offline, disabled.", default="auto", env="DTRAIN_WANDB", choices=WANDB_MODES, example="offline"),
    Option("wandb_project", str, "W&B project (default dtrain).", default="dtrain", env="DTRAIN_WANDB_PROJECT",
           example="tests"),
    Option("wandb_entity", str, "W&B entity (team or user).", env="DTRAIN_WANDB_ENTITY", example="team"),
    Option("wandb_group", str, "W&B group (default: the run name for multi-node jobs, ENGINE-JOBID in a cluster job).",
           env="DTRAIN_WANDB_GROUP", example="group"),
    Option("tags", tuple, "W&B tags, comma-separated.", default=(), env="DTRAIN_TAGS", example="a,b"),
    Option("tensorboard", bool, "TensorBoard event files from rank 0, in runs/NAME/tensorboard/.", default=False,
           env="DTRAIN_TENSORBOARD", example=True),
    Option("mlflow", str, "MLflow from rank 0, to this tracking URI; no value: MLFLOW_TRACKING_URI, else a SQLite "
           "store in runs/NAME/mlflow/.", env="DTRAIN_MLFLOW", flag_value="auto", metavar="[URI]",
           example="http://127.0.0.1:5000"),
    Option("mlflow_experiment", str, "MLflow experiment (default dtrain).", default="dtrain",
           env="DTRAIN_MLFLOW_EXPERIMENT", example="tests"),
    Option("strategy", str, "ddp (default), fsdp (FSDP2: fully_shard per block), or DeepSpeed ZeRO stage 1, 2 or "
           "3.", default="ddp", env="DTRAIN_STRATEGY", choices=tuple(strategies.STRATEGIES), example="zero1",
           group="zero"),
    Option("grad_accum", int, "Accumulate gradients over N micro-batches per optimizer step (default 1).",
           default=1, env="DTRAIN_GRAD_ACCUM", check=at_least(1), example=2),
    Option("activation_checkpointing", str, "Recompute these blocks' activations in backward; no value: the "
           "recipe's blocks.", env="DTRAIN_ACTIVATION_CHECKPOINTING", check=class_names, example="Linear",
           flag_value="auto", metavar="[CLASS,...]"),
    Option("deepspeed_config", str, "DeepSpeed config for the ZeRO strategies (default: dtrain's zeroN.json, as "
           "in launch/deepspeed/); must agree with --strategy, --precision and --grad-accum.", "job",
           metavar="JSON", example="launch/deepspeed/zero1.json", group="zero"),
    Option("timeout", int, "Collective time-out in seconds (default 600): a collective that waits longer fails.",
           default=600, env="DTRAIN_TIMEOUT_S", check=at_least(1), example=120),
    Option("trace", str, "Trace a window of steps with torch.profiler: WAIT,WARMUP,ACTIVE steps (e.g. 10,2,3); one "
           "Chrome trace per rank in runs/NAME/traces/.", env="DTRAIN_TRACE", check=trace, example="1,1,2",
           metavar="WAIT,WARMUP,ACTIVE"),
    Option("trace_ranks", tuple, "The ranks that --trace traces, comma-separated (default 0).", default=(),
           env="DTRAIN_TRACE_RANKS", check=rank_numbers, example="0,1"),
    Option("memory_snapshot", bool, "With --trace on GPUs: a CUDA memory snapshot of the traced steps "
           "(traces/memory-rank<R>.pickle, for pytorch.org/memory_viz).", default=False,
           env="DTRAIN_MEMORY_SNAPSHOT", example=True),
    Option("cuda_graph", bool, "Replay the model's forward and backward from CUDA graphs, for a small model whose "
           "step is bound by kernel launches: one GPU process, --strategy ddp, no activation checkpointing.",
           default=False, env="DTRAIN_CUDA_GRAPH", example=True, group="cuda"),
    Option("peak_tflops", float, "The device's dense peak TFLOP/s at this precision, for MFU (default: from dtrain's "
           "table of GPUs; none on CPU).", env="DTRAIN_PEAK_TFLOPS", check=positive, example=100.0),
    # How the processes start: the commands that use a launcher.
    Option("launcher", str, "What starts the processes: torchrun, accelerate launch, the deepspeed launcher, "
           "local (dtrain's own agent, without torch: the default for many processes on one node without "
           "--max-restarts) or direct (no launcher: the default for one process there); torchrun otherwise.",
           "launcher", commands=JOB, choices=tuple(launchers.LAUNCHERS), decided=True),
    Option("nproc", int, "CPU processes per node (with --cpu).", "job", commands=JOB, check=at_least(1), example=2),
    Option("nodes", int, "Number of nodes (default 1).", "job", default=1, commands=JOB - {SWEEP},
           check=at_least(1)),
    Option("max_restarts", int, "Restart the whole group up to K times when a worker dies.", "launcher", default=0,
           commands=JOB, check=at_least(0)),
    Option("min_nodes", int, "Go on with as few as K nodes: when a node is lost, the others restart on fewer nodes "
           "from the newest checkpoint (elastic shrink; default: the job needs every node).", "launcher",
           commands=JOB - {SWEEP}, check=at_least(1)),
    Option("replica_groups", int, "Train as one of R replica groups that keep stepping when another dies, and heal a "
           "restarted one from a live peer without a checkpoint (torchft's fault-tolerant DDP: one process per group, "
           "each its own `dtrain launch` and run directory; default 1).", default=1, env="DTRAIN_REPLICA_GROUPS",
           commands=JOB - {SWEEP}, check=at_least(1), example=2),
    Option("replica_group", int, "This launch's replica group, 0 .. R-1 (with --replica-groups).", default=0,
           env="DTRAIN_REPLICA_GROUP", commands=JOB - {SWEEP}, check=at_least(0), example=1),
    Option("lighthouse", str, "The torchft lighthouse that joins the replica groups, http://HOST:PORT (default: "
           "$TORCHFT_LIGHTHOUSE).", env="DTRAIN_LIGHTHOUSE", commands=JOB - {SWEEP},
           example="http://127.0.0.1:29510", metavar="URL"),
    Option("preflight", bool, "In a cluster job, before training: time a matrix multiplication on every rank (dtrain "
           "doctor's preflight) and requeue the job without a node slower than the others (counts against "
           "--max-requeues).", "launcher", default=False, commands=CLUSTER),
    Option("rdzv_timeout", int, "Seconds the rendezvous waits for every node to join (default 600).", "launcher",
           default=600, commands=JOB, check=at_least(1)),
    Option("max_requeues", int, "In a cluster job, requeue it at most K times on the pre-timeout signal "
           "(default 3).", default=3, env="DTRAIN_MAX_REQUEUES", commands=JOB, check=at_least(0), example=5),
    Option("preempt_signal", str, "Signal that makes every rank checkpoint and stop (default USR2); in a cluster "
           "job rank 0 then requeues it.", default="USR2", env="DTRAIN_PREEMPT_SIGNAL", commands=JOB,
           check=signal_name, example="USR1"),
    Option("profile", str, "YAML file of these options (see launch/); the command line wins.", "command",
           commands=JOB),
    Option("dry_run", bool, "Print what would run, run nothing.", "command", commands=JOB),
    Option("gpus", int, "GPUs (= processes) per node; default: every visible GPU.", "job",
           commands=ONE_NODE | {SWEEP}),
    Option("node_rank", int, "This node's rank, 0 .. nodes-1 (in a cluster job: the engine's).", "job", default=0,
           commands=ONE_NODE),
    Option("master_addr", str, "Rendezvous host: node rank 0's address (default 127.0.0.1; in a cluster job its "
           "first node).", "job", default="127.0.0.1", commands=ONE_NODE),
    Option("master_port", int, "Rendezvous port (default: a free port on one node, 29500 on many, from the job id "
           "in a cluster job).", "job", commands=ONE_NODE, check=port),
    Option("spec", str, "Launch the resolved options that `dtrain <engine> submit` saved in FILE (as a job's nodes "
           "do); give no other option with it.", "command", commands=ONE_NODE, metavar="FILE"),
    # Which runs a sweep makes, and how they run.
    Option("grid", str, "A recipe argument and its values, KEY=V1,V2,... (repeat for more); the sweep runs every "
           "combination.", "sweep", commands=SWEEPS, metavar="KEY=V1,V2,...", multiple=True),
    Option("draw", str, "A recipe argument drawn at random, KEY=LOW:HIGH (KEY=LOW:HIGH:log: log-uniformly), "
           "--draws times per grid point.", "sweep", commands=SWEEPS, metavar="KEY=LOW:HIGH[:log]", multiple=True),
    Option("draws", int, "Random draws per grid point (with --draw).", "sweep", commands=SWEEPS, check=at_least(1)),
    Option("sweep_seed", int, "Seed of the random draws (default 0): the same seed draws the same runs.", "sweep",
           default=0, commands=SWEEPS),
    Option("parallel", int, "Runs at once (default 1): here if the CPUs or GPUs allow it; in a cluster "
           "job, how many of its runs at once.", "sweep", default=1, commands=SWEEPS, check=at_least(1)),
    Option("metric", str, "NAME[:min|max]: the series that marks the best run (without a goal: min for a loss or "
           "error, else max).", "sweep", commands=frozenset({SWEEP}), metavar="NAME[:min|max]"),
    # What a cluster job asks for, whatever its engine (`dtrain <engine> submit`); each engine adds rows of its own.
    Option("gpus_per_node", int, "GPUs (= processes) per node.", "job", commands=CLUSTER),
)

BY_NAME = {option.name: option for option in OPTIONS}
WORKER_OPTIONS = tuple(option for option in OPTIONS if option.scope == "workers")
SPEC_OPTIONS = tuple(option for option in OPTIONS if option.scope in ("workers", "launcher"))  # LaunchSpec.options


def for_command(command: str) -> tuple[Option, ...]:
    return tuple(option for option in OPTIONS if command in option.commands)


def default(name: str) -> Any:
    return BY_NAME[name].default


def origins(values: Mapping[str, Any], sources: Mapping[str, str]) -> list[str]:
    """`--timeout 30 (from DTRAIN_TIMEOUT_S)`: where each option in `sources` was set, in the table's order."""
    return [f"{option.shown(values[option.name])} (from {sources[option.name]})" for option in OPTIONS
            if option.name in sources]


_ANNOTATIONS = {int: "int", float: "float", str: "str", bool: "bool", tuple: "tuple[str, ...]"}


def fields_module() -> str:
    """dtrain/core/fields.py: each option of the spec and of the worker contract as a typed field, in the table's
    order (a fast test checks the committed file against this)."""

    def fields(rows: tuple[Option, ...]) -> list[str]:
        return [f"    {o.name}: {_ANNOTATIONS[o.kind]}{' | None' if o.default is None and not o.decided else ''}"
                for o in rows]

    return "\n".join([
        '"""The options as typed fields, generated from the table in `dtrain.core.options`:',
        "`python -m dtrain.core.options > dtrain/core/fields.py`. A misspelt option fails in the type checker.",
        '"""', "", "from __future__ import annotations", "", "import dataclasses", "", "",
        "@dataclasses.dataclass(frozen=True)", "class WorkerOptions:",
        '    """Every worker option: what each worker reads from its DTRAIN_* variable."""', "",
        *fields(WORKER_OPTIONS), "", "",
        "@dataclasses.dataclass(frozen=True)", "class SpecOptions(WorkerOptions):",
        '    """What a LaunchSpec holds beyond the worker options: the launcher\'s."""', "",
        *fields(tuple(o for o in SPEC_OPTIONS if o.scope != "workers")), ""])


if __name__ == "__main__":
    print(fields_module(), end="")
