"""YAML profiles: a launch profile (`--profile`, option names to values) or a cluster profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtrain.errors import UsageError


def load(path: str, example: str = "launch/cpu_ddp.yaml") -> dict[str, Any]:
    """A YAML mapping of option names (as on the command line, dashes or underscores) to values."""
    import yaml  # here, not at the top: most commands read no profile, and --help stays quicker

    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"profile {path} does not exist; pass a YAML file such as {example}.") from None
    except OSError as exc:
        raise UsageError(f"cannot read profile {path} ({exc.strerror}); check its permissions.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise UsageError(f"profile {path} is not valid YAML{line}; fix the syntax or remove the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"profile {path} must be a mapping of option: value, not a {type(data).__name__}.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
