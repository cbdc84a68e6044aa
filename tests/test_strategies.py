"""Launchers (torchrun, accelerate, deepspeed), strategies (ddp, fsdp, ZeRO), gradient accumulation,
activation checkpointing and precision: real launcher processes on 2 CPU ranks with gloo."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_RECIPES, launch, metrics, run_dtrain, train_30_steps
from dtrain import config
from dtrain.errors import UsageError
from dtrain.launchers import accelerate, deepspeed

sys.path.insert(0, str(ROOT / "recipes"))
import tiny_gpt  # noqa: E402

TINY_GPT = ["--d-model", "64", "--block", "64", "--batch-size", "16", "--max-chars", "300000"]
TINY_GPT_VAL_LOSS = 2.3  # after 150 steps of 2 x 16 windows; uniform guessing is ln(97) = 4.57


def load_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pth", weights_only=True)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def epoch_accuracy(out) -> float:
    match = re.search(r"Test Acc: ([\d.]+)%", out.stdout)
    assert match, out.stdout
    return float(match.group(1))


# --- launch side: pure --------------------------------------------------------------------------

def resolve(tmp_path: Path, installed=("deepspeed", "accelerate"), **options):
    recipe = tmp_path / "r.py"
    recipe.write_text("")
    return config.resolve({"recipe": str(recipe), "cpu": True, "nproc": 2, "run_dir": str(tmp_path / "run"),
                           **options}, gpus_available=0, free_port=29400, is_installed=lambda p: p in installed)


def test_zero_strategies_take_their_stage_and_dtrains_settings_into_the_deepspeed_config(tmp_path):
    spec = resolve(tmp_path, strategy="zero3", precision="bf16", grad_accum=4)
    assert spec.deepspeed_config["zero_optimization"]["stage"] == 3
    assert spec.deepspeed_config["bf16"] == {"enabled": True} and spec.deepspeed_config["fp16"]["enabled"] is False
    assert spec.deepspeed_config["gradient_accumulation_steps"] == 4
    files = config.launch_files(spec)
    assert json.loads(files[str(tmp_path / "run" / "deepspeed.json")]) == spec.deepspeed_config
    assert resolve(tmp_path, strategy="fsdp").deepspeed_config is None


def test_a_users_deepspeed_json_fills_what_the_command_line_leaves_out(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False}, "bf16": {"enabled": True},
                                "gradient_accumulation_steps": 2, "gradient_clipping": 1.0}))
    spec = resolve(tmp_path, deepspeed_config=str(user))
    assert (spec.strategy, spec.precision, spec.grad_accum) == ("zero2", "bf16", 2)
    assert spec.deepspeed_config["gradient_clipping"] == 1.0
    assert spec.deepspeed_config["zero_optimization"]["overlap_comm"] is False


@pytest.mark.parametrize("file, options, message", [
    ({"zero_optimization": {"stage": 3}}, {"strategy": "zero2"}, "sets zero_optimization.stage 3, but --strategy zero2"),
    ({"bf16": {"enabled": True}}, {"strategy": "zero2", "precision": "fp32"}, "sets bf16.enabled true, but --precision is fp32"),
    ({"gradient_accumulation_steps": 8}, {"strategy": "zero1", "grad_accum": 4}, "gradient_accumulation_steps 8, but --grad-accum is 4"),
    ({"optimizer": {"type": "Adam"}}, {"strategy": "zero2"}, "uses the recipe's own optimizer"),
    ({"zero_optimization": {"stage": 2}}, {"strategy": "fsdp"}, "--deepspeed-config is for the ZeRO strategies"),
])
def test_a_deepspeed_json_that_contradicts_the_command_line_is_refused(tmp_path, file, options, message):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(file))
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve(tmp_path, deepspeed_config=str(user), **options)


@pytest.mark.parametrize("options, installed, message", [
    ({"strategy": "zero2"}, (), "--strategy zero2 needs deepspeed, which is not installed here"),
    ({"launcher": "accelerate"}, (), "--launcher accelerate needs accelerate, which is not installed here"),
    ({"strategy": "zero2", "precision": "fp16"}, ("deepspeed",), "DeepSpeed cannot train in fp16 on CPU"),
    ({"grad_accum": 0}, (), "--grad-accum must be at least 1"),
    ({"activation_checkpointing": "Transformer Layer"}, (), "--activation-checkpointing takes class names"),
])
def test_bad_parallel_settings_are_refused_before_launch(tmp_path, options, installed, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve(tmp_path, installed=installed, **options)


def test_bf16_on_a_gpu_without_it_is_refused_before_launch(tmp_path):
    """The GPU is stated (this machine has none): compute capability 7.0 is a V100."""
    recipe = tmp_path / "r.py"
    recipe.write_text("")
    options = {"recipe": str(recipe), "gpus": 1, "precision": "bf16", "run_dir": str(tmp_path / "run")}
    with pytest.raises(UsageError, match=r"bf16 needs GPUs of compute capability 8.0 \(Ampere\) or newer"):
        config.resolve(options, gpus_available=1, free_port=29400, compute_capability=7.0)
    assert config.resolve(options, gpus_available=1, free_port=29400, compute_capability=9.0).precision == "bf16"


def test_accelerate_gets_a_generated_config_that_forms_one_cpu_job(tmp_path):
    spec = resolve(tmp_path, launcher="accelerate", precision="bf16")
    argv, env = accelerate.build_command(spec, cpus=2, base_env={}, python="python")
    path = str(tmp_path / "run" / "accelerate.yaml")
    assert argv[:5] == ["python", "-m", "accelerate.commands.launch", "--config_file", path]
    settings = accelerate.accelerate_config(spec)
    assert (settings["distributed_type"], settings["num_processes"], settings["use_cpu"]) == ("MULTI_GPU", 2, True)
    assert settings["mixed_precision"] == "bf16" and env["ACCELERATE_USE_CPU"] == "true"
    assert env[config.ENV_WORLD_SIZE] == "2"


def test_the_deepspeed_launcher_runs_per_node_without_ssh_from_a_generated_hostfile(tmp_path):
    spec = resolve(tmp_path, launcher="deepspeed", nodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29600,
                   name="job")
    argv, _ = deepspeed.build_command(spec, cpus=2, base_env={}, python="python")
    assert argv[argv.index("--node_rank") + 1] == "1" and "--no_ssh" in argv and "--no_local_rank" in argv
    assert deepspeed.hostfile(spec) == "node0 slots=2\nnode1 slots=2\n"


def test_dry_run_shows_each_launcher_and_its_files(tmp_path):
    for launcher, expected in (("torchrun", "torch.distributed.run"), ("accelerate", "accelerate.commands.launch"),
                               ("deepspeed", "deepspeed.launcher.runner")):
        out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--launcher", launcher,
                         "--strategy", "zero2", "--run-dir", str(tmp_path / launcher), "--dry-run")
        assert out.returncode == 0 and expected in out.stdout, out.stderr
        assert f"# {tmp_path / launcher / 'deepspeed.json'}" in out.stdout
        assert not (tmp_path / launcher).exists()


# --- activation checkpointing: in process ----------------------------------------------------------

def gradients_and_saved_bytes(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """One forward and backward of a 4-block tiny_gpt; the bytes kept for backward: those autograd
    saves outside checkpointed blocks plus the block inputs that checkpointing keeps instead."""
    from dtrain.runtime import activation_checkpointing

    torch.manual_seed(0)
    model = tiny_gpt.TinyGPT(len(tiny_gpt.VOCAB), block=64, d_model=64, layers=4)
    if checkpointing:
        activation_checkpointing.apply(model, ("TransformerEncoderLayer",))
    ids = torch.randint(len(tiny_gpt.VOCAB), (8, 65), generator=torch.Generator().manual_seed(1))
    saved: dict[tuple, int] = {}

    def pack(tensor):
        saved[(tensor.data_ptr(), tensor.shape)] = tensor.numel() * tensor.element_size()
        return tensor

    block_inputs = []
    if checkpointing:
        for block in activation_checkpointing.blocks_of(model, ("TransformerEncoderLayer",)):
            block.register_forward_pre_hook(lambda _m, args: block_inputs.append(args[0].numel() * 4))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = tiny_gpt.next_char_loss(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    names = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return names, sum(saved.values()) + sum(block_inputs)


def test_activation_checkpointing_keeps_the_gradients_and_saves_at_least_half_the_memory():
    plain, plain_bytes = gradients_and_saved_bytes(False)
    checkpointed, checkpointed_bytes = gradients_and_saved_bytes(True)
    assert max_difference(plain, checkpointed) < 1e-6
    assert checkpointed_bytes <= 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_an_unknown_class_for_activation_checkpointing_is_one_sentence(tmp_path, data_dir):
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--run-dir", str(tmp_path / "run"),
                     "--activation-checkpointing", "TransformerBlock", "--", "--data-dir", data_dir)
    assert out.returncode != 0
    assert "names TransformerBlock, but the model has no module of that class; its classes are" in out.stderr
    assert "Traceback" not in out.stderr


# --- launchers: one job of the world size asked for ------------------------------------------------

def test_accelerate_trains_as_one_job_of_world_size_2(tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, "--launcher", "accelerate", recipe=str(TEST_RECIPES / "small_epoch.py"))
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(16))  # each rank half of the batches
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert ranks[0]["params"] == ranks[1]["params"]  # gradients were averaged: one model


def test_zero_under_the_deepspeed_launcher_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce maps a /dev/shm file per rank (69 MB each here) and never removes it."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    run_dir = tmp_path / "run"
    launch(run_dir, "--launcher", "deepspeed", "--strategy", "zero2", recipe=str(TEST_RECIPES / "small_epoch.py"))
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) == before


def test_ddp_on_one_hosts_cpus_averages_gradients_through_shared_memory_exactly_as_gloo(tmp_path):
    run_dir = tmp_path / "run"
    out = launch(run_dir, recipe=str(TEST_RECIPES / "ddp_gradients.py"))
    rank0 = json.loads(out.stdout.strip().splitlines()[-1])
    assert rank0["comm_hook"] == "comm_hook"  # dtrain's shared-memory hook, not DDP's built-in all-reduce
    assert rank0["equal"] == [True] * 5
    assert not list(Path("/dev/shm").glob("dtrain-grads-*"))  # its buffer is gone with the job


def test_the_shared_memory_buffer_holds_one_ddp_bucket_and_is_refused_where_dev_shm_is_too_small():
    from dtrain.runtime.shared_memory import DDP_BUCKET_NUMEL, reserved_file, slot_numel

    assert slot_numel([320, 32, 18432, 64, 401408, 128, 1280, 10]) == 421674  # the MNIST CNN: all of it
    assert slot_numel([10**8] * 8) == DDP_BUCKET_NUMEL + 10**8  # a large model: one bucket, not 8 x 10^8
    before = set(Path("/dev/shm").iterdir())
    assert reserved_file(1 << 50) == ""  # then DDP uses gloo
    assert set(Path("/dev/shm").iterdir()) == before


def test_a_process_the_launcher_did_not_join_into_the_job_stops_at_start_up(tmp_path):
    """accelerate's known silent failure: `accelerate launch --cpu --num_processes 2` starts one
    process, which would train alone; dtrain's start-up check stops it."""
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          str(TEST_RECIPES / "small_epoch.py")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, config.ENV_WORLD_SIZE: "2", config.ENV_RUN_DIR: str(tmp_path / "run")})
    assert out.returncode != 0
    assert ("started as one of a world of 1, but dtrain launched 2 processes: the launcher did not join them into "
            "one job") in out.stderr
    assert 'small_epoch.py", line' not in out.stderr  # one sentence from the worker (accelerate adds its own trace)
    assert not list((tmp_path / "run").glob("rank*.json"))


