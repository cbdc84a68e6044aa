"""The worker side in one process: data sharding, the fast data path, precision."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from dtrain.runtime import setup
from dtrain.runtime.data import make_loader, shard_indices

from conftest import ROOT

sys.path.insert(0, str(ROOT / "recipes"))
from mnist_cnn import TRANSFORM, onecycle_steps, to_tensors


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_training_shards_follow_distributed_sampler_order(n, world):
    data = list(range(n))
    for rank in range(world):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(5)
        assert shard_indices(n, rank, world, shuffle=True, seed=3, epoch=5, pad=True).tolist() == list(sampler)


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (7, 3), (2, 4)])
def test_evaluation_shards_cover_every_sample_exactly_once(n, world):
    seen = [i for rank in range(world) for i in shard_indices(n, rank, world, shuffle=False, seed=0, epoch=0,
                                                              pad=False).tolist()]
    assert sorted(seen) == list(range(n))


def test_in_memory_and_dataloader_paths_give_the_same_batches():
    x, y = torch.randn(103, 4), torch.arange(103)

    class Plain(torch.utils.data.Dataset):  # not a TensorDataset: takes the DataLoader path
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], y[i]

    kwargs = dict(rank=1, world_size=2, device=torch.device("cpu"), shuffle=True, seed=1, train=True)
    fast, slow = make_loader(TensorDataset(x, y), 8, **kwargs), make_loader(Plain(), 8, **kwargs)
    for epoch in (0, 1):
        fast.set_epoch(epoch)
        slow.set_epoch(epoch)
        pairs = list(zip(fast, slow, strict=True))
        assert len(pairs) == len(fast) == 7
        for (fx, fy), (sx, sy) in pairs:
            assert torch.equal(fx, sx) and torch.equal(fy, sy)


def test_mnist_tensors_equal_the_per_sample_transform(data_dir):
    from torchvision import datasets
    train = datasets.MNIST(data_dir, train=True)
    images, labels = to_tensors(train).tensors
    for i in (0, 1, 777, 59999):
        image, label = train[i]
        assert torch.equal(images[i], TRANSFORM(image)) and labels[i].item() == label


def _train_steps(monkeypatch, tmp_path, precision: str, steps: int = 30) -> tuple[list[float], object]:
    monkeypatch.setenv("DTRAIN_PRECISION", precision)
    monkeypatch.setenv("DTRAIN_DEVICE", "cpu")
    monkeypatch.setenv("DTRAIN_RUN_DIR", str(tmp_path / precision))
    ctx = setup()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=generator)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 3))
    model, optimizer = ctx.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    losses = []
    loader = ctx.loader(TensorDataset(x, y), 64)
    for epoch in range(steps // len(loader) + 1):
        loader.set_epoch(epoch)
        for xb, yb in loader:
            if len(losses) == steps:
                break
            with ctx.autocast():
                loss = nn.functional.cross_entropy(model(xb), yb)
            ctx.backward(loss)
            ctx.clip_grad_norm(1.0)
            ctx.step()
            losses.append(loss.item())
    ctx.close()
    return losses, ctx.precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_tracks_fp32_on_a_few_dozen_steps(monkeypatch, tmp_path, precision):
    reference, _ = _train_steps(monkeypatch, tmp_path, "fp32")
    losses, used = _train_steps(monkeypatch, tmp_path, precision)
    assert (used.scaler is not None) == (precision == "fp16")
    assert losses[-1] < 0.6 * losses[0], "training must make progress"
    assert abs(sum(losses[-5:]) / 5 - sum(reference[-5:]) / 5) < 0.05


@pytest.mark.parametrize("environ, says", [
    ({}, "not in a cluster job, so run the same command again to resume"),
    ({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3", "DTRAIN_MAX_REQUEUES": "3"},
     "slurm job 7 has been requeued 3 times, the limit (--max-requeues 3), so it is not requeued"),
])
def test_preemption_without_a_requeue_says_why(environ, says, capsys):
    """The two cases in which rank 0 must not run `scontrol requeue` (so none is called here)."""
    from dtrain import engines
    from dtrain.core.contract import read_env
    from dtrain.runtime.preemption import Preemption

    environ = {"DTRAIN_PREEMPT_SIGNAL": "USR1", **environ}
    Preemption(read_env(environ, engines.job(environ)), torch.device("cpu")).stop_and_requeue(40)
    assert capsys.readouterr().out == f"dtrain: stopped at step 40 on SIGUSR1 with a checkpoint; {says}.\n"


def test_cuda_graph_leaves_evaluation_and_the_first_call_eager_and_refuses_keyword_calls():
    """What runs without a GPU: eval-mode calls and the first training call (its FLOPs are counted) go to the
    module's own forward; a call a graph cannot record (keyword arguments) is refused in one sentence.
    The recording and replays are tests/test_gpu.py's."""
    from dtrain.errors import UsageError
    from dtrain.runtime.cuda_graph import GraphedForward

    model = nn.Linear(3, 2)
    forward = GraphedForward(model)
    inputs = torch.ones(4, 3)
    expected = inputs @ model.weight.T + model.bias
    model.eval()
    assert torch.allclose(model(inputs), expected) and forward.calls == 0
    model.train()
    assert torch.allclose(model(inputs), expected) and forward.calls == 1 and forward.graphed is None
    with pytest.raises(UsageError, match=r"called with \(input=\); call it with tensors as positional arguments"):
        model(input=inputs)
    compiled = nn.Linear(3, 2)
    compiled.compile()  # lazily: nothing is compiled before a call
    with pytest.raises(UsageError, match="this model is compiled"):
        GraphedForward(compiled)


