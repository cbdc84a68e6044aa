"""Each outside name lives in one module: SLURM's variables and commands in the SLURM engine, the run directory's
file names in `dtrain.core.rundir`. Read from the AST: string literals (f-strings' parts too) and attribute names,
docstrings left out, since prose may name anything."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import dtrain

PACKAGE = Path(dtrain.__file__).parent
SLURM = re.compile(r"\bSLURMD?_[A-Z_]+\b|\b(sbatch|srun|salloc|scontrol|squeue|scancel|sinfo|sacct)\b")
RUN_FILES = ("config.yaml", "metrics.jsonl", "model.pth", "LATEST", "COMMITTED", "manifest.json", "trainer_state.json",
             "ended.json", "spec.json", "sweep.json", "summary.csv", "summary.json", "launcher.log", "launch.lock",
             "console.log", "deepspeed.json", "accelerate.yaml", "hostfile", "preflight.json", "trackers.lock",
             "mlflow.db", "run-id", "loss_lr.png", "system.png", "accuracy.png", "confusion_matrix.png", "sweep.png",
             "export.json")


def names(source: str, attributes: bool = True) -> list[str]:
    """The string literals (and attribute names) of a module, but its docstrings."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
        elif isinstance(node, ast.Attribute) and attributes:
            found.append(node.attr)
    return found


def slurm_names(source: str) -> list[str]:
    return [name for name in names(source) if SLURM.search(name)]


def run_file_names(source: str) -> list[str]:
    """The literals that spell a file of the run directory (`RunDir.hostfile` is an attribute, not a spelling)."""
    return [name for name in names(source, attributes=False) for file in RUN_FILES
            if name == file or name.endswith("/" + file)]


def modules() -> dict[str, str]:
    return {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_slurm_is_named_only_in_its_engine():
    found = {module: slurm_names(text) for module, text in modules().items() if module != "engines/slurm.py"}
    assert {module: hits for module, hits in found.items() if hits} == {}
    assert slurm_names(modules()["engines/slurm.py"])  # the engine does name them: the test reads the right thing


@pytest.mark.parametrize("engine, spelling", [
    ("engines/k8s.py", re.compile(r"^PET_[A-Z_]+$|^kubectl$|^KUBERNETES_SERVICE_HOST$")),
    ("engines/skypilot.py", re.compile(r"^SKYPILOT_[A-Z_]+$")),
])
def test_each_engines_variables_are_named_only_in_its_module(engine, spelling):
    found = {module: [name for name in names(text) if spelling.search(name)] for module, text in modules().items()
             if module != engine}
    assert {module: hits for module, hits in found.items() if hits} == {}
    assert any(spelling.search(name) for name in names(modules()[engine]))


def test_the_run_directory_is_spelled_only_in_its_module():
    found = {module: run_file_names(text) for module, text in modules().items() if module != "core/rundir.py"}
    assert {module: hits for module, hits in found.items() if hits} == {}
    assert set(run_file_names(modules()["core/rundir.py"])) == set(RUN_FILES)  # each is named there, once


def test_the_readers_see_literals_and_attributes_but_not_docstrings():
    source = ('"""Runs srun and writes config.yaml."""\n'
              'def f(env):\n    """SLURM_JOB_ID in prose."""\n'
              '    return env["SLURM_PROCID"], env.scancel, f"{env}/metrics.jsonl", "--hostfile"\n')
    assert sorted(slurm_names(source)) == ["SLURM_PROCID", "scancel"]
    assert run_file_names(source) == ["/metrics.jsonl"]