# --- training under each launcher and strategy -----------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("options", [("--launcher", "accelerate"), ("--launcher", "deepspeed", "--strategy", "zero2"),
                                     ("--strategy", "fsdp")], ids=["accelerate-ddp", "deepspeed-zero2", "torchrun-fsdp"])
def test_mnist_reaches_97_5_percent_after_one_epoch(tmp_path, data_dir, options):
    out = launch(tmp_path / "run", *options, "--checkpoint-every", "never", "--", "--epochs", "1",
                 "--data-dir", data_dir)
    assert epoch_accuracy(out) >= 97.5


@pytest.mark.slow
@pytest.mark.parametrize("launcher, strategy", [("torchrun", "fsdp"), ("deepspeed", "zero3")])
def test_tiny_gpt_learns_under_sharding_with_activation_checkpointing(tmp_path, launcher, strategy):
    out = launch(tmp_path / "run", "--launcher", launcher, "--strategy", strategy, "--activation-checkpointing",
                 "--checkpoint-every", "never", "--", *TINY_GPT, "--limit-train-batches", "150",
                 recipe="recipes/tiny_gpt.py")
    val_loss = float(re.search(r"Val Loss: ([\d.]+)", out.stdout).group(1))
    assert val_loss < TINY_GPT_VAL_LOSS, out.stdout
    state = load_model(tmp_path / "run")
    assert state["head.weight"].shape == (len(tiny_gpt.VOCAB), 64)  # the whole model, gathered


