"""`dtrain debug`: run a recipe inside the current process, as the single rank of a world of one."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from dtrain.core.contract import worker_env
from dtrain.core.hardware import cpu_count
from dtrain.core.spec import LaunchSpec, launch_files
from dtrain.launch.job import write_files


def run_in_process(spec: LaunchSpec) -> int:
    """Set the environment torchrun would set for rank 0 of 1, then execute the recipe as __main__."""
    write_files(launch_files(spec))
    os.environ.update(worker_env(spec, cpu_count(), os.environ))
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    sys.argv = [spec.recipe, *spec.recipe_args]
    sys.path.insert(0, str(Path(spec.recipe).resolve().parent))
    try:
        runpy.run_path(spec.recipe, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0
