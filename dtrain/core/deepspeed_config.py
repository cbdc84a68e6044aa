"""The DeepSpeed config of the ZeRO strategies: dtrain's defaults (package data) or the user's JSON,
merged with what the command line decided (stage, precision, accumulation) and checked against it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

from dtrain.errors import UsageError

DEFAULTS = resources.files("dtrain") / "defaults" / "deepspeed"  # zero1.json ... zero3.json


def load(path: str) -> dict[str, Any]:
    """A user's DeepSpeed JSON, or one sentence saying why it cannot be used."""
    try:
        with open(path) as fh:
            data = json.load(fh)
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


def default(stage: int) -> dict[str, Any]:
    return json.loads((DEFAULTS / f"zero{stage}.json").read_text())


def precision(config: Mapping[str, Any] | None) -> str | None:
    """The precision a DeepSpeed config turns on, if any."""
    for name in ("bf16", "fp16"):
        if (config or {}).get(name, {}).get("enabled") is True:
            return name
    return None


def merge(config: Mapping[str, Any], stage: int, precision: str, grad_accum: int, source: str) -> dict[str, Any]:
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
