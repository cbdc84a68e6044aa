"""dtrain installed as a wheel (not editable), used from a directory outside the checkout: everything
the launch side reads ships inside the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

NOT_SOURCE = shutil.ignore_patterns(".venv", ".git", ".cache", ".ruff_cache", ".pytest_cache", "runs", "data",
                                    "build", "*.egg-info", "__pycache__")


def run(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_wheel_installed_elsewhere_runs_from_any_directory(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, symlinks=True, ignore=NOT_SOURCE)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
        str(source), cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("dtrain-*.whl"))
    target = tmp_path / "target"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel), cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = run(sys.executable, "-c", "import dtrain; print(dtrain.__file__)", cwd=elsewhere, env=env).stdout.strip()
    assert Path(where).parent == target / "dtrain"

    dtrain = [sys.executable, "-m", "dtrain.cli"]
    for stage in (1, 2, 3):
        out = run(*dtrain, "launch", "train.py", "--cpu", "--nproc", "2", "--launcher", "deepspeed", "--strategy",
                  f"zero{stage}", "--run-dir", "r", "--dry-run", cwd=elsewhere, env=env).stdout
        config = json.loads(out.split("# r/deepspeed.json\n", 1)[1].split("\n\n", 1)[0])
        assert config["zero_optimization"]["stage"] == stage, out
    out = run(*dtrain, "slurm", "submit", "train.py", "--cpu", "--nodes", "2", "--run-dir", "r", "--dry-run",
              cwd=elsewhere, env=env).stdout
    assert "#!/bin/bash" in out and f"launch --spec {elsewhere / 'r' / 'slurm' / 'spec.json'}" in out
    assert list(elsewhere.iterdir()) == [elsewhere / "train.py"]  # dry runs write nothing
