"""LaunchSpec: what the user asked for, resolved against the machine, and the DTRAIN_* contract.

Everything here is pure: it decides, it never starts a process. The runtime side reads the
same variables back in `dtrain.runtime.env`, so a name changes in both places or in neither.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import signal
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from dtrain.checkpoints import check_committed
from dtrain.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MASTER_PORT = 29500

# The DTRAIN_* contract between launcher and workers (documented in docs/architecture.md).
ENV_DEVICE = "DTRAIN_DEVICE"
ENV_PRECISION = "DTRAIN_PRECISION"
ENV_SEED = "DTRAIN_SEED"
ENV_RUN_DIR = "DTRAIN_RUN_DIR"
ENV_MAX_STEPS = "DTRAIN_MAX_STEPS"
ENV_CHECKPOINT_EVERY = "DTRAIN_CHECKPOINT_EVERY"
ENV_KEEP_LAST = "DTRAIN_KEEP_LAST"
ENV_RESUME = "DTRAIN_RESUME"
ENV_ASYNC_CHECKPOINT = "DTRAIN_ASYNC_CHECKPOINT"
ENV_PREEMPT_SIGNAL = "DTRAIN_PREEMPT_SIGNAL"
ENV_MAX_REQUEUES = "DTRAIN_MAX_REQUEUES"
ENV_WANDB = "DTRAIN_WANDB"
ENV_WANDB_PROJECT = "DTRAIN_WANDB_PROJECT"
ENV_WANDB_ENTITY = "DTRAIN_WANDB_ENTITY"
ENV_WANDB_GROUP = "DTRAIN_WANDB_GROUP"
ENV_TAGS = "DTRAIN_TAGS"
ENV_TTY = "DTRAIN_TTY"  # the terminal of `dtrain launch`, where rank 0 draws its progress bar

WANDB_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_WANDB_PROJECT = "dtrain"

DEFAULT_PREEMPT_SIGNAL = "USR2"
DEFAULT_MAX_REQUEUES = 3


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """One job on one node: the launcher renders this into an argv and an environment."""

    recipe: str
    recipe_args: tuple[str, ...]
    device: str  # "cuda" or "cpu"
    nproc: int  # processes on this node
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    max_restarts: int
    precision: str
    seed: int
    max_steps: int | None
    name: str
    run_dir: str
    checkpoint_every: str = "epoch"
    keep_last: int | None = None
    resume: str = "auto"
    async_checkpoint: bool = False
    preempt_signal: str = DEFAULT_PREEMPT_SIGNAL  # checkpoint and stop (and requeue under SLURM)
    max_requeues: int = DEFAULT_MAX_REQUEUES
    wandb: str = "auto"
    wandb_project: str = DEFAULT_WANDB_PROJECT
    wandb_entity: str | None = None
    wandb_group: str | None = None  # default: the run name for multi-node jobs
    tags: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc

    @property
    def log_dir(self) -> str:
        return str(Path(self.run_dir) / "logs")

    @property
    def launcher_log(self) -> str:
        """torchrun's own output; one file per node, since nodes may share the run directory."""
        name = "launcher.log" if self.node_rank == 0 else f"launcher-node{self.node_rank}.log"
        return str(Path(self.log_dir) / name)


