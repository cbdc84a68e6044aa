"""LaunchSpec: what the user asked for, resolved against the machine, in numbered steps.

`resolve` decides; it starts nothing and asks nothing of the machine: the GPU count, a free port,
which packages are installed and the GPUs' compute capability are passed in. It reads only the
files the options name (the recipe, a DeepSpeed JSON, a `--resume` checkpoint). A spec also
travels as JSON (`to_json`/`from_json`): a SLURM job's nodes launch the spec it was submitted with.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dtrain.core import deepspeed_config, launchers, rundir, strategies
from dtrain.core.fields import SpecOptions
from dtrain.core.options import BY_NAME, OPTIONS, SPEC_OPTIONS
from dtrain.core.rundir import RunDir
from dtrain.errors import UsageError

DEFAULT_MASTER_PORT = 29500
AUTO = "auto"
SPEC_FORMAT = "dtrain-spec-1"


@dataclasses.dataclass(frozen=True)
class LaunchSpec(SpecOptions):
    """One job on one node: the launcher renders this into an argv and an environment. Its fields are every
    worker and launcher option (`SpecOptions`, from the table), resolved, then the job's shape.
    """

    recipe: str
    recipe_args: tuple[str, ...]
    device: str  # "cuda" or "cpu"
    nproc: int  # processes on this node
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    name: str
    run_dir: str
    deepspeed_config: Mapping[str, Any] | None = None  # merged, for the ZeRO strategies
    network: Mapping[str, str] | None = None  # a multi-node job: this node's {"address", "interface"} toward node 0
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # option -> where it was set, if not default

    @property
    def options(self) -> dict[str, Any]:
        """The options by name, in the table's order."""
        return {option.name: getattr(self, option.name) for option in SPEC_OPTIONS}

    def replace(self, **changes: Any) -> LaunchSpec:
        """A copy with some fields or options changed."""
        return dataclasses.replace(self, **changes)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc

    @property
    def paths(self) -> RunDir:
        return RunDir.of(self.run_dir)

    @property
    def deepspeed_config_path(self) -> str | None:
        """Where the launch writes the merged DeepSpeed JSON that the workers read."""
        return str(self.paths.deepspeed_config) if self.deepspeed_config is not None else None

    @property
    def log_dir(self) -> str:
        return str(self.paths.logs)

    @property
    def launcher_log(self) -> str:
        return str(self.paths.launcher_log(self.node_rank))

    @property
    def launch_lock(self) -> str:
        """Held by this node's `dtrain launch` (or `dtrain debug`) while it runs (`dtrain.launch.job.run_dir_lock`)."""
        return str(self.paths.launch_lock(self.node_rank))

    def to_json(self) -> str:
        options = self.options
        shape = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                 if field.name not in options}
        return json.dumps({"format": SPEC_FORMAT, **shape, "options": options}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> LaunchSpec:
        try:
            data = json.loads(text)
            if data.pop("format") != SPEC_FORMAT:
                raise ValueError
            options = {name: _from_json(name, value) for name, value in data.pop("options").items()}
            return cls(**{**data, "recipe_args": tuple(data["recipe_args"]), **options})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{source} is not a launch spec that this dtrain wrote (format {SPEC_FORMAT}); "
                             "submit the job again.") from None


def _from_json(name: str, value: Any) -> Any:
    return tuple(value) if BY_NAME[name].kind is tuple and value is not None else value