@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_checkpoint_stop_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, data_dir, strategy):
    common = ("--strategy", strategy, "--checkpoint-every", "10")
    recipe_args = ("--", "--epochs", "1", "--limit-train-batches", "40", "--data-dir", data_dir)
    launch(tmp_path / "straight", *common, "--max-steps", "30", *recipe_args)
    launch(tmp_path / "stopped", *common, "--max-steps", "20", *recipe_args)
    out = launch(tmp_path / "stopped", *common, "--max-steps", "30", *recipe_args)
    assert "resuming from" in out.stdout and "step_0000020" in out.stdout
    assert max_difference(load_model(tmp_path / "straight"), load_model(tmp_path / "stopped")) == 0.0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2"])
def test_grad_accum_4_of_16_matches_batches_of_64(tmp_path, data_dir, strategy):
    """20 optimizer steps; SGD (see tests/recipes/mnist_sgd.py for why not AdamW), no dropout."""
    recipe = str(TEST_RECIPES / "mnist_sgd.py")
    common = ("--strategy", strategy, "--checkpoint-every", "never", "--max-steps", "20")
    recipe_args = ("--lr", "0.01", "--log-every", "10", "--data-dir", data_dir)
    launch(tmp_path / "accumulated", *common, "--grad-accum", "4", "--", "--batch-size", "16", *recipe_args,
           recipe=recipe)
    launch(tmp_path / "whole", *common, "--", "--batch-size", "64", *recipe_args, recipe=recipe)
    assert max_difference(load_model(tmp_path / "accumulated"), load_model(tmp_path / "whole")) < 1e-5
    assert [r["step"] for r in metrics(tmp_path / "accumulated") if "lr" in r] == [10, 20]


