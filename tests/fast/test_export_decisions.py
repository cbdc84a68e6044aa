"""`dtrain export`'s deciders, in-process: formats, the weights chosen, parity, the varying axes, tied weights,
strict loading, the sentence for a model torch.export cannot trace, and the class names of a report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dtrain.core import checkpoints, exports
from dtrain.core.rundir import MARKER, MODEL, RunDir
from dtrain.errors import UsageError
from dtrain.export import artifacts
from dtrain.export.exporter import Request, load_weights, parity
from dtrain.export.recipe import Recipe
from dtrain.outputs.report import classification_report, format_report


def test_formats_are_parsed_in_their_order_and_a_misspelt_one_is_named():
    assert [f.name for f in exports.parse_formats("onnx, pt2,onnx")] == ["pt2", "onnx"]
    with pytest.raises(UsageError, match=r"^--format 'onx' is not a format; did you mean onnx\? choose from "
                                         r"state-dict, safetensors, pt2, onnx \(comma-separated\)\.$"):
        exports.parse_formats("pt2,onx")
    with pytest.raises(UsageError, match="--format is empty"):
        exports.parse_formats(" , ")


def test_a_format_whose_packages_are_missing_names_them_and_the_extra():
    chosen = exports.parse_formats("state-dict,safetensors,onnx")
    assert exports.missing_packages(chosen, installed=lambda module: True) is None
    assert exports.missing_packages(chosen, installed=lambda module: module != "onnxruntime") == (
        "--format onnx needs onnxruntime, which this Python lacks; pip install 'dtrain[export]'.")
    assert exports.missing_packages(chosen, installed=lambda module: False) == (
        "--format safetensors,onnx needs onnx, onnxruntime, onnxscript, safetensors, which this Python lacks; "
        "pip install 'dtrain[export]'.")


def _checkpoint(run_dir: Path, step: int, committed: bool = True) -> Path:
    path = checkpoints.checkpoint_root(run_dir) / checkpoints.step_dir_name(step)
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": checkpoints.FORMAT, "step": step, "files": {}}))
    if committed:
        (path / MARKER).write_text("{}")
    return path


def test_the_source_is_the_newest_committed_checkpoint_else_model_pth(tmp_path):
    with pytest.raises(UsageError, match="has no committed checkpoint and no model.pth; train it first"):
        exports.choose_source(tmp_path, None)
    RunDir(tmp_path).model.write_bytes(b"")
    source, notes = exports.choose_source(tmp_path, None)
    assert (source.path, source.step) == (RunDir(tmp_path).model, None)
    assert notes == [f"{tmp_path} has no committed checkpoint; exporting its model.pth."]
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, committed=False)
    source, _ = exports.choose_source(tmp_path, None)
    assert (source.name, source.step) == ("step_0000010", 10)
    assert exports.choose_source(tmp_path, MODEL)[0].path == RunDir(tmp_path).model


def test_a_named_checkpoint_must_exist_and_be_committed(tmp_path):
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 20, committed=False)
    assert exports.choose_source(tmp_path, "step_0000010")[0].step == 10
    with pytest.raises(UsageError, match=r"has no checkpoint step_0000030; `dtrain ckpt ls .*` lists them\.$"):
        exports.choose_source(tmp_path, "step_0000030")
    with pytest.raises(UsageError, match=r"step_0000020 has no COMMITTED marker: its save did not finish; export a "
                                         r"committed checkpoint, `dtrain ckpt ls .*` lists them\.$"):
        exports.choose_source(tmp_path, "step_0000020")
    with pytest.raises(UsageError, match=r"has no model.pth \(the run has not finished\)"):
        exports.choose_source(tmp_path, "model.pth")


def test_parity_measures_the_largest_differences_and_the_excess_over_the_tolerance():
    eager = [[torch.tensor([[10.0, -2.0], [0.0, 4.0]])]]
    same = parity(eager, eager, atol=1e-4, rtol=1e-4)
    assert (same["max_abs_diff"], same["max_rel_diff"]) == (0.0, 0.0) and same["max_excess"] < 0
    near = parity(eager, [[eager[0][0] + torch.tensor([[5e-4, 0.0], [0.0, 0.0]])]], atol=1e-4, rtol=1e-4)
    assert near["max_abs_diff"] == pytest.approx(5e-4, rel=1e-3) and near["max_rel_diff"] == pytest.approx(5e-5, rel=1e-3)
    assert near["max_excess"] < 0  # 5e-4 <= 1e-4 + 1e-4 * 10
    far = parity(eager, [[eager[0][0] + torch.tensor([[0.0, 0.0], [5e-4, 0.0]])]], atol=1e-4, rtol=1e-4)
    assert far["max_excess"] == pytest.approx(4e-4, rel=1e-3)  # at a zero, only atol counts
    assert parity(eager, [[torch.zeros(2, 3)]], 1.0, 1.0)["max_excess"] == float("inf")


def test_a_varying_axis_is_cut_to_half_and_shares_one_dim_per_name():
    inputs = {"input_ids": torch.zeros(8, 64, dtype=torch.long), "mask": torch.ones(8, 64)}
    dims = {"input_ids": {1: ("sequence", 1, 64)}, "mask": {1: ("sequence", 1, 64)}}
    cut = artifacts.cut(inputs, dims)
    assert {name: tuple(t.shape) for name, t in cut.items()} == {"input_ids": (8, 32), "mask": (8, 32)}
    shapes = artifacts.dynamic_shapes(inputs, dims)
    assert shapes["input_ids"][1] is shapes["mask"][1] and shapes["input_ids"][1].__name__ == "sequence"
    assert artifacts.cut(inputs, {}) is None and artifacts.dynamic_shapes(inputs, {}) is None
    assert artifacts.cut(inputs, {"input_ids": {1: ("sequence", 64, 64)}}) is None  # cannot go below its minimum


class Tied(nn.Module):
    def __init__(self, extra: bool = False):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        if extra:
            self.norm = nn.LayerNorm(3)

    def forward(self, ids):
        return self.head(self.embed(ids))


def _request(tmp_path: Path) -> Request:
    return Request(exports.Source(tmp_path / "step_0000010", 10), (), tmp_path / "out", Path("recipes/tied.py"), [])


def test_a_tied_weight_is_written_once_and_loads_under_either_name(tmp_path):
    from safetensors.torch import load_model, save_file

    model = Tied()
    once = artifacts.written_once(model.state_dict())
    assert list(once) == ["embed.weight"]
    save_file(once, tmp_path / "tied.safetensors")
    again = Tied()
    load_model(again, tmp_path / "tied.safetensors")
    assert again.head.weight.data_ptr() == again.embed.weight.data_ptr()
    assert torch.equal(again.embed.weight, model.embed.weight)
    load_weights(Tied(), {"head.weight": model.embed.weight}, _request(tmp_path))  # the other name alone


def test_weights_that_do_not_fit_the_recipes_model_are_named(tmp_path):
    weights = Tied().state_dict()
    with pytest.raises(UsageError, match=r"step_0000010 does not fit the model tied.py builds now \(missing: "
                                         r"norm.weight, norm.bias\); the recipe changed since training: export with "
                                         r"the recipe as it was, through --recipe\.$"):
        load_weights(Tied(extra=True), weights, _request(tmp_path))
    with pytest.raises(UsageError, match=r"\(unexpected: extra\)"):
        load_weights(Tied(), {**weights, "extra": torch.zeros(1)}, _request(tmp_path))
    with pytest.raises(UsageError, match=r"size mismatch for embed.weight"):
        load_weights(Tied(), {"embed.weight": torch.zeros(6, 3)}, _request(tmp_path))


class Branchy(nn.Module):
    def forward(self, images):
        if images.sum() > 0:
            return images
        return -images


def test_a_model_torch_export_cannot_trace_gets_one_sentence_naming_the_construct_and_the_formats_left(capfd):
    with pytest.raises(UsageError) as caught:
        artifacts.trace(Branchy(), {"images": torch.ones(2, 3)}, {}, Path("recipes/branchy.py"))
    message = str(caught.value)
    assert message.startswith("torch.export cannot trace branchy.py's model: Could not guard on data-dependent "
                              "expression")
    assert f"{Path(__file__).name}:" in message and "(`if images.sum() > 0:`)" in message
    assert message.endswith("; --format state-dict,safetensors still work.") and "\n" not in message
    assert "def forward" not in capfd.readouterr().err  # torch's dump of the graph is kept from the user


def test_a_recipe_without_the_export_functions_is_told_what_to_add(tmp_path):
    recipe = tmp_path / "bare.py"
    recipe.write_text("import argparse\ndef parse_args(argv=None):\n    return argparse.Namespace()\n")
    with pytest.raises(UsageError, match=r"bare.py cannot be exported: add a module-level export_model\(args\) that "
                                         r"builds the model; and export_inputs\(args\) that gives one batch"):
        Recipe.load(recipe, [])
    with pytest.raises(UsageError, match=r"recipe .*gone.py does not exist here; pass --recipe"):
        Recipe.load(tmp_path / "gone.py", [])


def test_the_classification_report_takes_the_recipes_class_names():
    confusion = [[3, 1], [0, 4]]
    report = classification_report(confusion, ["cat", "dog"])
    assert list(report["classes"]) == ["cat", "dog"] and report["classes"]["dog"]["recall"] == 1.0
    assert "         cat" in format_report(report)
    assert list(classification_report(confusion)["classes"]) == ["0", "1"]
    with pytest.raises(UsageError, match="the model scores 2 classes and class_names names 3"):
        classification_report(confusion, ["a", "b", "c"])


def test_the_summary_puts_each_artifact_beside_the_checkpoint():
    record = {"source": {"path": "/r/checkpoints/step_0000020"}, "eval": {"samples": 10000, "checkpoint_accuracy": 0.9},
              "formats": {"onnx": {"files": {"model.onnx": 1_700_000}, "max_abs_diff": 1e-6, "max_rel_diff": 2e-7,
                                   "accuracy": 0.9}}}
    lines = exports.format_summary(record).splitlines()
    assert lines[1].split() == ["onnx", "model.onnx", "1.70", "MB", "1e-06", "2e-07", "90.00%"]
    assert lines[2].split() == ["checkpoint", "step_0000020", "90.00%"]
    assert lines[3] == "(accuracy on 10000 evaluation samples)"