def dtrain_argv(python: str = sys.executable) -> list[str]:
    """How another process starts dtrain: a cluster job's nodes, a sweep's runs, the doctor's preflight."""
    return [python, "-m", "dtrain.cli"]


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve(options: Mapping[str, Any], gpus_available: int, free_port: int,
            is_installed: Callable[[str], bool] = installed, compute_capability: float | None = None,
            route: Callable[[str], tuple[str, str] | None] = lambda host: None,
            cpu_flags: frozenset[str] | None = frozenset(), sources: Mapping[str, str] | None = None,
            recipe_in_image: bool = False) -> LaunchSpec:
    """Turn the options given (command line, DTRAIN_* variables, profile) into a LaunchSpec, or raise UsageError
    saying what to fix.

    Options not given are None; `sources` says where each given one was set (kept for those away from their
    default); `route(host)` is this machine's (address, interface) toward a host
    (`hardware.route_to`); `cpu_flags` and `compute_capability` decide `--precision auto`, and
    `cpu_flags=None` leaves it to the node that computes (a cluster job's: `decide_precision`);
    `recipe_in_image`: the recipe is a path inside the job's container image, not a file here. Steps: 1. the
    device and processes per node, 2. the nodes and rendezvous (and, for many nodes, the address and
    interface toward node 0), 3. the run directory, 4. launcher, strategy, precision, --cuda-graph and the
    DeepSpeed config, checked together against the registries, 5. every other option, from its row's
    default and check.
    """
    recipe = options["recipe"]
    if not recipe_in_image and not Path(recipe).is_file():
        raise UsageError(f"recipe {recipe} does not exist; pass the path of a Python training script.")

    def value(name: str, fallback: Any = None) -> Any:
        given = options.get(name)
        return BY_NAME[name].value(fallback if given is None else given)

    device, nproc = _processes(options, gpus_available)  # 1.
    nodes, node_rank = value("nodes"), value("node_rank")  # 2.
    if not 0 <= node_rank < nodes:
        raise UsageError(f"--node-rank must be between 0 and {nodes - 1} for {nodes} node(s), got {node_rank}.")
    if (value("min_nodes") or 0) > nodes:
        raise UsageError(f"--min-nodes {value('min_nodes')} is more than the job's {nodes} node(s): a job shrinks, it "
                         f"does not grow; pass --min-nodes {nodes} or fewer, or more --nodes.")
    master_port = value("master_port", free_port if nodes == 1 else DEFAULT_MASTER_PORT)
    network = toward(value("master_addr"), route) if nodes > 1 else None
    name, run_dir = _run_dir(options, recipe, nodes)  # 3.
    parallel, merged = _parallelism(options, value, device, is_installed, compute_capability,  # 4.
                                    nodes, nproc, cpu_flags)
    resolved = {**parallel, "wandb_group": value("wandb_group", name if nodes > 1 else None)}
    resolved = {option.name: resolved[option.name] if option.name in resolved else value(option.name)  # 5.
                for option in SPEC_OPTIONS}
    return LaunchSpec(
        recipe=recipe, recipe_args=tuple(options.get("recipe_args") or ()), device=device, nproc=nproc,
        nodes=nodes, node_rank=node_rank, master_addr=value("master_addr"), master_port=master_port, name=name,
        run_dir=run_dir, **resolved, deepspeed_config=merged, network=network,
        sources=_away_from_default(options, sources or {}))


def _away_from_default(options: Mapping[str, Any], sources: Mapping[str, str]) -> dict[str, str]:
    """Where each option given away from its default was set, in the table's order (the same spec every time)."""
    return {option.name: sources[option.name] for option in OPTIONS
            if option.name in sources and options.get(option.name) != option.default}


def toward(master_addr: str, route: Callable[[str], tuple[str, str] | None]) -> dict[str, str] | None:
    """This node's address and interface toward node 0, which the node advertises and gloo and NCCL use."""
    found = route(master_addr)
    return {"address": found[0], "interface": found[1]} if found else None


