"""`dtrain export` on real runs: 2-rank FSDP and ZeRO-3 checkpoints of the MNIST CNN to every format, each loaded
back in a fresh interpreter that cannot import dtrain; tiny_gpt with a sequence length that varies; GPT-2's tied
embedding written once; and each bad input's sentence, with --out left as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dtrain.core import checkpoints
from dtrain.core.rundir import MARKER
from dtrain.export.recipe import Recipe
from dtrain.runtime.checkpoint import model_weights

from conftest import ROOT, TEST_RECIPES, launch, mounted_tmpfs, run_dtrain

ONE = ("--cpu", "--nproc", "1")
# The file names users load (docs/deploy.md), spelt out: the test holds the names, not the product's table.
FORMATS = {"state-dict": "model.pth", "safetensors": "model.safetensors", "pt2": "model.pt2", "onnx": "model.onnx"}

# A fresh interpreter where `import dtrain` fails: the artifacts must load with torch and their own libraries.
WITHOUT_DTRAIN = textwrap.dedent("""\
    import sys

    class NoDtrain:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "dtrain":
                raise ImportError("dtrain is blocked in this interpreter")

    sys.meta_path.insert(0, NoDtrain())
    """)


def without_dtrain(code: str, *args: str) -> None:
    script = WITHOUT_DTRAIN + textwrap.dedent(code) + "\nassert not [m for m in sys.modules if m.startswith('dtrain')]\n"
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          cwd="/")
    assert done.returncode == 0, done.stderr


def eager(record: dict) -> torch.nn.Module:
    """The trained model as the test builds it: the run's recipe, its recorded arguments, the exported weights."""
    model = Recipe.load(Path(record["recipe"]), record["recipe_args"]).model()
    model.load_state_dict(model_weights(Path(record["source"]["path"])))
    return model


def export(run_dir: Path, *options: str):
    done = run_dtrain("export", str(run_dir), *options)
    assert done.returncode == 0, done.stderr
    return done, json.loads((run_dir / "export" / "export.json").read_text())


@pytest.fixture(scope="module")
def mnist_test_set(data_dir, tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "recipes"))
    from torchvision import datasets

    from mnist_cnn import to_tensors

    images, labels = to_tensors(datasets.MNIST(data_dir, train=False)).tensors
    path = tmp_path_factory.mktemp("mnist") / "test.pt"
    torch.save({"images": images, "labels": labels}, path)
    return path


def sharded_run(strategy: str, data_dir: str, folder: Path) -> Path:
    """The MNIST CNN trained 20 steps on 2 ranks, sharded, with a committed checkpoint at step 20."""
    run_dir = folder / "run"
    launch(run_dir, "--strategy", strategy, "--max-steps", "20", "--checkpoint-every", "20", "--",
           "--epochs", "1", "--limit-eval-batches", "2", "--data-dir", data_dir)
    return run_dir