def test_config_yaml_says_beside_each_launch_option_where_it_was_set():
    import yaml

    from dtrain.runtime.logging import config_text

    config = {"recipe": "r.py", "launch": {"timeout": 30, "tags": ["a", "b"], "seed": 0, "wandb_entity": "x" * 200,
                                           "mlflow": "http://h:1/a b: c"}, "seed": 0, "config": {"timeout": 1}}
    sources = {"timeout": "DTRAIN_TIMEOUT_S", "tags": "profile p.yaml", "wandb_entity": "the command line",
               "mlflow": "DTRAIN_MLFLOW"}
    text = config_text(config, sources)
    assert yaml.safe_load(text) == config
    assert "  timeout: 30  # from DTRAIN_TIMEOUT_S\n" in text and "  tags:  # from profile p.yaml\n" in text
    assert f"  wandb_entity: {'x' * 200}  # from the command line\n" in text  # not folded onto a second line
    assert "\nseed: 0\n" in text and "  seed: 0\n" in text and "\n  timeout: 1\n" in text  # only the launch section's


@pytest.mark.parametrize("grad_accum, launched, world, kept", [
    (1, 4, 2, 2),   # 4 ranks to 2: twice the micro-batches per step, the global batch kept
    (3, 8, 2, 12),
    (2, 3, 2, 2),   # 3 to 2 does not divide: each rank's batch kept, the global batch shrinks
    (2, 4, 4, 2),   # no shrink
    (2, None, 1, 2),  # not under dtrain launch
])
def test_a_shrink_keeps_the_global_batch_where_the_world_divides_it(grad_accum, launched, world, kept):
    from dtrain.runtime.dist import shrunk_accumulation

    assert shrunk_accumulation(grad_accum, launched, world) == kept


def test_the_lost_nodes_are_those_of_the_launched_world_no_rank_runs_on():
    from dtrain.runtime.dist import lost_nodes

    assert lost_nodes([0, 1], launched=3, world_size=2) == [2]
    assert lost_nodes([0, 3], launched=8, world_size=4) == [1, 2]  # 2 processes per node
    assert lost_nodes([0, 1, 2], launched=3, world_size=3) == []