def _parallelism(options: Mapping[str, Any], value: Callable[..., Any], device: str, is_installed: Callable[[str], bool],
                 compute_capability: float | None, nodes: int, nproc: int,
                 cpu_flags: frozenset[str] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Launcher, strategy, precision and accumulation, checked together against the registries; and
    the merged DeepSpeed config of a ZeRO strategy. Unless one is named, the launcher of one node without
    restarts is none for one process (`direct`) and dtrain's own agent for more (`local`); torchrun's
    otherwise.

    A DeepSpeed JSON (--deepspeed-config) fills what the command line leaves out (ZeRO stage,
    precision, accumulation) and must agree with what it sets.
    """
    world_size = nodes * nproc
    if nodes > 1 or value("max_restarts") or value("min_nodes") is not None:
        default = launchers.TORCHRUN
    else:
        default = launchers.DIRECT if nproc == 1 else launchers.LOCAL
    launcher = launchers.get(value("launcher", default))
    if launcher.one_node and nodes > 1:
        raise UsageError(f"--launcher {launcher.name} starts the processes of one node, and this job has {nodes}; "
                         "leave --launcher out.")
    if not launcher.agent and world_size > 1:
        raise UsageError(f"--launcher {launcher.name} runs one process on one node, without --max-restarts; leave "
                         "--launcher out for more.")
    source = options.get("deepspeed_config")
    user_config = deepspeed_config.load(source) if source else None
    stage = (user_config or {}).get("zero_optimization", {}).get("stage")
    strategy = strategies.get(value("strategy", f"zero{stage}" if isinstance(stage, int) else None))
    if user_config is not None and strategy.deepspeed_stage is None:
        zero = strategies.names_where(lambda s: s.deepspeed_stage is not None)
        raise UsageError(f"--deepspeed-config is for the ZeRO strategies, not --strategy {strategy.name}; "
                         f"pass --strategy {zero}, or leave the DeepSpeed file out.")
    precision = value("precision", deepspeed_config.precision(user_config))
    if precision == AUTO and cpu_flags is not None:
        precision = auto_precision(device, cpu_flags, compute_capability)
    if precision == AUTO and strategy.deepspeed_stage is not None:
        raise UsageError(f"--precision auto is decided on the node that computes, and --strategy {strategy.name}'s "
                         "DeepSpeed config needs it when the job is submitted; pass --precision bf16 or fp32.")
    accumulation = (user_config or {}).get("gradient_accumulation_steps")
    grad_accum = value("grad_accum", accumulation if isinstance(accumulation, int) else None)

    for package, option, way_out in (
            (strategy.package, f"--strategy {strategy.name}",
             f"use --strategy {strategies.names_where(lambda s: s.package is None)}"),
            (launcher.package, f"--launcher {launcher.name}", "leave --launcher out")):
        if package and not is_installed(package):
            raise UsageError(f"{option} needs {package}, which is not installed here; pip install {package}, "
                             f"or {way_out}.")
    if value("min_nodes") is not None and not launcher.elastic:
        raise UsageError(f"--launcher {launcher.name} cannot restart on fewer nodes; leave --min-nodes out, or leave "
                         "--launcher out (torchrun does).")
    if not launcher.restarts and value("max_restarts"):
        raise UsageError(f"--launcher {launcher.name} does not restart workers; leave --max-restarts out, or leave "
                         "--launcher out.")
    if options.get("async_checkpoint") and not strategy.async_checkpoint:
        raise UsageError(f"--async-checkpoint is not available with --strategy {strategy.name}: its engine writes "
                         "its checkpoint files itself, synchronously; leave --async-checkpoint out.")
    if device == "cpu" and precision not in (*strategy.cpu_precisions, AUTO):
        able = strategies.names_where(lambda s: precision in s.cpu_precisions)
        raise UsageError(f"--strategy {strategy.name} cannot train in {precision} on CPU; use --precision "
                         f"{' or '.join(strategy.cpu_precisions)}, or --strategy {able} for {precision}.")
    if precision == "bf16" and device == "cuda" and compute_capability is not None and compute_capability < 8.0:
        raise UsageError(f"bf16 needs GPUs of compute capability 8.0 (Ampere) or newer, and this machine has "
                         f"{compute_capability}; use --precision fp16 or fp32.")
    if options.get("cuda_graph"):
        _check_cuda_graph(device, world_size, strategy, options.get("activation_checkpointing"))
    merged = None
    if strategy.deepspeed_stage is not None:
        base = user_config if user_config is not None else deepspeed_config.default(strategy.deepspeed_stage)
        merged = deepspeed_config.merge(base, strategy.deepspeed_stage, precision, grad_accum,
                                        source or f"dtrain's {strategy.name}.json")
    return {"launcher": launcher.name, "strategy": strategy.name, "precision": precision,
            "grad_accum": grad_accum}, merged


def _check_cuda_graph(device: str, world_size: int, strategy: strategies.Strategy,
                      activation_checkpointing: str | None) -> None:
    """--cuda-graph only where a replayed graph computes what the eager step does (dtrain.runtime.cuda_graph)."""
    if device != "cuda":
        raise UsageError("--cuda-graph replays CUDA graphs, and this run is on CPU; run on a GPU (--gpus 1), or "
                         "leave --cuda-graph out.")
    if world_size > 1:
        raise UsageError(f"--cuda-graph is for one GPU process (the gradient all-reduce between processes is not "
                         f"captured), and this run has {world_size}; pass --gpus 1 on one node, or leave --cuda-graph "
                         "out.")
    if not strategy.cuda_graph:
        raise UsageError(f"--cuda-graph captures the model as it is, and --strategy {strategy.name} wraps it in hooks "
                         f"that a graph cannot hold; use --strategy "
                         f"{strategies.names_where(lambda s: s.cuda_graph)}, or leave --cuda-graph out.")
    if activation_checkpointing:
        raise UsageError("--cuda-graph cannot capture activation checkpointing's recomputation (it saves and restores "
                         "the random-number state); leave out --cuda-graph or --activation-checkpointing.")


BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def auto_precision(device: str, cpu_flags: frozenset[str], compute_capability: float | None) -> str:
    """`--precision auto`: bf16 where the device computes it natively, else fp32. GPUs of compute capability
    8.0 (Ampere) and up; CPUs with AMX tiles for bf16 or AVX-512 BF16 (the MNIST recipe 1.47x faster in bf16
    on an AMD EPYC with AVX-512 BF16 and no AMX, bench/RESULTS.md); without either, bf16 is emulated and was
    about 10x slower."""
    if device == "cuda":
        return "bf16" if compute_capability is not None and compute_capability >= 8.0 else "fp32"
    return "bf16" if cpu_flags & BF16_CPU_FLAGS else "fp32"


def decide_precision(spec: LaunchSpec, cpu_flags: frozenset[str], compute_capability: float | None) -> LaunchSpec:
    """A submitted spec's `--precision auto`, decided on the node that runs it."""
    if spec.precision != AUTO:
        return spec
    return spec.replace(precision=auto_precision(spec.device, cpu_flags, compute_capability))


def _processes(options: Mapping[str, Any], gpus_available: int) -> tuple[str, int]:
    """Pick the device and processes per node: explicit --cpu, explicit --gpus, or whatever is here."""
    gpus, nproc, cpu = options.get("gpus"), BY_NAME["nproc"].value(options.get("nproc")), options.get("cpu")
    if cpu and gpus is not None:
        raise UsageError("--cpu and --gpus contradict each other; pass one of them.")
    if cpu:
        return "cpu", nproc or 1
    if gpus is not None:
        if nproc is not None:
            raise UsageError("--nproc is for CPU processes; with GPUs use --gpus N (one process per GPU).")
        if gpus < 1:
            raise UsageError(f"--gpus must be at least 1, got {gpus}; use --cpu to run without GPUs.")
        if gpus_available == 0:
            raise UsageError(f"--gpus {gpus} asks for GPUs but none is visible on this machine; "
                             "run on CPU processes with --cpu --nproc N.")
        if gpus > gpus_available:
            raise UsageError(f"--gpus {gpus} asks for more GPUs than the {gpus_available} visible here; "
                             f"pass --gpus {gpus_available} or fewer.")
        return "cuda", gpus
    if nproc is not None:
        raise UsageError("--nproc sets CPU processes and needs --cpu; with GPUs use --gpus N.")
    if gpus_available == 0:
        return "cpu", 1
    return "cuda", gpus_available


def default_name(recipe: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{Path(recipe).stem}-{stamp}"


def _run_dir(options: Mapping[str, Any], recipe: str, nodes: int) -> tuple[str, str]:
    name = BY_NAME["name"].value(options.get("name"))
    run_dir = options.get("run_dir")
    if run_dir is not None:
        return (name or Path(run_dir).name), str(run_dir)
    if name is None:
        if nodes > 1:
            raise UsageError("a multi-node launch needs --name (or --run-dir), the same on every node, "
                             "so that all nodes join one rendezvous and share one run directory.")
        name = default_name(recipe)
    return name, str(rundir.DEFAULT / name)


def launch_files(spec: LaunchSpec) -> dict[str, str]:
    """Files every launch writes into the run directory before starting anything: path -> text."""
    files = {}
    if spec.deepspeed_config is not None:
        files[str(spec.paths.deepspeed_config)] = json.dumps(spec.deepspeed_config, indent=2) + "\n"
    return files
