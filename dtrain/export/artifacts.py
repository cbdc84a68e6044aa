"""Each format written from the model (into memory: a full disk then fails on a plain write, which says so), and
loaded back the way docs/deploy.md tells a user to load it."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from dtrain.core.exports import FORMATS, Format
from dtrain.errors import UsageError
from dtrain.export.recipe import Dims, Inputs, Recipe

Run = Callable[[Inputs], list[torch.Tensor]]  # an artifact loaded back: inputs -> its output tensors, flattened
Written = tuple[dict[str, bytes], dict[str, Any]]  # file name -> contents, and facts for export.json


def outputs_of(value: Any) -> list[torch.Tensor]:
    """A forward's tensors in pytree order (a tensor, a tuple, a Hugging Face ModelOutput), which is ONNX's."""
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def dynamic_shapes(inputs: Inputs, dims: Dims) -> dict[str, Any] | None:
    """torch.export's `dynamic_shapes` for keyword inputs: one Dim per name, shared by the axes that name it."""
    if not dims:
        return None
    made: dict[str, Any] = {}
    for axes in dims.values():
        for name, low, high in axes.values():
            made.setdefault(name, torch.export.Dim(name, min=low, **({"max": high} if high else {})))
    return {name: {axis: made[spec[0]] for axis, spec in dims.get(name, {}).items()} or None for name in inputs}


def cut(inputs: Inputs, dims: Dims) -> Inputs | None:
    """The inputs with each varying axis cut to half its length (not below its minimum): a second shape that an
    artifact must compute right as well; None when nothing varies or nothing can be cut."""
    lengths: dict[str, int] = {}
    for name, axes in dims.items():
        for axis, (dim, low, _) in axes.items():
            lengths.setdefault(dim, max(low, inputs[name].shape[axis] // 2))
    cut_inputs = dict(inputs)
    for name, axes in dims.items():
        for axis, (dim, _, _) in axes.items():
            cut_inputs[name] = cut_inputs[name].narrow(axis, 0, lengths[dim])
    changed = any(cut_inputs[name].shape != inputs[name].shape for name in inputs)
    return cut_inputs if changed else None


def trace(model: nn.Module, inputs: Inputs, dims: Dims, recipe: Path) -> torch.export.ExportedProgram:
    """The model as a torch.export program, or one sentence naming what it cannot trace (torch's dump of the
    graph so far, on stderr, is kept from the user)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, (), kwargs=inputs, dynamic_shapes=dynamic_shapes(inputs, dims))
    except Exception as exc:
        weights_only = ",".join(f.name for f in FORMATS.values() if not f.traced)
        raise UsageError(f"torch.export cannot trace {recipe.name}'s model: {_construct(exc)}; "
                         f"--format {weights_only} still work.") from None


def _construct(exc: Exception) -> str:
    """The first line of torch's account, and the recipe's line it stopped at when torch names one."""
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = first.split("  ")[0].rstrip(".")
    frame = re.search(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    return first + (f" at {Path(frame[1]).name}:{frame[2]} (`{frame[3].strip()}`)" if frame else "")


# --- writing ----------------------------------------------------------------------------------------------------

def write(fmt: Format, model: nn.Module, program: torch.export.ExportedProgram | None, inputs: Inputs,
          dims: Dims) -> Written:
    return _WRITERS[fmt.name](fmt, model, program, inputs, dims)


def _state_dict(fmt: Format, model: nn.Module, *_: Any) -> Written:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return {fmt.file: buffer.getvalue()}, {}


def _safetensors(fmt: Format, model: nn.Module, *_: Any) -> Written:
    """Tied weights once (safetensors refuses shared memory; its `load_model` ties them back); a Hugging Face
    model's config.json beside it, so that `from_pretrained(out)` loads the folder."""
    from safetensors.torch import save

    files = {fmt.file: save(written_once(model.state_dict()), metadata={"format": "pt"})}
    config: Any = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        files["config.json"] = config.to_json_string().encode()
    return files, {}


def written_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the second and later names of a tensor (tied weights): the first name keeps it."""
    kept, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key not in seen:
            seen.add(key)
            kept[name] = tensor.detach().clone()
    return kept


def _pt2(fmt: Format, model: nn.Module, program: torch.export.ExportedProgram, *_: Any) -> Written:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return {fmt.file: buffer.getvalue()}, {}


def _onnx(fmt: Format, model: nn.Module, program: torch.export.ExportedProgram, inputs: Inputs, dims: Dims) -> Written:
    """torch.onnx's dynamo exporter from the traced program (the dims again, for their names in the graph)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        onnx_program = torch.onnx.export(program, (), kwargs=inputs, dynamic_shapes=dynamic_shapes(inputs, dims),
                                         dynamo=True, verbose=False)
    assert onnx_program is not None  # None only when given no model
    return {fmt.file: onnx_program.model_proto.SerializeToString()}, {"opset": onnx_program.model.opset_imports[""]}


_WRITERS: dict[str, Callable[..., Written]] = {"state-dict": _state_dict, "safetensors": _safetensors, "pt2": _pt2,
                                               "onnx": _onnx}


# --- loading back -----------------------------------------------------------------------------------------------

def load(fmt: Format, folder: Path, recipe: Recipe) -> Run:
    return _LOADERS[fmt.name](folder / fmt.file, recipe)


def _into_model(load_weights: Callable[[nn.Module, Path], Any]) -> Callable[[Path, Recipe], Run]:
    def loader(file: Path, recipe: Recipe) -> Run:
        model = recipe.model()
        load_weights(model, file)
        return lambda inputs: outputs_of(model(**inputs))
    return loader


def _load_safetensors(model: nn.Module, file: Path) -> None:
    from safetensors.torch import load_model

    load_model(model, file)


def _load_pt2(file: Path, recipe: Recipe) -> Run:
    module = torch.export.load(file).module()
    return lambda inputs: outputs_of(module(**inputs))


def _load_onnx(file: Path, recipe: Recipe) -> Run:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda inputs: [torch.from_numpy(o) for o in session.run(None, {n: inputs[n].numpy() for n in names})]


_LOADERS: dict[str, Callable[[Path, Recipe], Run]] = {
    "state-dict": _into_model(lambda model, file: model.load_state_dict(torch.load(file, weights_only=True))),
    "safetensors": _into_model(_load_safetensors),
    "pt2": _load_pt2,
    "onnx": _load_onnx,
}


def accuracy(run: Run, inputs: Inputs, targets: torch.Tensor, batch_size: int, fixed_batch: bool) -> float:
    """The share of targets that the first output's argmax hits, in batches of `batch_size`; with `fixed_batch`
    (a program traced for one batch size) the last batch is padded with copies of its last sample."""
    correct = 0
    for start in range(0, len(targets), batch_size):
        batch = {name: value[start:start + batch_size] for name, value in inputs.items()}
        real = len(next(iter(batch.values())))
        if fixed_batch and real < batch_size:
            batch = {name: torch.cat([value, value[-1:].expand(batch_size - real, *value.shape[1:])])
                     for name, value in batch.items()}
        scores = run(batch)[0][:real]
        correct += int((scores.argmax(-1) == targets[start:start + real]).sum())
    return correct / targets.numel()
