"""Rank-0 outputs: console lines, `metrics.jsonl` (every logged scalar) and `config.yaml`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import yaml


class MetricsWriter:
    """Appends one JSON object per logged step to `<run_dir>/metrics.jsonl` (append: resumes continue it)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", buffering=1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
