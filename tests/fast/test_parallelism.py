"""Strategies, launchers, the DeepSpeed config and activation checkpointing, decided in-process:
what each spec holds, what each launcher renders, and what checkpointing a block saves."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from dtrain.core import contract
from dtrain.core.spec import launch_files
from dtrain.core.spec import resolve as resolve_spec
from dtrain.errors import UsageError
from dtrain.launch.launchers import accelerate, deepspeed

from conftest import ROOT, gradients_and_saved_bytes, run_dtrain

sys.path.insert(0, str(ROOT / "recipes"))
import tiny_gpt


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def resolve(tmp_path: Path, installed=("deepspeed", "accelerate"), **options):
    recipe = tmp_path / "r.py"
    recipe.write_text("")
    return resolve_spec({"recipe": str(recipe), "cpu": True, "nproc": 2, "run_dir": str(tmp_path / "run"),
                           **options}, gpus_available=0, free_port=29400, is_installed=lambda p: p in installed)


def test_zero_strategies_take_their_stage_and_dtrains_settings_into_the_deepspeed_config(tmp_path):
    spec = resolve(tmp_path, strategy="zero3", precision="bf16", grad_accum=4)
    assert spec.deepspeed_config["zero_optimization"]["stage"] == 3
    assert spec.deepspeed_config["bf16"] == {"enabled": True} and spec.deepspeed_config["fp16"]["enabled"] is False
    assert spec.deepspeed_config["gradient_accumulation_steps"] == 4
    files = launch_files(spec)
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
    ({"strategy": "zero2", "precision": "fp16"}, ("deepspeed",), "--strategy zero2 cannot train in fp16 on CPU; use --precision fp32 or bf16, or --strategy ddp or fsdp for fp16"),
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
        resolve_spec(options, gpus_available=1, free_port=29400, compute_capability=7.0)
    assert resolve_spec(options, gpus_available=1, free_port=29400, compute_capability=9.0).precision == "bf16"


def test_accelerate_gets_a_generated_config_that_forms_one_cpu_job(tmp_path):
    spec = resolve(tmp_path, launcher="accelerate", precision="bf16")
    argv, env = accelerate.build_command(spec, cpus=2, base_env={}, python="python")
    path = str(tmp_path / "run" / "accelerate.yaml")
    assert argv[:5] == ["python", "-m", "accelerate.commands.launch", "--config_file", path]
    settings = accelerate.accelerate_config(spec)
    assert (settings["distributed_type"], settings["num_processes"], settings["use_cpu"]) == ("MULTI_GPU", 2, True)
    assert settings["mixed_precision"] == "bf16" and env["ACCELERATE_USE_CPU"] == "true"
    assert env[contract.WORLD_SIZE] == "2"


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

def test_activation_checkpointing_keeps_the_gradients_and_saves_at_least_half_the_memory():
    ids = torch.randint(len(tiny_gpt.VOCAB), (8, 65), generator=torch.Generator().manual_seed(1))

    def model():
        return tiny_gpt.TinyGPT(len(tiny_gpt.VOCAB), block=64, d_model=64, layers=4)

    def loss(module):
        return tiny_gpt.next_char_loss(module(ids[:, :-1]), ids[:, 1:])

    plain, plain_bytes = gradients_and_saved_bytes(model, loss, ())
    checkpointed, checkpointed_bytes = gradients_and_saved_bytes(model, loss, ("TransformerEncoderLayer",))
    assert max_difference(plain, checkpointed) < 1e-6
    assert checkpointed_bytes <= 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)


def test_the_shared_memory_buffer_holds_one_ddp_bucket_and_is_refused_where_dev_shm_is_too_small():
    from dtrain.runtime.shared_memory import DDP_BUCKET_NUMEL, reserved_file, slot_numel

    assert slot_numel([320, 32, 18432, 64, 401408, 128, 1280, 10]) == 421674  # the MNIST CNN: all of it
    assert slot_numel([10**8] * 8) == DDP_BUCKET_NUMEL + 10**8  # a large model: one bucket, not 8 x 10^8
    before = set(Path("/dev/shm").iterdir())
    assert reserved_file(1 << 50) == ""  # then DDP uses gloo
    assert set(Path("/dev/shm").iterdir()) == before



def test_a_rank_waiting_in_the_shared_memory_all_reduce_fails_at_once_when_a_rank_it_waits_for_has_ended():
    import os
    import subprocess

    from dtrain.runtime.dist import _peer_vanished
    from dtrain.runtime.shared_memory import HEADER, SharedMemoryAllReduce, process_start

    ended = subprocess.Popen(["true"])
    ended.wait()
    assert process_start(os.getpid()) is not None and process_start(ended.pid) is None
    shared = SharedMemoryAllReduce(torch.zeros(HEADER * 2 + 2 * 2 * 4), rank=0, world_size=2, numel=4, timeout_s=60)
    shared.pids[:] = torch.tensor([os.getpid(), ended.pid])
    shared.starts[:] = torch.tensor([process_start(os.getpid()), process_start(os.getpid())])
    shared.watching = True
    with pytest.raises(RuntimeError) as failure:
        shared.average(torch.ones(4))  # rank 1 never publishes: without the watch, a 60 s wait
    assert "rank 1 ended while the others waited for it" in str(failure.value) and _peer_vanished(failure.value)
    shared.pids[1] = os.getpid()
    assert shared.gone() == []  # a live rank that is behind is waited for
