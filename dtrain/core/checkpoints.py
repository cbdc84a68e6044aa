"""Reading the run directory's checkpoints without torch: layout, commit state, manifests, choice.

Shared by the workers (`dtrain.runtime.checkpoint`, which writes and loads) and the launch side
(`dtrain ckpt ls`, `--resume` checks), so both agree on what "committed" and "latest" mean.

    checkpoints/
      step_0000600/            committed: DCP shards, .metadata, per-rank RNG, trainer_state.json,
                               manifest.json (files, sizes, sha256), COMMITTED (written last)
      step_0001200.partial/    being written or abandoned: never loaded, removed at the next start
      LATEST                   "step_0000600", replaced atomically after the rename
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dtrain.core.rundir import LATEST, MANIFEST, MARKER, PARTIAL, RunDir
from dtrain.errors import UsageError

_STEP_DIR = re.compile(r"^step_(\d{7,})$")


FORMAT = "dtrain-checkpoint-1"  # what this release writes into a manifest, and the formats it reads:
FORMATS_READ = (FORMAT,)


class CheckpointError(UsageError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class FormatError(CheckpointError):
    """A checkpoint of a format this release does not read (a newer dtrain's): not damage, so
    `--resume auto` stops at it rather than falling back to an older one."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return RunDir.of(run_dir).checkpoints


def step_dirs(root: Path) -> list[Path]:
    """Folders named like a finished checkpoint (`step_N`), newest step first; `verify` says if they are."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def committed(root: Path) -> list[Path]:
    """Checkpoint folders that finished the commit protocol (they hold the marker), newest first."""
    return [p for p in step_dirs(root) if (p / MARKER).is_file()]


def partials(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.endswith(PARTIAL)) if root.is_dir() else []


def read_latest(root: Path) -> str | None:
    """The name LATEST points to, or None when LATEST is missing or is not a checkpoint name."""
    try:
        name = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _STEP_DIR.match(name) else None


def file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return path.stat().st_size, digest.hexdigest()


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST}: it was not written by dtrain or is incomplete.") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({exc}).") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list the checkpoint's files.")
    if manifest.get("format") not in FORMATS_READ:
        from dtrain import __version__

        raise FormatError(f"checkpoint {path} is of format {manifest.get('format')!r}, and dtrain {__version__} "
                          f"reads {', '.join(FORMATS_READ)}; resume it with the dtrain that wrote it (or a newer one).")
    return manifest


def check_committed(path: Path) -> None:
    """The cheap part of `verify`: the folder exists, is not partial, and holds the marker."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a checkpoints/step_N folder, auto or never.")
    if path.name.endswith(PARTIAL):
        raise CheckpointError(f"checkpoint {path} is a partial save and is never loaded.")
    if not (path / MARKER).is_file():
        raise CheckpointError(f"checkpoint {path} has no {MARKER} marker: its save did not finish.")


def damaged_files(path: Path, manifest: dict, checksums: bool = True) -> list[str]:
    """Every file of a checkpoint that does not match its manifest, each in one sentence."""
    problems = []
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"checkpoint file {file} is missing.")
            continue
        size = file.stat().st_size
        if size != expected["size"]:
            problems.append(f"checkpoint file {file} has {size} bytes, the manifest says {expected['size']}: "
                            "it is truncated or was changed.")
        elif checksums and file_digest(file)[1] != expected["sha256"]:
            problems.append(f"checkpoint file {file} does not match its checksum: it is corrupt.")
    return problems


def verify(path: Path, inspect: Callable[[Path], object] | None = None, checksums: bool = True) -> dict:
    """Check a checkpoint against its manifest; return the manifest or raise CheckpointError.

    `inspect` is a further check that needs torch (the workers pass the safe metadata reader);
    without `checksums` only sizes are compared, which reads no data.
    """
    check_committed(path)
    manifest = read_manifest(path)
    problems = damaged_files(path, manifest, checksums)
    if problems:
        raise CheckpointError(problems[0])
    if inspect is not None:
        inspect(path)
    return manifest


@dataclass(frozen=True)
class Choice:
    path: Path | None
    notes: tuple[str, ...]


def choose_for_resume(run_dir: str | os.PathLike, resume: str,
                      inspect: Callable[[Path], object] | None = None) -> Choice:
    """Which checkpoint to resume from: `never`, an explicit path (must verify), or `auto`.

    `auto` takes the newest committed checkpoint that verifies, so a damaged newest one falls
    back to the previous one, and says so. LATEST is cross-checked; garbage in it is reported.
    """
    if resume == "never":
        return Choice(None, ())
    if resume != "auto":
        path = Path(resume)
        verify(path, inspect)
        return Choice(path, ())
    root = checkpoint_root(run_dir)
    notes = []
    latest = read_latest(root)
    if (root / LATEST).exists() and latest is None:
        notes.append(f"{root / LATEST} does not name a checkpoint; ignoring it.")
    for path in step_dirs(root):
        try:
            verify(path, inspect)
        except FormatError:
            raise
        except CheckpointError as exc:
            notes.append(f"{exc} Falling back to an earlier checkpoint.")
            continue
        return Choice(path, tuple(notes))
    return Choice(None, tuple(notes))


def retention_victims(root: Path, keep_last: int | None) -> list[Path]:
    """Committed checkpoints beyond the newest `keep_last`, never the one LATEST names."""
    if not keep_last:
        return []
    latest = read_latest(root)
    return [p for p in committed(root)[keep_last:] if p.name != latest]


def describe(root: Path, checksums: bool = False, only: str | None = None) -> list[dict]:
    """One row per checkpoint folder (or for the one named `only`) for `dtrain ckpt ls` and `ckpt verify`:
    its manifest's fields, its state (committed, or with `checksums` verified; damaged; uncommitted; a
    format of another release) and its problems. Without `checksums` only sizes are compared: it reads
    no data and stays fast."""
    latest = read_latest(root)
    rows = []
    for path in step_dirs(root):
        if only is not None and path.name != only:
            continue
        row = {"name": path.name, "latest": path.name == latest, "state": "verified" if checksums else "committed",
               "problems": []}
        try:
            check_committed(path)
            manifest = read_manifest(path)
            row.update({k: manifest.get(k) for k in ("step", "epoch", "batch", "time", "metrics")})
            row["size"] = sum(f["size"] for f in manifest["files"].values())
            row["problems"] = damaged_files(path, manifest, checksums)
            if row["problems"]:
                row["state"] = "damaged"
        except FormatError as exc:
            row.update(state="other format", problems=[str(exc)])
        except CheckpointError as exc:
            row.update(state="damaged" if (path / MARKER).is_file() else "uncommitted", problems=[str(exc)])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    import time

    header = ("", "checkpoint", "step", "epoch", "batch", "saved", "size", "state", "metrics")
    lines = [header]
    for row in rows:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"])) if row.get("time") else "-"
        size = f"{row['size'] / 1e6:.1f} MB" if row.get("size") is not None else "-"
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in (row.get("metrics") or {}).items())
        lines.append(("*" if row["latest"] else "", row["name"], str(row.get("step", "-")), str(row.get("epoch", "-")),
                      str(row.get("batch", "-")), saved, size, row["state"], metrics))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines).rstrip()
