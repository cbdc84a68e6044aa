"""Generated from the option table: every option that reaches the workers, each with its example
(a value other than its default), reaches them the same through a real SLURM job as through a direct
`dtrain launch`. Options whose examples exclude each other are in different groups: one job each.
A new row is covered here without editing this file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtrain.core import contract
from dtrain.core.options import OPTIONS

from conftest import GPU_GROUP, ROOT, TEST_RECIPES, run_dtrain, submit, wait_for

GROUPS = sorted({option.group for option in OPTIONS if option.group} - {GPU_GROUP}) or [None]  # no GPU here
# The variables that legitimately differ between the two runs: each run's own directory, its start
# time, the terminal (neither has one), each launch's error spool (a temporary folder of its node), and
# files inside the run directory (compared relative).
DIFFER = {contract.RUN_DIR: "run directory", contract.LAUNCH_TIME: "start time", contract.TTY: "terminal",
          contract.ERROR_SPOOL: "this launch's temporary folder"}
IN_RUN_DIR = {contract.DEEPSPEED_CONFIG}


def example_args(group: str | None) -> list[str]:
    return [word for option in OPTIONS
            if option.example is not None and option.group in (None, group) and {"launch", "submit"} <= option.commands
            for word in option.argv(option.example)]


def environments(run_dir: Path) -> list[dict[str, str]]:
    """Each rank's DTRAIN_* variables, with paths inside the run directory made relative to it."""
    ranks = []
    for path in sorted(run_dir.glob("env-rank*.json")):
        env = json.loads(path.read_text())
        for key in IN_RUN_DIR & env.keys():
            file = Path(env[key])
            env[key] = (str(file.relative_to(run_dir)), file.read_text())
        ranks.append({key: value for key, value in env.items() if key not in DIFFER})
    return ranks


@pytest.mark.parametrize("group", GROUPS)
def test_workers_get_the_same_contract_from_a_slurm_job_as_from_dtrain_launch(slurm_env, tmp_path, group):
    recipe = str(TEST_RECIPES / "dump_env.py")
    args = example_args(group)
    direct = run_dtrain("launch", recipe, "--run-dir", str(tmp_path / "direct"), *args, cwd=ROOT, env=slurm_env)
    assert direct.returncode == 0, direct.stderr
    job_id = submit(slurm_env, ROOT, recipe, "--run-dir", str(tmp_path / "slurm"), *args)
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    assert fields["JobState"] == "COMPLETED", (tmp_path / "slurm" / "slurm" / f"slurm-{job_id}.out").read_text()

    expected = environments(tmp_path / "direct")
    assert len(expected) == 2 and all(contract.WORLD_SIZE in env for env in expected)
    for option in OPTIONS:
        if option.env and option.group in (None, group):
            assert expected[0][option.env] == option.encode(option.value(option.example)), option.name
    assert environments(tmp_path / "slurm") == expected