@pytest.fixture(scope="module")
def fsdp_run(data_dir, tmp_path_factory) -> Path:
    return sharded_run("fsdp", data_dir, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def zero3_run(data_dir, tmp_path_factory) -> Path:
    return sharded_run("zero3", data_dir, tmp_path_factory.mktemp("zero3"))


@pytest.mark.parametrize("run", ["fsdp_run", "zero3_run"])
def test_a_sharded_checkpoint_exports_to_every_format_and_each_computes_what_the_model_computes(run, request,
                                                                                                mnist_test_set):
    sharded_run = request.getfixturevalue(run)
    done, record = export(sharded_run, "--checkpoint", "step_0000020", "--dynamic-batch", "--eval")
    out = sharded_run / "export"
    assert sorted(p.name for p in out.iterdir()) == sorted([*FORMATS.values(), "export.json"])
    assert [line.split(" (")[0] for line in done.stderr.splitlines()] == [
        f"dtrain: exporting {sharded_run}/checkpoints/step_0000020", "dtrain: traced the model with torch.export",
        *(f"dtrain: wrote {file}" for file in FORMATS.values()),
        "dtrain: loaded 4 artifact(s) back in a fresh process and ran them on 2 batch shape(s)"]
    checkpoint = sharded_run / "checkpoints" / "step_0000020"
    assert record["source"] == {"path": str(checkpoint), "step": 20, "sha256_of": "manifest.json",
                                "sha256": checkpoints.file_digest(checkpoint / "manifest.json")[1]}
    assert record["inputs"] == {"images": {"shape": [64, 1, 28, 28], "dtype": "float32", "dynamic": {"0": "batch"}}}
    assert record["formats"]["onnx"]["opset"] >= 18 and record["torch_version"] == torch.__version__
    for name, file in FORMATS.items():
        assert record["formats"][name]["files"][file] == (out / file).stat().st_size
        assert record["formats"][name]["max_abs_diff"] <= 1e-4

    model = eager(record)
    test = torch.load(mnist_test_set, weights_only=True)
    with torch.no_grad():
        expected = model(test["images"][:256])
        checkpoint_accuracy = (model(test["images"]).argmax(1) == test["labels"]).float().mean().item()
    assert abs(record["formats"]["onnx"]["accuracy"] - checkpoint_accuracy) <= 1e-4
    assert record["eval"] == {"samples": 10000, "checkpoint_accuracy": pytest.approx(checkpoint_accuracy, abs=1e-4)}

    results = out.parent / "reloaded.pt"
    without_dtrain("""
        import ast
        from pathlib import Path

        import onnxruntime
        import torch
        from safetensors.torch import load_model

        folder, data, recipe, results = Path(sys.argv[1]), torch.load(sys.argv[2], weights_only=True), sys.argv[3], sys.argv[4]
        # The recipe's model class from its source: importing the recipe would import dtrain.
        tree = ast.parse(Path(recipe).read_text())
        definition = next(node for node in tree.body if getattr(node, "name", None) == "MNISTCNN")
        scope = {"torch": torch, "nn": torch.nn}
        exec(compile(ast.Module([definition], []), recipe, "exec"), scope)

        from_safetensors, from_state_dict = scope["MNISTCNN"]().eval(), scope["MNISTCNN"]().eval()
        load_model(from_safetensors, folder / "model.safetensors")
        from_state_dict.load_state_dict(torch.load(folder / "model.pth", weights_only=True))
        program = torch.export.load(folder / "model.pt2").module()
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        images = data["images"][:256]
        with torch.no_grad():
            outputs = {"safetensors": from_safetensors(images), "state-dict": from_state_dict(images),
                       "pt2": program(images=images),
                       "onnx": torch.from_numpy(session.run(None, {"images": images.numpy()})[0])}
        hits = sum(int((torch.from_numpy(session.run(None, {"images": batch.numpy()})[0]).argmax(1) == labels).sum())
                   for batch, labels in zip(data["images"].split(1000), data["labels"].split(1000)))
        torch.save({"outputs": outputs, "onnx_accuracy": hits / len(data["labels"])}, results)
        """, str(out), str(mnist_test_set), str(ROOT / "recipes" / "mnist_cnn.py"), str(results))
    reloaded = torch.load(results, weights_only=True)
    for name, outputs in reloaded["outputs"].items():
        assert torch.allclose(outputs, expected, atol=1e-4, rtol=1e-4), name
    assert abs(reloaded["onnx_accuracy"] - checkpoint_accuracy) <= 1e-4  # 0.01%: one image in 10,000


def test_tiny_gpt_exports_a_sequence_length_that_varies(tmp_path):
    run_dir = tmp_path / "gpt"
    launch(run_dir, "--max-steps", "2", "--", "--max-chars", "20000", "--layers", "1", "--d-model", "32",
           "--block", "32", recipe="recipes/tiny_gpt.py", devices=ONE)
    _, record = export(run_dir, "--format", "pt2,onnx")
    assert record["inputs"]["input_ids"]["dynamic"] == {"1": "sequence"}
    assert record["checked_shapes"] == [{"input_ids": [8, 32]}, {"input_ids": [8, 16]}]

    model = eager(record)
    ids = {length: torch.randint(97, (8, length), generator=torch.Generator().manual_seed(length)) for length in (32, 11)}
    with torch.no_grad():
        expected = {length: model(batch) for length, batch in ids.items()}
    inputs, results = tmp_path / "ids.pt", tmp_path / "reloaded.pt"
    torch.save(ids, inputs)
    without_dtrain("""
        import onnxruntime
        import torch

        folder, ids = sys.argv[1], torch.load(sys.argv[2], weights_only=True)
        program = torch.export.load(f"{folder}/model.pt2").module()
        session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape == [8, "sequence"]
        torch.save({length: (program(input_ids=batch),
                             torch.from_numpy(session.run(None, {"input_ids": batch.numpy()})[0]))
                    for length, batch in ids.items()}, sys.argv[3])
        """, str(run_dir / "export"), str(inputs), str(results))
    for length, (from_pt2, from_onnx) in torch.load(results, weights_only=True).items():
        assert from_pt2.shape == (8, length, 97)
        assert torch.allclose(from_pt2, expected[length], atol=1e-4, rtol=1e-4)
        assert torch.allclose(from_onnx, expected[length], atol=1e-4, rtol=1e-4)


def test_gpt2s_tied_embedding_is_written_once_and_loads_back_sharing_storage(tmp_path):
    run_dir = tmp_path / "gpt2"
    launch(run_dir, "--max-steps", "2", "--", "--max-chars", "20000", "--n-layer", "1", "--n-embd", "32",
           "--block", "32", recipe="recipes/hf_causal_lm.py", devices=ONE)
    _, record = export(run_dir, "--format", "safetensors")
    assert set(record["formats"]["safetensors"]["files"]) == {"model.safetensors", "config.json"}
    ids = torch.randint(97, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = eager(record)(input_ids=ids).logits
    results = tmp_path / "reloaded.pt"
    without_dtrain("""
        import torch
        from safetensors import safe_open
        from transformers import GPT2LMHeadModel

        folder, ids = sys.argv[1], torch.tensor(eval(sys.argv[2]))
        with safe_open(f"{folder}/model.safetensors", "pt") as file:
            assert "transformer.wte.weight" in file.keys() and "lm_head.weight" not in file.keys()
        model = GPT2LMHeadModel.from_pretrained(folder).eval()
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, sys.argv[3])
        """, str(run_dir / "export"), str(ids.tolist()), str(results))
    assert torch.allclose(torch.load(results, weights_only=True), expected, atol=1e-4, rtol=1e-4)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB file system (tmpfs), mounted for the test and unmounted after it."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as disk:
        yield disk


def test_each_bad_input_gets_one_sentence_and_leaves_out_as_it_was(fsdp_run, tmp_path, small_disk):
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run, run_dir, ignore=shutil.ignore_patterns("export"))
    unfinished = run_dir / "checkpoints" / "step_0000030"
    shutil.copytree(run_dir / "checkpoints" / "step_0000020", unfinished)
    (unfinished / MARKER).unlink()
    out = tmp_path / "deployed"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")

    def refused(*options: str, out: Path = out) -> str:
        before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
        done = run_dtrain("export", str(run_dir), "--out", str(out), *options)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None) == before
        assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]
        return done.stderr.splitlines()[-1]

    recipes = TEST_RECIPES
    assert refused("--recipe", str(recipes / "export_untraceable.py"), "--format", "pt2,onnx").startswith(
        "dtrain: error: torch.export cannot trace export_untraceable.py's model: Could not guard on data-dependent "
        "expression")
    assert refused("--recipe", str(recipes / "export_changed.py")) == (
        f"dtrain: error: {run_dir}/checkpoints/step_0000020 does not fit the model export_changed.py builds now "
        "(missing: calibration.weight, calibration.bias); the recipe changed since training: export with the recipe as "
        "it was, through --recipe.")
    bare = tmp_path / "bare.py"
    bare.write_text("import argparse\n\ndef parse_args(argv=None):\n    return argparse.Namespace()\n")
    assert refused("--recipe", str(bare)).startswith(
        f"dtrain: error: {bare} cannot be exported: add a module-level export_model(args) that builds the model")
    assert refused("--checkpoint", "step_0000030") == (
        f"dtrain: error: checkpoint {unfinished} has no COMMITTED marker: its save did not finish; export a committed "
        f"checkpoint, `dtrain ckpt ls {run_dir}` lists them.")
    assert refused("--format", "onnx", "--atol", "0", "--rtol", "0").startswith(
        "dtrain: error: model.onnx computes other outputs than the trained model (max abs diff ")
    full = small_disk / "export"
    assert refused("--format", "state-dict,safetensors", out=full) == (
        f"dtrain: error: cannot write the export into {full} (No space left on device); free space there or pass "
        "another --out (nothing was written).")
    assert list(small_disk.iterdir()) == []