@pytest.fixture(scope="module")
def fp32_loss(tmp_path_factory, data_dir) -> float:
    return train_30_steps(tmp_path_factory.mktemp("fp32") / "run", data_dir)


@pytest.mark.parametrize("strategy, precision", [("ddp", "fp16"), ("fsdp", "fp16"), ("ddp", "bf16"),
                                                 ("fsdp", "bf16"), ("zero2", "bf16")])
def test_half_precision_tracks_fp32(tmp_path, data_dir, fp32_loss, strategy, precision):
    """30 steps only: this CPU has no fp16/bf16 units (about 10x slower than fp32)."""
    loss = train_30_steps(tmp_path / "run", data_dir, "--strategy", strategy, "--precision", precision)
    assert math.isfinite(loss) and abs(loss - fp32_loss) < 0.1 * fp32_loss, (loss, fp32_loss)


def test_dtrain_debug_runs_a_zero_strategy_as_a_world_of_one(tmp_path, data_dir):
    """DeepSpeed wants a process group even alone: `dtrain debug` gets one on an in-memory store."""
    out = run_dtrain("debug", "recipes/mnist_cnn.py", "--strategy", "zero2", "--max-steps", "5", "--run-dir",
                     str(tmp_path / "run"), "--wandb", "disabled", "--checkpoint-every", "never", "--", "--epochs", "1",
                     "--limit-train-batches", "5", "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    assert [r["step"] for r in metrics(tmp_path / "run")][-1] == 5
