"""Launchers render a LaunchSpec into (argv, env) for a real launcher program, plus the files it
reads (written into the run directory before it starts); they run nothing."""

from __future__ import annotations

import sys
from typing import Mapping

from dtrain.config import LaunchSpec, launch_files


def build(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
          python: str = sys.executable) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(argv, env, files) for the spec's launcher; files maps a path to its text."""
    from dtrain.launchers import accelerate, deepspeed, torchrun

    module = {"torchrun": torchrun, "accelerate": accelerate, "deepspeed": deepspeed}[spec.launcher]
    argv, env = module.build_command(spec, cpus, base_env, python)
    return argv, env, {**launch_files(spec), **module.files(spec)}
