"""`accelerate launch`: argv, environment, and the config file it reads.

The config is generated into the run directory and passed explicitly, so the user's default
accelerate config (~/.cache/huggingface/accelerate) never silently decides the topology. On
CPU, `accelerate launch --cpu --num_processes 2` starts one process and MULTI_GPU without GPUs
starts undistributed ones; what forms one gloo job is MULTI_GPU with `use_cpu` plus
ACCELERATE_USE_CPU=true in the environment (the config's own `use_cpu` does not reach the workers).
accelerate runs torch's elastic agent, so the logs, the rank prefixes and the failure summary are
torchrun's.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import yaml

from dtrain.core.contract import worker_env
from dtrain.core.spec import LaunchSpec
from dtrain.launch.launchers import ExitStatus, torchrun

_MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def config_path(spec: LaunchSpec) -> str:
    """One file per node (it holds the node's rank), since nodes may share the run directory."""
    return str(spec.paths.accelerate_config(spec.node_rank))


def accelerate_config(spec: LaunchSpec) -> dict[str, Any]:
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU" if spec.world_size > 1 else "NO",
        "use_cpu": spec.device == "cpu",
        "num_processes": spec.world_size,
        "num_machines": spec.nodes,
        "machine_rank": spec.node_rank,
        "main_process_ip": spec.master_addr,
        "main_process_port": spec.master_port,
        "rdzv_backend": "static",
        "same_network": True,
        "gpu_ids": "all",
        "mixed_precision": _MIXED_PRECISION[spec.precision],
        "downcast_bf16": "no",
        "debug": False,
    }


def files(spec: LaunchSpec) -> dict[str, str]:
    return {config_path(spec): yaml.safe_dump(accelerate_config(spec), sort_keys=False)}


def build_command(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
                  python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    argv = [python, "-m", "accelerate.commands.launch", "--config_file", config_path(spec),
            "--max_restarts", str(spec.max_restarts), "--rdzv_conf", f"timeout={spec.rdzv_timeout}",
            "--log_dir", spec.log_dir, "--tee", "3", spec.recipe, *spec.recipe_args]
    env = {**worker_env(spec, cpus, base_env), **torchrun.LINE_PREFIX}
    if spec.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    return argv, env


def exit_status(launcher_log: str, launcher_code: int) -> ExitStatus:
    return torchrun.exit_status(launcher_log, launcher_code)
