"""Shared helpers: run the real `dtrain` console script in a subprocess, find MNIST, find leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DTRAIN = str(Path(sys.executable).parent / "dtrain")
TEST_RECIPES = ROOT / "tests" / "recipes"


def mnist_dir() -> str | None:
    candidates = [os.environ.get("DTRAIN_DATA_DIR"), str(ROOT.parent / "shared" / "data")]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return str(Path(candidate).resolve())
    return None


@pytest.fixture(scope="session")
def data_dir() -> str:
    found = mnist_dir()
    if found is None:
        message = "MNIST raw files not found: set DTRAIN_DATA_DIR to a folder holding MNIST/raw/ (tests never download)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_dtrain(*args: str, cwd: Path | str = ROOT, timeout: float = 600, env: dict | None = None):
    return subprocess.run([DTRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def processes_with_env(key: str, value: str) -> list[int]:
    """PIDs of live processes whose environment has key=value (workers and launchers inherit it)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(entry):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _alive(proc_dir: Path) -> bool:
    stat = (proc_dir / "stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
