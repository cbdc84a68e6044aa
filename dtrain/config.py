"""LaunchSpec: what the user asked for, resolved against the machine, and the DTRAIN_* contract.

Everything here is pure: it decides, it never starts a process. The runtime side reads the
same variables back in `dtrain.runtime.env`, so a name changes in both places or in neither.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from dtrain.checkpoints import check_committed
from dtrain.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")
LAUNCHERS = ("torchrun", "accelerate", "deepspeed")
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
DEFAULT_MASTER_PORT = 29500
DEEPSPEED_CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "deepspeed"  # zero1.json ... zero3.json

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
ENV_STRATEGY = "DTRAIN_STRATEGY"
ENV_GRAD_ACCUM = "DTRAIN_GRAD_ACCUM"
ENV_ACTIVATION_CHECKPOINTING = "DTRAIN_ACTIVATION_CHECKPOINTING"  # "auto" (the recipe's blocks) or class names
ENV_DEEPSPEED_CONFIG = "DTRAIN_DEEPSPEED_CONFIG"  # the merged DeepSpeed JSON, for ZeRO strategies
ENV_WORLD_SIZE = "DTRAIN_WORLD_SIZE"  # the world launched; a worker that sees another one stops
ENV_LAUNCH_TIME = "DTRAIN_LAUNCH_TIME"  # when `dtrain launch` started (Unix time): the start-up a run reports

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
    launcher: str = "torchrun"
    strategy: str = "ddp"
    grad_accum: int = 1
    activation_checkpointing: str | None = None  # "auto": the recipe's blocks; else comma-separated class names
    deepspeed_config: Mapping[str, Any] | None = None  # merged, for zero1-3; written to <run_dir>/deepspeed.json

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc

    @property
    def deepspeed_config_path(self) -> str | None:
        """Where the launch writes the merged DeepSpeed JSON that the workers read."""
        return str(Path(self.run_dir) / "deepspeed.json") if self.deepspeed_config is not None else None

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
    import yaml  # here, not at the top: most commands read no profile, and --help stays quicker

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


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve(options: Mapping[str, Any], gpus_available: int, free_port: int,
            is_installed: Callable[[str], bool] = installed, compute_capability: float | None = None) -> LaunchSpec:
    """Turn merged CLI/profile options into a LaunchSpec, or raise UsageError saying what to fix.

    `gpus_available`, `free_port`, `is_installed` and the GPUs' `compute_capability` come from
    the machine; passing them in keeps this pure.
    """
    recipe = options["recipe"]
    if not Path(recipe).is_file():
        raise UsageError(f"recipe {recipe} does not exist; pass the path of a Python training script.")

    device, nproc = _resolve_processes(options, gpus_available)
    parallel = resolve_parallelism(options, device, is_installed)
    precision = parallel.precision
    if precision == "bf16" and device == "cuda" and compute_capability is not None and compute_capability < 8.0:
        raise UsageError(f"bf16 needs GPUs of compute capability 8.0 (Ampere) or newer, and this machine has "
                         f"{compute_capability}; use --precision fp16 or fp32.")

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
        launcher=parallel.launcher,
        strategy=parallel.strategy,
        grad_accum=parallel.grad_accum,
        activation_checkpointing=parallel.activation_checkpointing,
        deepspeed_config=parallel.deepspeed_config,
    )


@dataclasses.dataclass(frozen=True)
class Parallelism:
    launcher: str
    strategy: str
    precision: str
    grad_accum: int
    activation_checkpointing: str | None
    deepspeed_config: Mapping[str, Any] | None


_CLASS_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def resolve_parallelism(options: Mapping[str, Any], device: str,
                        is_installed: Callable[[str], bool] = installed) -> Parallelism:
    """Launcher, strategy, precision, accumulation and activation checkpointing, checked together.

    A DeepSpeed JSON (--deepspeed-config) fills what the command line leaves out (ZeRO stage,
    precision, accumulation) and must agree with what it sets.
    """
    launcher = _value(options, "launcher", "torchrun")
    if launcher not in LAUNCHERS:
        raise UsageError(f"unknown launcher {launcher!r}; use one of {', '.join(LAUNCHERS)}.")
    user_config, source = None, None
    if options.get("deepspeed_config"):
        source = str(options["deepspeed_config"])
        user_config = load_deepspeed_json(source)
    stage = (user_config or {}).get("zero_optimization", {}).get("stage")
    strategy = options.get("strategy") or (f"zero{stage}" if isinstance(stage, int) and user_config else "ddp")
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    if user_config is not None and not strategy.startswith("zero"):
        raise UsageError(f"--deepspeed-config is for the ZeRO strategies, not --strategy {strategy}; "
                         "pass --strategy zero1, zero2 or zero3, or leave the DeepSpeed file out.")
    precision = options.get("precision") or _deepspeed_precision(user_config) or "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    accumulation = (user_config or {}).get("gradient_accumulation_steps")
    grad_accum = _value(options, "grad_accum", accumulation if isinstance(accumulation, int) else 1)
    if grad_accum < 1:
        raise UsageError(f"--grad-accum must be at least 1, got {grad_accum}.")
    needs = []  # (package, the option that needs it, the way out)
    if strategy.startswith("zero"):
        needs.append(("deepspeed", f"--strategy {strategy}", "use --strategy ddp or fsdp"))
    if launcher != "torchrun":
        needs.append((launcher, f"--launcher {launcher}", "leave --launcher out (torchrun)"))
    for package, option, way_out in needs:
        if not is_installed(package):
            raise UsageError(f"{option} needs {package}, which is not installed here; pip install {package}, "
                             f"or {way_out}.")
    deepspeed_config = None
    if strategy.startswith("zero"):
        if options.get("async_checkpoint"):
            raise UsageError(f"--async-checkpoint is not available with --strategy {strategy}: DeepSpeed writes its "
                             "checkpoint files itself, synchronously; leave --async-checkpoint out.")
        if precision == "fp16" and device == "cpu":
            raise UsageError(f"DeepSpeed cannot train in fp16 on CPU; with --strategy {strategy} use --precision "
                             "bf16 or fp32, or use --strategy ddp or fsdp for fp16.")
        base = user_config if user_config is not None else load_deepspeed_json(
            str(DEEPSPEED_CONFIGS / f"{strategy}.json"))
        deepspeed_config = merge_deepspeed_config(base, int(strategy[-1]), precision, grad_accum,
                                                  source or f"launch/deepspeed/{strategy}.json")
    checkpointing = options.get("activation_checkpointing")
    if checkpointing is not None and checkpointing != "auto":
        names = [n.strip() for n in str(checkpointing).split(",") if n.strip()]
        bad = [n for n in names if not _CLASS_NAME_RE.match(n)]
        if not names or bad:
            raise UsageError(f"--activation-checkpointing takes class names such as TransformerEncoderLayer "
                             f"(comma-separated), not {checkpointing!r}; or give no value for the recipe's blocks.")
        checkpointing = ",".join(names)
    return Parallelism(launcher, strategy, precision, grad_accum, checkpointing, deepspeed_config)


def load_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"DeepSpeed config {path} does not exist; pass a JSON file such as "
                         "launch/deepspeed/zero2.json.") from None
    except OSError as exc:
        raise UsageError(f"cannot read DeepSpeed config {path} ({exc.strerror}).") from None
    except ValueError as exc:
        raise UsageError(f"DeepSpeed config {path} is not valid JSON ({exc}); fix the syntax.") from None
    if not isinstance(data, dict):
        raise UsageError(f"DeepSpeed config {path} must be a JSON object, not a {type(data).__name__}.")
    return data


def _deepspeed_precision(config: Mapping[str, Any] | None) -> str | None:
    for name in ("bf16", "fp16"):
        if (config or {}).get(name, {}).get("enabled") is True:
            return name
    return None


def merge_deepspeed_config(config: Mapping[str, Any], stage: int, precision: str, grad_accum: int,
                           source: str) -> dict[str, Any]:
    """`config` with dtrain's ZeRO stage, precision and accumulation; a value the file fixed otherwise
    is a contradiction ("auto" is not). The micro-batch size is the recipe's, set by the runtime."""
    merged = json.loads(json.dumps(config))
    for section in ("optimizer", "scheduler"):
        if section in merged:
            raise UsageError(f"{source} has a {section!r} section, but dtrain uses the recipe's own {section}; "
                             f"remove that section.")
    zero = merged.setdefault("zero_optimization", {})
    if zero.get("stage", "auto") not in ("auto", stage):
        raise UsageError(f"{source} sets zero_optimization.stage {zero['stage']}, but --strategy zero{stage} asks "
                         f"for stage {stage}; make them agree (or leave --strategy out to use the file's).")
    zero["stage"] = stage
    for name in ("bf16", "fp16"):
        section = merged.setdefault(name, {})
        if section.get("enabled", "auto") not in ("auto", name == precision):
            raise UsageError(f"{source} sets {name}.enabled {str(section['enabled']).lower()}, but --precision is "
                             f"{precision}; make them agree (or leave --precision out to use the file's).")
        section["enabled"] = name == precision
    if merged.get("gradient_accumulation_steps", "auto") not in ("auto", grad_accum):
        raise UsageError(f"{source} sets gradient_accumulation_steps {merged['gradient_accumulation_steps']}, but "
                         f"--grad-accum is {grad_accum}; make them agree (or leave --grad-accum out).")
    merged["gradient_accumulation_steps"] = grad_accum
    merged.setdefault("zero_allow_untested_optimizer", True)  # any torch optimizer: the recipe chooses it
    return merged


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


def launch_files(spec: LaunchSpec) -> dict[str, str]:
    """Files a launch writes into the run directory before starting anything: path -> text."""
    files = {}
    if spec.deepspeed_config is not None:
        files[spec.deepspeed_config_path] = json.dumps(spec.deepspeed_config, indent=2) + "\n"
    return files


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
    env[ENV_STRATEGY] = spec.strategy
    env[ENV_GRAD_ACCUM] = str(spec.grad_accum)
    env[ENV_WORLD_SIZE] = str(spec.world_size)
    optional = {ENV_MAX_STEPS: spec.max_steps, ENV_KEEP_LAST: spec.keep_last,
                ENV_ACTIVATION_CHECKPOINTING: spec.activation_checkpointing,
                ENV_DEEPSPEED_CONFIG: spec.deepspeed_config_path,
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
