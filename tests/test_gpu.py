"""CUDA paths: NCCL, bf16, fp16 with a GradScaler, activation checkpointing's memory on the GPU, --cuda-graph.

Marked `gpu`; they need a CUDA GPU and are skipped without one (this project's CI has none).
`bench/gpu_check.sh` runs them on a GPU machine and records the outcome in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.distributed as dist

from dtrain.core.metrics import EPOCH

from conftest import ROOT, TEST_RECIPES, launch, metrics, train_steps

sys.path.insert(0, str(ROOT / "recipes"))
import tiny_gpt

ONE_GPU = ("--gpus", "1")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def probe(tmp_path, gpus: int) -> list[dict]:
    launch(tmp_path / "run", recipe=str(TEST_RECIPES / "gpu_probe.py"), devices=("--gpus", str(gpus)))
    return [json.loads(line) for log in sorted((tmp_path / "run").glob("logs/*/attempt_0/*/stdout.log"))
            for line in log.read_text().splitlines() if line.startswith("{")]


def test_every_gpu_gets_a_rank_of_its_own(tmp_path):
    gpus = torch.cuda.device_count()
    rows = probe(tmp_path, gpus)
    assert sorted(r["rank"] for r in rows) == list(range(gpus))
    assert sorted(r["device"] for r in rows) == [f"cuda:{i}" for i in range(gpus)]
    # A world of one trains without a process group (DDP would only add copies).
    assert {r["backend"] for r in rows} == ({"nccl"} if gpus > 1 else {None})


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="an NCCL reduction between ranks needs 2 GPUs (NCCL refuses two ranks on one GPU)")
def test_two_ranks_reduce_over_nccl(tmp_path):
    rows = probe(tmp_path, 2)
    assert [r["backend"] for r in rows] == ["nccl", "nccl"]
    assert [r["sum"] for r in rows] == [3.0, 3.0]  # rank 0 sent 1, rank 1 sent 2


def test_a_world_of_one_gets_the_nccl_group_deepspeed_needs():
    """What it shows: NCCL initialises on this GPU as the group dtrain gives a ZeRO strategy alone.
    What it cannot: a reduction with one rank is the identity (test_two_ranks_reduce_over_nccl)."""
    from dtrain.core.contract import read_env
    from dtrain.runtime import dist as dist_utils

    env = read_env({"DTRAIN_STRATEGY": "zero2", "DTRAIN_DEVICE": "cuda"})
    device = dist_utils.pick_device(env)
    dist_utils.init_process_group(env, device)
    try:
        assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_the_gpu_tracks_fp32(tmp_path, data_dir, precision):
    fp32 = train_steps(tmp_path / "fp32", data_dir, devices=ONE_GPU)
    half = train_steps(tmp_path / precision, data_dir, "--precision", precision, devices=ONE_GPU)
    assert math.isfinite(half) and abs(half - fp32) < 0.1 * fp32, (half, fp32)


def test_fp16_skips_a_step_whose_scaled_gradients_overflow_and_lowers_the_scale():
    """What GradScaler is for: an fp16 overflow must not reach the weights (fused AdamW, as the recipe)."""
    from dtrain.runtime.precision import Precision

    precision = Precision("fp16", torch.device("cuda"))
    model = torch.nn.Linear(8, 1).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    scale = precision.scaler.get_scale()
    with precision.autocast():
        out = model(torch.randn(4, 8, device="cuda"))
    assert out.dtype == torch.float16
    before = model.weight.detach().clone()
    precision.backward(out.float().mean() * float("inf"))
    precision.step(optimizer)
    assert torch.equal(before, model.weight) and precision.scaler.get_scale() < scale
    optimizer.zero_grad()
    with precision.autocast():
        loss = model(torch.randn(4, 8, device="cuda")).float().pow(2).mean()
    precision.backward(loss)
    precision.step(optimizer)
    assert not torch.equal(before, model.weight)


def peak_training_memory(checkpointing: bool) -> int:
    """Peak CUDA memory of one forward and backward of an 8-block tiny_gpt, above its parameters."""
    from dtrain.runtime import activation_checkpointing

    torch.manual_seed(0)
    model = tiny_gpt.TinyGPT(len(tiny_gpt.VOCAB), block=256, d_model=256, layers=8).cuda()
    if checkpointing:
        activation_checkpointing.apply(model, ("TransformerEncoderLayer",))
    ids = torch.randint(len(tiny_gpt.VOCAB), (32, 257), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    tiny_gpt.next_char_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


def test_activation_checkpointing_at_least_halves_peak_cuda_memory():
    plain, checkpointed = peak_training_memory(False), peak_training_memory(True)
    print(f"peak CUDA memory above the parameters: {plain / 2**20:.1f} MiB plain, "
          f"{checkpointed / 2**20:.1f} MiB with activation checkpointing")
    assert checkpointed <= 0.5 * plain, (checkpointed, plain)


def _train_cnn(graphed: bool, accumulate: int = 1, precision: str = "fp32") -> tuple[list[float], list[torch.Tensor]]:
    """13 optimizer windows of the MNIST CNN (no dropout, deterministic kernels) on fixed random batches, the
    last one short; AdamW under OneCycle, stepped as `ctx.step()` does. The losses and the final parameters."""
    from torch.nn import functional

    from dtrain.runtime.cuda_graph import GraphedForward

    from mnist_cnn import MNISTCNN

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.manual_seed(0)
    model = MNISTCNN(dropout=0.0).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=100)
    forward = GraphedForward(model) if graphed else None
    generator = torch.Generator(device="cuda").manual_seed(1)
    sizes = [64] * (13 * accumulate - 1) + [32]
    batches = [(torch.randn(n, 1, 28, 28, device="cuda", generator=generator),
                torch.randint(0, 10, (n,), device="cuda", generator=generator)) for n in sizes]
    dtype = {"bf16": torch.bfloat16}.get(precision)
    losses = []
    for index, (images, labels) in enumerate(batches):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None, cache_enabled=not graphed):
            loss = functional.cross_entropy(model(images), labels)
        (loss / accumulate).backward()
        if (index + 1) % accumulate == 0 or index == len(batches) - 1:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        losses.append(loss.item())
    if forward is not None:
        assert forward.shapes is not None and forward.shapes[0][0] == (64, 1, 28, 28)  # recorded, at batch 64
    return losses, [p.detach().float() for p in model.parameters()]


@pytest.mark.parametrize("accumulate, precision, tolerance", [(1, "fp32", 1e-4), (2, "fp32", 1e-4), (1, "bf16", 2e-2)])
def test_a_graphed_forward_and_backward_train_as_the_eager_ones(accumulate, precision, tolerance):
    """The same losses and parameters with --cuda-graph's replays as without, under a schedule that changes the
    learning rate every step, with gradients accumulated over micro-batches (pytorch/pytorch#181723: a replay
    must not overwrite the sum), and for the short last batch (run eagerly)."""
    eager_losses, eager_params = _train_cnn(False, accumulate, precision)
    graphed_losses, graphed_params = _train_cnn(True, accumulate, precision)
    assert graphed_losses == pytest.approx(eager_losses, rel=tolerance, abs=tolerance)
    for eager, graphed in zip(eager_params, graphed_params):
        assert torch.allclose(eager, graphed, rtol=tolerance, atol=tolerance)


def test_the_mnist_recipe_trains_with_cuda_graph(tmp_path, data_dir):
    run = tmp_path / "run"
    launch(run, "--cuda-graph", "--max-steps", "300", "--checkpoint-every", "never", "--", "--epochs", "1",
           "--data-dir", data_dir, devices=ONE_GPU)
    text = (run / "config.yaml").read_text()
    assert "cuda_graph: true" in text
    epoch = metrics(run, EPOCH)[-1]
    assert epoch["eval/accuracy"] > 0.95, epoch
