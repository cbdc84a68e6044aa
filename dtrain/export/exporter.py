"""`dtrain export`: a run's trained model as artifacts to deploy. Every artifact is written into a folder beside
--out, loaded back in a fresh process and run against the eager fp32 model; only when all of them compute what it
computes do they move into --out, export.json last. Any failure leaves --out as it was."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtrain import __version__
from dtrain.core import checkpoints
from dtrain.core.exports import ATOL, RTOL, Format, Source
from dtrain.core.rundir import EXPORT_RECORD, MANIFEST, write_atomically
from dtrain.errors import UsageError
from dtrain.export.artifacts import accuracy, cut, outputs_of, trace, write
from dtrain.export.recipe import Dims, Inputs, Recipe
from dtrain.runtime.checkpoint import model_weights


@dataclasses.dataclass(frozen=True)
class Request:
    source: Source
    formats: tuple[Format, ...]
    out: Path
    recipe: Path
    recipe_args: list[str]
    dynamic_batch: bool = False
    evaluate: bool = False
    atol: float = ATOL
    rtol: float = RTOL


def export(request: Request, say: Callable[[str], None]) -> dict[str, Any]:
    """Write the artifacts into `request.out`; return what export.json records."""
    recipe = Recipe.load(request.recipe, request.recipe_args)
    model = recipe.model()
    load_weights(model, model_weights(request.source.path), request)
    inputs = recipe.inputs()
    dims = recipe.dims(inputs, request.dynamic_batch)
    batches = [inputs, *filter(None, [cut(inputs, dims)])]
    with torch.no_grad():
        expected = [outputs_of(model(**batch)) for batch in batches]
    record = _describe(request, inputs, dims, batches, expected)
    if request.evaluate:
        record["eval"] = _evaluate(recipe, model, inputs)
    try:
        request.out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{request.out.name}.partial-", dir=request.out.parent))
    except OSError as exc:
        raise _unwritable(request.out, exc) from None
    try:
        _write_all(request, model, inputs, dims, staging, record, say)
        started = time.perf_counter()
        results = _check_in_fresh_process(request, batches, staging, fixed_batch=not _batch_varies(dims))
        record["check_seconds"] = round(time.perf_counter() - started, 3)
        say(f"loaded {len(request.formats)} artifact(s) back in a fresh process and ran them on {len(batches)} batch "
            f"shape(s) ({record['check_seconds']:.1f} s)")
        for fmt in request.formats:
            figures = parity(expected, results["outputs"][fmt.name], request.atol, request.rtol)
            record["formats"][fmt.name].update(figures)
            if figures["max_excess"] > 0:
                raise UsageError(
                    f"{fmt.file} computes other outputs than the trained model (max abs diff {figures['max_abs_diff']:.3g}, "
                    f"max rel diff {figures['max_rel_diff']:.3g}, over --atol {request.atol:g} --rtol {request.rtol:g}); "
                    "nothing was written: export the other formats, or pass a larger tolerance if the difference is "
                    "expected.")
        for name, value in results["accuracy"].items():
            record["formats"][name]["accuracy"] = value
        write_atomically(staging / EXPORT_RECORD, json.dumps(record, indent=2) + "\n")
        _publish(staging, request.out)
    except OSError as exc:
        raise _unwritable(request.out, exc) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], request: Request) -> None:
    """Load strictly, but a tied weight may come under one of its names only; one sentence when the recipe's model
    is no longer the one that was trained."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    aliases = {name: names for names in names_of.values() for name in names}
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes that differ
        problem = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise _misfit(request, problem.rstrip(".")) from None
    missing = [k for k in result.missing_keys if not any(alias in weights for alias in aliases.get(k, ()))]
    problems = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", result.unexpected_keys)) if keys]
    if problems:
        raise _misfit(request, "; ".join(problems))


def _misfit(request: Request, problem: str) -> UsageError:
    return UsageError(f"{request.source.path} does not fit the model {request.recipe.name} builds now ({problem}); "
                      "the recipe changed since training: export with the recipe as it was, through --recipe.")