def load_profile(path: str, example: str = "launch/cpu_ddp.yaml") -> dict[str, Any]:
    """Read a YAML launch profile: a mapping of option names (as on the command line) to values."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"profile {path} does not exist; pass a YAML file such as {example}.") from None
    except OSError as exc:
        raise UsageError(f"cannot read profile {path} ({exc.strerror}); check its permissions.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UsageError(f"profile {path} is not valid YAML{line}; fix the syntax or remove the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"profile {path} must be a mapping of option: value, not a {type(data).__name__}.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def default_name(recipe: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{Path(recipe).stem}-{stamp}"


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve(options: Mapping[str, Any], gpus_available: int, free_port: int) -> LaunchSpec:
    """Turn merged CLI/profile options into a LaunchSpec, or raise UsageError saying what to fix.

    `gpus_available` and `free_port` come from the machine; passing them in keeps this pure.
    """
    recipe = options["recipe"]
    if not Path(recipe).is_file():
        raise UsageError(f"recipe {recipe} does not exist; pass the path of a Python training script.")

    precision = _value(options, "precision", "fp32")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")

    device, nproc = _resolve_processes(options, gpus_available)

    nodes = _value(options, "nodes", 1)
    node_rank = _value(options, "node_rank", 0)
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {nodes}.")
    if not 0 <= node_rank < nodes:
        raise UsageError(f"--node-rank must be between 0 and {nodes - 1} for {nodes} node(s), got {node_rank}.")

    master_addr = _value(options, "master_addr", "127.0.0.1")
    master_port = options.get("master_port")
    if master_port is None:
        master_port = free_port if nodes == 1 else DEFAULT_MASTER_PORT
    if not 1 <= master_port <= 65535:
        raise UsageError(f"--master-port must be between 1 and 65535, got {master_port}.")

    max_restarts = _value(options, "max_restarts", 0)
    if max_restarts < 0:
        raise UsageError(f"--max-restarts cannot be negative, got {max_restarts}.")
    max_steps = options.get("max_steps")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {max_steps}.")

    name, run_dir = _resolve_run_dir(options, recipe, nodes)
    checkpoint_every = _value(options, "checkpoint_every", "epoch")
    parse_checkpoint_every(checkpoint_every)
    keep_last = options.get("keep_last")
    if keep_last is not None and keep_last < 1:
        raise UsageError(f"--keep-last must be at least 1, got {keep_last}; leave it out to keep every checkpoint.")
    resume = _value(options, "resume", "auto")
    if resume not in ("auto", "never"):
        check_committed(Path(resume))
    preempt_signal = parse_signal_name(_value(options, "preempt_signal", DEFAULT_PREEMPT_SIGNAL))
    max_requeues = _value(options, "max_requeues", DEFAULT_MAX_REQUEUES)
    if max_requeues < 0:
        raise UsageError(f"--max-requeues cannot be negative, got {max_requeues}.")
    wandb = _value(options, "wandb", "auto")
    if wandb not in WANDB_MODES:
        raise UsageError(f"unknown --wandb mode {wandb!r}; use one of {', '.join(WANDB_MODES)}.")
    tags = tuple(t.strip() for t in str(options.get("tags") or "").split(",") if t.strip())
    return LaunchSpec(
        recipe=recipe,
        recipe_args=tuple(options.get("recipe_args") or ()),
        device=device,
        nproc=nproc,
        nodes=nodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        max_restarts=max_restarts,
        precision=precision,
        seed=_value(options, "seed", 0),
        max_steps=max_steps,
        name=name,
        run_dir=run_dir,
        checkpoint_every=checkpoint_every,
        keep_last=keep_last,
        resume=resume,
        async_checkpoint=bool(options.get("async_checkpoint")),
        preempt_signal=preempt_signal,
        max_requeues=max_requeues,
        wandb=wandb,
        wandb_project=_value(options, "wandb_project", DEFAULT_WANDB_PROJECT),
        wandb_entity=options.get("wandb_entity"),
        wandb_group=_value(options, "wandb_group", name if nodes > 1 else None),
        tags=tags,
    )


def wandb_mode(requested: str, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """`resolve_wandb_mode` with this machine's facts: is wandb installed, what ~/.netrc holds."""
    netrc = Path(environ.get("NETRC") or Path.home() / ".netrc")
    try:
        netrc_text = netrc.read_text()
    except OSError:
        netrc_text = ""
    return resolve_wandb_mode(requested, environ, importlib.util.find_spec("wandb") is not None, netrc_text)


def resolve_wandb_mode(requested: str, environ: Mapping[str, str], installed: bool,
                       netrc_text: str) -> tuple[str, str | None]:
    """`auto` -> online with credentials (WANDB_API_KEY or ~/.netrc), else offline; plus a notice to print.

    WANDB_MODE, when set, decides `auto`, as it would for wandb itself.
    """
    if requested == "disabled":
        return "disabled", None
    if not installed:
        if requested == "auto":
            return "disabled", "wandb is not installed, so metrics go to metrics.jsonl only (pip install wandb)."
        raise UsageError(f"--wandb {requested} needs the wandb package; pip install wandb, or pass --wandb disabled.")
    if requested != "auto":
        return requested, None
    preset = environ.get("WANDB_MODE", "").lower()
    if preset in ("online", "offline", "disabled"):
        return preset, None
    if environ.get("WANDB_API_KEY") or "api.wandb.ai" in netrc_text:
        return "online", None
    return "offline", "no W&B credentials found, so W&B logs offline into the run directory (wandb sync it later)."


