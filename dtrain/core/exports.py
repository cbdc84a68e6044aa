"""`dtrain export`'s decisions, without torch: the formats and what each needs, which weights of a run it takes,
and how close an artifact's outputs must stay to the trained model's."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path

from dtrain.core import checkpoints
from dtrain.core.rundir import MODEL, RunDir
from dtrain.errors import UsageError

EXTRA = "dtrain[export]"


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    file: str  # the artifact's name in --out
    traced: bool = False  # a program torch.export traces from the recipe's example inputs, not weights alone
    packages: tuple[str, ...] = ()  # what writes and loads it, beyond torch: the dtrain[export] extra


FORMATS = {f.name: f for f in (
    Format("state-dict", MODEL),
    Format("safetensors", "model.safetensors", packages=("safetensors",)),
    Format("pt2", "model.pt2", traced=True),
    Format("onnx", "model.onnx", traced=True, packages=("onnx", "onnxscript", "onnxruntime")),
)}

# An artifact passes when every output element keeps |artifact - eager| <= ATOL + RTOL * |eager| (torch.allclose's
# rule) on fp32 logits. fp32 keeps 7 digits (eps 1.2e-7), and another runtime sums a layer's thousands of products in
# another order and fuses other ops: that moves logits by 1e-7 to 1e-6 (bench/RESULTS.md). 1e-4 leaves two orders of
# magnitude for deeper models, while a wrong weight, layout or op moves logits by 1e-2 and more.
ATOL = 1e-4
RTOL = 1e-4


def parse_formats(text: str) -> tuple[Format, ...]:
    """The formats of a comma-separated list, in FORMATS' order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in FORMATS:
            near = difflib.get_close_matches(name, FORMATS, n=1)
            hint = f"did you mean {near[0]}? " if near else ""
            raise UsageError(f"--format {name!r} is not a format; {hint}choose from {', '.join(FORMATS)} "
                             "(comma-separated).")
    if not names:
        raise UsageError(f"--format is empty; choose from {', '.join(FORMATS)} (comma-separated).")
    return tuple(f for f in FORMATS.values() if f.name in names)


def missing_packages(formats: Iterable[Format],
                     installed: Callable[[str], bool] = lambda m: importlib.util.find_spec(m) is not None) -> str | None:
    """One sentence naming the formats whose packages this Python lacks, and the extra that brings them; or None."""
    lacking = {f.name: [p for p in f.packages if not installed(p)] for f in formats}
    lacking = {name: packages for name, packages in lacking.items() if packages}
    if not lacking:
        return None
    packages = sorted({p for ps in lacking.values() for p in ps})
    return (f"--format {','.join(lacking)} needs {', '.join(packages)}, which this Python lacks; "
            f"pip install '{EXTRA}'.")


@dataclasses.dataclass(frozen=True)
class Source:
    """The weights an export takes: a committed checkpoint (`step`), or the run's final model.pth (no step)."""
    path: Path
    step: int | None

    @property
    def name(self) -> str:
        return self.path.name


def choose_source(run_dir: Path, checkpoint: str | None) -> tuple[Source, list[str]]:
    """`--checkpoint step_N` (committed and whole), `--checkpoint model.pth`, or by default the newest committed
    checkpoint that verifies, else model.pth; and the notes to print about the choice."""
    model = RunDir(run_dir).model
    listing = f"`dtrain ckpt ls {run_dir}` lists them"
    if checkpoint is not None and Path(checkpoint).name == MODEL:
        if not model.is_file():
            raise UsageError(f"{run_dir} has no {MODEL} (the run has not finished); export a checkpoint, {listing}.")
        return Source(model, None), []
    if checkpoint is not None:
        path = checkpoints.checkpoint_root(run_dir) / Path(checkpoint).name
        if not path.is_dir():
            raise UsageError(f"{run_dir} has no checkpoint {checkpoint}; {listing}.")
        try:
            manifest = checkpoints.verify(path)
        except checkpoints.CheckpointError as exc:
            raise UsageError(f"{str(exc).rstrip('.')}; export a committed checkpoint, {listing}.") from None
        return Source(path, manifest["step"]), []
    choice = checkpoints.choose_for_resume(run_dir, "auto")
    notes = list(choice.notes)
    if choice.path is not None:
        return Source(choice.path, checkpoints.read_manifest(choice.path)["step"]), notes
    if model.is_file():
        return Source(model, None), [*notes, f"{run_dir} has no committed checkpoint; exporting its {MODEL}."]
    raise UsageError(f"{run_dir} has no committed checkpoint and no {MODEL}; train it first, or pass another run "
                     "directory.")


def recorded_recipe(run_dir: Path) -> tuple[Path, list[str]]:
    """The recipe and its arguments as the run's config.yaml recorded them."""
    import yaml

    path = RunDir(run_dir).config
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{run_dir} has no {path.name}: it is not a run directory, or its ranks never started; "
                         "pass the folder `dtrain launch` wrote.") from None
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); pass a run directory whose config.yaml is whole.") from None
    return Path(config["recipe"]), [str(arg) for arg in config.get("recipe_args") or []]


def format_summary(record: dict) -> str:
    """export.json as a table: each artifact's size, its distance from the trained model, and its accuracy."""
    evaluated = "eval" in record
    rows = [f"{'format':<12} {'files':<32} {'size':>10} {'max abs diff':>13} {'max rel diff':>13}"
            + (f" {'accuracy':>9}" if evaluated else "")]
    for name, entry in record["formats"].items():
        accuracy = f" {100 * entry['accuracy']:>8.2f}%" if "accuracy" in entry else ""
        rows.append(f"{name:<12} {', '.join(entry['files']):<32} {sum(entry['files'].values()) / 1e6:>7.2f} MB "
                    f"{entry['max_abs_diff']:>13.3g} {entry['max_rel_diff']:>13.3g}{accuracy}")
    if evaluated:
        rows.append(f"{'checkpoint':<12} {Path(record['source']['path']).name:<32} {'':>10} {'':>13} {'':>13} "
                    f"{100 * record['eval']['checkpoint_accuracy']:>8.2f}%")
        rows.append(f"(accuracy on {record['eval']['samples']} evaluation samples)")
    return "\n".join(rows)