def parity(expected: list[list[torch.Tensor]], got: list[list[torch.Tensor]], atol: float, rtol: float) -> dict:
    """The largest absolute difference over every output of every batch; the largest relative to its output's
    scale (max |diff| / max |expected|: elementwise ratios mean nothing near zero); and the largest excess over
    `atol + rtol * |expected|` (positive: out of tolerance; infinite: outputs of other shapes)."""
    max_abs = max_rel = 0.0
    excess = -math.inf
    for want, have in zip(expected, got, strict=True):
        if [t.shape for t in want] != [t.shape for t in have]:
            return {"max_abs_diff": math.inf, "max_rel_diff": math.inf, "max_excess": math.inf}
        for e, g in zip(want, have):
            e, g = e.double(), g.double()
            diff = (g - e).abs()
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(diff.max() / e.abs().max().clamp_min(1e-30)))
            excess = max(excess, float((diff - (atol + rtol * e.abs())).max()))
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "max_excess": excess}


def _describe(request: Request, inputs: Inputs, dims: Dims, batches: list[Inputs],
              expected: list[list[torch.Tensor]]) -> dict[str, Any]:
    source = request.source
    digest_of = source.path / MANIFEST if source.step is not None else source.path
    return {
        "source": {"path": str(source.path), "step": source.step, "sha256": checkpoints.file_digest(digest_of)[1],
                   "sha256_of": digest_of.name},
        "recipe": str(request.recipe), "recipe_args": request.recipe_args,
        "inputs": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                          "dynamic": {str(axis): spec[0] for axis, spec in dims.get(name, {}).items()}}
                   for name, t in inputs.items()},
        "outputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in expected[0]],
        "checked_shapes": [{name: list(t.shape) for name, t in batch.items()} for batch in batches],
        "atol": request.atol, "rtol": request.rtol,
        "torch_version": torch.__version__, "dtrain_version": __version__,
        "formats": {},
    }


def _write_all(request: Request, model: nn.Module, inputs: Inputs, dims: Dims, staging: Path, record: dict,
               say: Callable[[str], None]) -> None:
    program = None
    if any(fmt.traced for fmt in request.formats):
        started = time.perf_counter()
        program = trace(model, inputs, dims, request.recipe)
        record["trace_seconds"] = round(time.perf_counter() - started, 3)
        say(f"traced the model with torch.export ({record['trace_seconds']:.1f} s)")
    for fmt in request.formats:
        started = time.perf_counter()
        files, facts = write(fmt, model, program, inputs, dims)
        for name, data in files.items():
            (staging / name).write_bytes(data)
        seconds = time.perf_counter() - started
        record["formats"][fmt.name] = {"files": {name: len(data) for name, data in files.items()},
                                       "seconds": round(seconds, 3), **facts}
        say(f"wrote {', '.join(files)} ({_size(sum(map(len, files.values())))}, {seconds:.1f} s)")


def _check_in_fresh_process(request: Request, batches: list[Inputs], staging: Path, fixed_batch: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dtrain-export-check-") as scratch:
        job = Path(scratch) / "job.json"
        torch.save(batches, Path(scratch) / "batches.pt")
        job.write_text(json.dumps({
            "recipe": str(request.recipe), "recipe_args": request.recipe_args, "folder": str(staging),
            "formats": [fmt.name for fmt in request.formats], "batches": str(Path(scratch) / "batches.pt"),
            "eval": request.evaluate, "eval_batch": len(next(iter(batches[0].values()))), "fixed_batch": fixed_batch,
            "results": str(Path(scratch) / "results.pt")}))
        done = subprocess.run([sys.executable, "-m", "dtrain.export.check", str(job)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"exit {done.returncode}")
            raise UsageError(f"loading the artifacts back in a fresh process failed ({last.strip()}); nothing was "
                             "written.")
        return torch.load(Path(scratch) / "results.pt", weights_only=True)


def _evaluate(recipe: Recipe, model: nn.Module, inputs: Inputs) -> dict[str, Any]:
    """The eager model's accuracy on the recipe's evaluation set (the traced artifacts' comes from the check)."""
    eval_inputs, targets = recipe.evaluation()
    batch = len(next(iter(inputs.values())))
    with torch.no_grad():
        eager = accuracy(lambda b: outputs_of(model(**b)), eval_inputs, targets, batch, fixed_batch=False)
    return {"samples": int(targets.numel()), "checkpoint_accuracy": eager}


def _batch_varies(dims: Dims) -> bool:
    return any(0 in axes for axes in dims.values())


def _publish(staging: Path, out: Path) -> None:
    """Each file into --out by a rename (whole or not at all), export.json last."""
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(staging.iterdir(), key=lambda p: p.name == EXPORT_RECORD):
        os.replace(file, out / file.name)


def _unwritable(out: Path, exc: OSError) -> UsageError:
    return UsageError(f"cannot write the export into {out} ({exc.strerror or exc}); free space there or pass "
                      "another --out (nothing was written).")


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"