def parse_signal_name(text: str) -> str:
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


def _value(options: Mapping[str, Any], key: str, default: Any) -> Any:
    """The option's value, or `default` only when it was not given (0 is a value, not "unset")."""
    value = options.get(key)
    return default if value is None else value


def _resolve_processes(options: Mapping[str, Any], gpus_available: int) -> tuple[str, int]:
    """Pick the device and processes per node: explicit --cpu, explicit --gpus, or whatever is here."""
    gpus, nproc, cpu = options.get("gpus"), options.get("nproc"), options.get("cpu")
    if cpu and gpus is not None:
        raise UsageError("--cpu and --gpus contradict each other; pass one of them.")
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {nproc}.")
    if cpu:
        return "cpu", nproc or 1
    if gpus is not None:
        if nproc is not None:
            raise UsageError("--nproc is for CPU processes; with GPUs use --gpus N (one process per GPU).")
        if gpus < 1:
            raise UsageError(f"--gpus must be at least 1, got {gpus}; use --cpu to run without GPUs.")
        if gpus_available == 0:
            raise UsageError(
                f"--gpus {gpus} asks for GPUs but none is visible on this machine; "
                "run on CPU processes with --cpu --nproc N."
            )
        if gpus > gpus_available:
            raise UsageError(
                f"--gpus {gpus} asks for more GPUs than the {gpus_available} visible here; "
                f"pass --gpus {gpus_available} or fewer."
            )
        return "cuda", gpus
    if nproc is not None:
        raise UsageError("--nproc sets CPU processes and needs --cpu; with GPUs use --gpus N.")
    if gpus_available == 0:
        return "cpu", 1
    return "cuda", gpus_available


def _resolve_run_dir(options: Mapping[str, Any], recipe: str, nodes: int) -> tuple[str, str]:
    name, run_dir = options.get("name"), options.get("run_dir")
    if name is not None and not _NAME_RE.match(name):
        raise UsageError(f"run name {name!r} may hold only letters, digits, '.', '_' and '-'.")
    if run_dir is not None:
        return (name or Path(run_dir).name), str(run_dir)
    if name is None:
        if nodes > 1:
            raise UsageError(
                "a multi-node launch needs --name (or --run-dir), the same on every node, "
                "so that all nodes join one rendezvous and share one run directory."
            )
        name = default_name(recipe)
    return name, str(Path("runs") / name)


def worker_env(spec: LaunchSpec, cpus: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment every worker process gets: the caller's, plus the DTRAIN_* contract."""
    env = dict(base)
    env[ENV_DEVICE] = spec.device
    env[ENV_PRECISION] = spec.precision
    env[ENV_SEED] = str(spec.seed)
    env[ENV_RUN_DIR] = spec.run_dir
    env[ENV_CHECKPOINT_EVERY] = spec.checkpoint_every
    env[ENV_RESUME] = spec.resume
    env[ENV_PREEMPT_SIGNAL] = spec.preempt_signal
    env[ENV_MAX_REQUEUES] = str(spec.max_requeues)
    env[ENV_WANDB] = spec.wandb
    env[ENV_WANDB_PROJECT] = spec.wandb_project
    optional = {ENV_MAX_STEPS: spec.max_steps, ENV_KEEP_LAST: spec.keep_last,
                ENV_ASYNC_CHECKPOINT: "1" if spec.async_checkpoint else None,
                ENV_WANDB_ENTITY: spec.wandb_entity, ENV_WANDB_GROUP: spec.wandb_group,
                ENV_TAGS: ",".join(spec.tags) or None}
    for key, value in optional.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // spec.nproc)))
    return env
