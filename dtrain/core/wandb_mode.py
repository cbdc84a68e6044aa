"""`--wandb auto`, decided: online with credentials, offline without, disabled without wandb."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

from dtrain.errors import UsageError


def wandb_mode(requested: str, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """`resolve` with this machine's facts: is wandb installed, what ~/.netrc holds."""
    netrc = Path(environ.get("NETRC") or Path.home() / ".netrc")
    try:
        netrc_text = netrc.read_text()
    except OSError:
        netrc_text = ""
    return resolve(requested, environ, importlib.util.find_spec("wandb") is not None, netrc_text)


def resolve(requested: str, environ: Mapping[str, str], installed: bool, netrc_text: str) -> tuple[str, str | None]:
    """`auto` -> online with credentials (WANDB_API_KEY or ~/.netrc), else offline; plus a notice to print.

    WANDB_MODE, when set, decides `auto`, as it would for wandb itself.
    """
    if requested == "disabled":
        return "disabled", None
    if not installed:
        if requested == "auto":
            return "disabled", "wandb is not installed, so metrics go to metrics.jsonl only (pip install wandb)."
        raise UsageError(f"--wandb {requested} needs the wandb package; pip install wandb, or pass --wandb disabled.")
    if requested != "auto":
        return requested, None
    preset = environ.get("WANDB_MODE", "").lower()
    if preset in ("online", "offline", "disabled"):
        return preset, None
    if environ.get("WANDB_API_KEY") or "api.wandb.ai" in netrc_text:
        return "online", None
    return "offline", "no W&B credentials found, so W&B logs offline into the run directory (wandb sync it later)."