@pytest.mark.parametrize("change, says", [
    ({"world_size": 2}, "--replica-groups runs one process per replica group, and this group has 2; start each group "
                        "with one process (--nproc 1 or --gpus 1, one node), or leave --replica-groups out."),
    ({"strategy": "fsdp"}, "--replica-groups averages gradients between groups like DDP, not --strategy fsdp; pass "
                           "--strategy ddp, or leave --replica-groups out."),
    ({"grad_accum": 4}, "--replica-groups averages every micro-batch's gradients between groups; leave --grad-accum "
                        "out, or --replica-groups."),
    ({"replica_group": 2}, "--replica-group must be between 0 and 1 for --replica-groups 2, got 2."),
])
def test_replica_groups_say_what_they_need_in_one_sentence(change, says):
    from dtrain.core.contract import read_env
    from dtrain.errors import UsageError
    from dtrain.runtime import replicas

    env = dataclasses.replace(read_env({"DTRAIN_REPLICA_GROUPS": "2", "DTRAIN_REPLICA_GROUP": "1"}), **change)
    with pytest.raises(UsageError) as error:
        replicas.check(env)
    assert str(error.value) == says


@pytest.mark.parametrize("missing, says", [
    ("torchft", "--replica-groups needs torchft, which is not installed here; pip install 'dtrain[ft]', or leave "
                "--replica-groups out."),
    ("lighthouse", "--replica-groups needs torchft's lighthouse, which joins the groups; start one "
                   "(`torchft_lighthouse --min_replicas 1`) and pass --lighthouse http://HOST:29510."),
])
def test_replica_groups_without_torchft_or_a_lighthouse_stop_before_anything_starts(monkeypatch, missing, says):
    from dtrain.core.contract import read_env
    from dtrain.errors import UsageError
    from dtrain.runtime import replicas

    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    if missing == "torchft":
        monkeypatch.setitem(sys.modules, "torchft", None)  # what an import finds where the package is not installed
    env = read_env({"DTRAIN_REPLICA_GROUPS": "2", "DTRAIN_REPLICA_GROUP": "1"})
    with pytest.raises(UsageError) as error:
        replicas.Replicas(env, torch.device("cpu"), dict, lambda state: None)
    assert str(error.value) == says


def test_a_lighthouse_that_does_not_answer_is_one_sentence(monkeypatch):
    from dtrain.core.contract import read_env
    from dtrain.core.hardware import free_port
    from dtrain.errors import UsageError
    from dtrain.runtime import replicas

    monkeypatch.setattr(replicas, "LIGHTHOUSE_WAIT_S", 1)
    for variable in ("RUST_LOG", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # what Replicas sets in its process:
        monkeypatch.setenv(variable, "")                                     # undone after the test, for the next
        monkeypatch.delenv(variable)
    nobody = f"http://127.0.0.1:{free_port()}"
    env = read_env({"DTRAIN_REPLICA_GROUPS": "2", "DTRAIN_LIGHTHOUSE": nobody})
    with pytest.raises(UsageError) as error:
        replicas.Replicas(env, torch.device("cpu"), dict, lambda state: None)
    assert str(error.value) == (f"--replica-groups could not reach the lighthouse {nobody} within 1 s; start it where "
                                "every group reaches it (`torchft_lighthouse --min_replicas 1 --bind HOST:PORT`), or "
                                "fix --lighthouse.")


def test_the_mnist_recipes_onecycle_spans_the_runs_steps_or_max_steps_if_fewer():
    assert onecycle_steps(epochs=2, batches=10, grad_accum=3, max_steps=None) == 8  # ceil(10 / 3) per epoch
    assert onecycle_steps(epochs=2, batches=235, grad_accum=1, max_steps=352) == 352
    assert onecycle_steps(epochs=2, batches=235, grad_accum=1, max_steps=1000) == 470
