"""Pure launch-side decisions: option resolution, the torchrun argv, the worker environment."""

from __future__ import annotations

import pytest

from dtrain.core import contract, hardware, spec, wandb_mode
from dtrain.errors import UsageError
from dtrain.launch.job import console_text
from dtrain.launch.launchers import local, torchrun

from conftest import ROOT

RECIPE = str(ROOT / "recipes" / "mnist_cnn.py")


def resolve(gpus_available=0, **options):
    return spec.resolve({"recipe": RECIPE, **options}, gpus_available=gpus_available, free_port=41234)


def test_cpu_processes_on_one_node_use_a_free_local_port():
    spec = resolve(cpu=True, nproc=2, name="run1")
    assert (spec.device, spec.nproc, spec.world_size) == ("cpu", 2, 2)
    assert (spec.master_addr, spec.master_port, spec.run_dir) == ("127.0.0.1", 41234, "runs/run1")


def test_default_takes_every_visible_gpu():
    spec = resolve(gpus_available=4)
    assert (spec.device, spec.nproc) == ("cuda", 4)


def test_no_gpu_and_no_flag_falls_back_to_one_cpu_process():
    spec = resolve(gpus_available=0)
    assert (spec.device, spec.nproc) == ("cpu", 1)


# The GPU counts below are passed in: this machine has no GPU, so "4 visible" cannot be real here.
@pytest.mark.parametrize("options, available, words", [
    ({"gpus": 8}, 0, "none is visible"),
    ({"gpus": 8}, 4, "more GPUs than the 4 visible"),
    ({"gpus": 0}, 4, "at least 1"),
    ({"cpu": True, "nproc": 0}, 0, "--nproc must be at least 1"),
    ({"nproc": 2}, 0, "needs --cpu"),
    ({"gpus": 2, "nproc": 2}, 4, "--nproc is for CPU processes"),
    ({"cpu": True, "gpus": 1}, 4, "contradict"),
    ({"precision": "fp8"}, 0, "unknown --precision 'fp8'; use one of fp32, bf16, fp16"),
    ({"nodes": 2, "node_rank": 2, "name": "x"}, 0, "--node-rank must be between 0 and 1"),
    ({"nodes": 2}, 0, "needs --name"),
    ({"nodes": 0}, 0, "--nodes must be at least 1"),
    ({"name": "../escape"}, 0, "may hold only"),
    ({"master_port": 70000}, 0, "between 1 and 65535"),
    ({"checkpoint_every": "0"}, 0, "--checkpoint-every '0' is not understood"),
    ({"checkpoint_every": "hourly"}, 0, "is not understood"),
    ({"keep_last": 0}, 0, "--keep-last must be at least 1"),
    ({"resume": "runs/nope/checkpoints/step_0000001"}, 0, "checkpoint runs/nope/checkpoints/step_0000001 does not exist"),
    ({"nodes": 2, "name": "x", "min_nodes": 3}, 0, "--min-nodes 3 is more than the job's 2 node(s): a job shrinks, it "
                                                  "does not grow; pass --min-nodes 2 or fewer, or more --nodes."),
    ({"nodes": 2, "name": "x", "min_nodes": 1, "launcher": "accelerate"}, 0,
     "--launcher accelerate cannot restart on fewer nodes; leave --min-nodes out, or leave --launcher out"),
])
def test_bad_options_are_refused_with_the_fix(options, available, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        resolve(gpus_available=available, **options)


@pytest.mark.parametrize("options, available, words", [
    ({"cpu": True}, 0, "this run is on CPU; run on a GPU"),
    ({}, 0, "this run is on CPU"),
    ({"gpus": 2}, 2, "this run has 2; pass --gpus 1"),
    ({"gpus": 1, "nodes": 2, "name": "x"}, 1, "this run has 2"),
    ({"gpus": 1, "strategy": "fsdp"}, 1, "--strategy fsdp wraps it in hooks that a graph cannot hold; use --strategy ddp"),
    ({"gpus": 1, "strategy": "zero2"}, 1, "--strategy zero2 wraps it in hooks"),
    ({"gpus": 1, "activation_checkpointing": "auto"}, 1, "leave out --cuda-graph or --activation-checkpointing"),
])
def test_cuda_graph_is_refused_where_a_replay_would_not_compute_the_eager_step(options, available, words):
    with pytest.raises(UsageError, match=words):
        spec.resolve({"recipe": RECIPE, "cuda_graph": True, **options}, gpus_available=available, free_port=29400,
                     is_installed=lambda package: True, compute_capability=9.0)


@pytest.mark.parametrize("options", [{}, {"precision": "bf16"}, {"precision": "fp16"}, {"grad_accum": 4},
                                     {"launcher": "torchrun"}, {"max_restarts": 2}])
def test_cuda_graph_goes_with_one_gpu_process_in_any_precision_and_accumulation(options):
    resolved = spec.resolve({"recipe": RECIPE, "gpus": 1, "cuda_graph": True, **options}, gpus_available=1,
                            free_port=29400, compute_capability=9.0)
    assert resolved.cuda_graph is True and resolved.world_size == 1


def test_missing_recipe_is_refused():
    with pytest.raises(UsageError, match="recipe nope.py does not exist"):
        spec.resolve({"recipe": "nope.py"}, gpus_available=0, free_port=1)


def test_torchrun_argv_for_two_nodes():
    two_nodes = resolve(gpus_available=8, gpus=8, nodes=2, node_rank=1, master_addr="node-a", name="big",
                        recipe_args=("--epochs", "2"), max_restarts=3, rdzv_timeout=60)
    argv, env = torchrun.build_command(two_nodes, cpus=32, base_env={}, python="python")
    assert argv == [
        "python", "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:29500", "--rdzv-id", "big",
        "--rdzv-conf", "is_host=0,join_timeout=60", "--max-restarts", "3", "--log-dir", "runs/big/logs", "--tee", "3",
        RECIPE, "--epochs", "2",
    ]
    assert env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank${rank}]: "
    assert env["DTRAIN_DEVICE"] == "cuda" and env["DTRAIN_RUN_DIR"] == "runs/big"
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["DTRAIN_NODE_RANK"] == "1" and "DTRAIN_MIN_WORLD_SIZE" not in env
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in env


def test_a_job_that_may_shrink_rendezvous_from_its_minimum_and_restarts_at_least_once_per_node_it_may_lose():
    shrinking = resolve(cpu=True, nproc=2, nodes=4, node_rank=3, master_addr="node-a", name="big", min_nodes=2)
    argv, env = torchrun.build_command(shrinking, cpus=8, base_env={}, python="python")
    assert argv[argv.index("--nnodes") + 1] == "2:4" and argv[argv.index("--max-restarts") + 1] == "2"
    assert (env["DTRAIN_WORLD_SIZE"], env["DTRAIN_MIN_WORLD_SIZE"], env["DTRAIN_NODE_RANK"]) == ("8", "4", "3")
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # each round's store address, not the first round's
    more = resolve(cpu=True, nproc=2, nodes=4, node_rank=3, master_addr="node-a", name="big", min_nodes=3,
                   max_restarts=5)
    argv, _ = torchrun.build_command(more, cpus=8, base_env={}, python="python")
    assert argv[argv.index("--max-restarts") + 1] == "5"


def test_worker_env_is_the_dtrain_contract_and_keeps_the_callers_variables():
    launch_spec = resolve(cpu=True, nproc=2, precision="bf16", seed=7, max_steps=5, name="r",
                          checkpoint_every="100,epoch", keep_last=2, async_checkpoint=True, preempt_signal="SIGUSR1",
                          max_requeues=5, timeout=60)
    env = contract.worker_env(launch_spec, cpus=2, base={"PATH": "/bin", "OMP_NUM_THREADS": "3",
                                                         "DTRAIN_KEEP_LAST": "9"})
    assert env == {
        "PATH": "/bin", "OMP_NUM_THREADS": "3", "PYTHONUNBUFFERED": "1",
        "DTRAIN_DEVICE": "cpu", "DTRAIN_PRECISION": "bf16", "DTRAIN_SEED": "7",
        "DTRAIN_RUN_DIR": "runs/r", "DTRAIN_MAX_STEPS": "5", "DTRAIN_CHECKPOINT_EVERY": "100,epoch",
        "DTRAIN_RESUME": "auto", "DTRAIN_KEEP_LAST": "2", "DTRAIN_ASYNC_CHECKPOINT": "1",
        "DTRAIN_PREEMPT_SIGNAL": "USR1", "DTRAIN_MAX_REQUEUES": "5",
        "DTRAIN_WANDB": "auto", "DTRAIN_WANDB_PROJECT": "dtrain", "DTRAIN_TIMEOUT_S": "60",
        "DTRAIN_MLFLOW_EXPERIMENT": "dtrain",
        "DTRAIN_STRATEGY": "ddp", "DTRAIN_GRAD_ACCUM": "1", "DTRAIN_WORLD_SIZE": "2", "DTRAIN_NODE_RANK": "0",
        "DTRAIN_REPLICA_GROUPS": "1", "DTRAIN_REPLICA_GROUP": "0",
        "MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "1073741824",
    }
    plain = contract.worker_env(resolve(cpu=True, name="r"), cpus=2, base={"DTRAIN_KEEP_LAST": "9"})
    assert "DTRAIN_KEEP_LAST" not in plain and "DTRAIN_ASYNC_CHECKPOINT" not in plain


def test_cpu_workers_keep_freed_memory_unless_the_user_says_otherwise():
    """glibc's thresholds for CPU workers only (a GPU job's host may need its memory back), never over the user's."""
    cpu = resolve(cpu=True, name="r")
    assert contract.worker_env(cpu, cpus=2, base={})["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
    mine = contract.worker_env(cpu, cpus=2, base={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert mine["MALLOC_MMAP_THRESHOLD_"] == "65536" and mine["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)
    gpu = contract.worker_env(resolve(gpus_available=1, name="r"), cpus=2, base={})
    assert not contract.CPU_MALLOC.keys() & gpu.keys()


@pytest.mark.parametrize("value, parsed", [("epoch", (None, True)), ("500", (500, False)), ("500,epoch", (500, True)),
                                           ("never", (None, False))])
def test_checkpoint_every_values(value, parsed):
    from dtrain.core.options import parse_checkpoint_every

    assert parse_checkpoint_every(value) == parsed


def test_profile_must_be_a_yaml_mapping(tmp_path):
    from dtrain.core import profiles

    (tmp_path / "bad.yaml").write_text("nproc: [2\n")
    (tmp_path / "list.yaml").write_text("- nproc\n")
    (tmp_path / "ok.yaml").write_text("nproc: 2\nmax-restarts: 1\n")
    with pytest.raises(UsageError, match="not valid YAML at line"):
        profiles.load(str(tmp_path / "bad.yaml"))
    with pytest.raises(UsageError, match="must be a mapping"):
        profiles.load(str(tmp_path / "list.yaml"))
    with pytest.raises(UsageError, match="does not exist"):
        profiles.load(str(tmp_path / "missing.yaml"))
    assert profiles.load(str(tmp_path / "ok.yaml")) == {"nproc": 2, "max_restarts": 1}


@pytest.mark.parametrize("value, count", [("0,1,2", 3), ("", 0), ("-1", 0), ("0,-1,2", 1), ("GPU-abc,GPU-def", 2)])
def test_cuda_visible_devices_count(value, count):
    assert hardware.visible_gpus({"CUDA_VISIBLE_DEVICES": value}) == count


@pytest.mark.parametrize("line, stderr, shown", [
    ("[rank0]: Epoch 1/1\n", False, "Epoch 1/1\n"),
    ("[rank0]: [rank0]: Epoch 1/1\n", False, "Epoch 1/1\n"),
    ("[rank0]: a warning\n", True, "a warning\n"),
    ("[rank3]: [rank3]: a warning\n", True, "[rank3]: a warning\n"),
    ("[rank3]: [rank3]: Epoch 1/1\n", False, ""),  # other ranks' stdout stays in their log files
    ("W1127 06:20:40.549000 api.py:1028] Sending process 2396 closing signal SIGTERM\n", True, None),
])
def test_console_shows_rank_0_and_other_ranks_errors_once_and_hides_torchruns_own(line, stderr, shown):
    assert console_text(line, stderr) == shown


@pytest.mark.parametrize("requested, environ, installed, netrc, expected", [
    ("auto", {"WANDB_API_KEY": "k"}, True, "", ("online", None)),
    ("auto", {}, True, "machine api.wandb.ai\n  login user\n  password k\n", ("online", None)),
    ("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}, True, "", ("disabled", None)),
    ("offline", {"WANDB_API_KEY": "k"}, True, "", ("offline", None)),
    ("disabled", {}, False, "", ("disabled", None)),
])
def test_wandb_mode_resolution(requested, environ, installed, netrc, expected):
    assert wandb_mode.resolve(requested, environ, installed, netrc) == expected


def test_wandb_auto_without_credentials_or_package_says_what_it_does_instead():
    assert wandb_mode.resolve("auto", {}, True, "")[0] == "offline"
    assert "offline" in wandb_mode.resolve("auto", {}, True, "")[1]
    assert wandb_mode.resolve("auto", {}, False, "") == (
        "disabled", "wandb is not installed, so metrics go to metrics.jsonl only (pip install wandb).")
    with pytest.raises(UsageError, match="--wandb online needs the wandb package"):
        wandb_mode.resolve("online", {}, False, "")


def test_multi_node_runs_are_one_wandb_group_named_after_the_run():
    assert resolve(gpus_available=8, gpus=8, nodes=2, name="big").wandb_group == "big"
    assert resolve(cpu=True, name="small").wandb_group is None
    assert resolve(cpu=True, name="small", wandb_group="g", tags="a, b,").tags == ("a", "b")


def test_a_spec_travels_as_json_unchanged(tmp_path):
    launch_spec = resolve(cpu=True, nproc=2, name="r", tags="a,b", recipe_args=("--lr", "a b"), max_steps=3)
    assert spec.LaunchSpec.from_json(launch_spec.to_json(), "spec.json") == launch_spec
    with pytest.raises(UsageError, match="not a launch spec that this dtrain wrote"):
        spec.LaunchSpec.from_json('{"format": "dtrain-spec-0"}', "old.json")


def test_a_multi_node_launch_advertises_and_uses_the_interface_toward_node_0():
    def route(host):
        return ("198.18.0.2", "veth1") if host == "node-a" else None

    two_nodes = spec.resolve({"recipe": RECIPE, "cpu": True, "nodes": 2, "node_rank": 1, "master_addr": "node-a",
                              "name": "big"}, gpus_available=0, free_port=1, route=route)
    assert two_nodes.network == {"address": "198.18.0.2", "interface": "veth1"}
    argv, env = torchrun.build_command(two_nodes, cpus=2, base_env={"NCCL_SOCKET_IFNAME": "ib0"}, python="python")
    assert argv[argv.index("--local-addr") + 1] == "198.18.0.2"  # not the host name, which may mean 127.0.0.1
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("veth1", "ib0")  # the user's choice stays
    one_node = resolve(cpu=True, name="small")
    argv = torchrun.build_command(one_node, 2, {}, "python")[0]
    assert one_node.network is None and argv[argv.index("--local-addr") + 1] == "127.0.0.1"  # the rendezvous's


def test_this_machine_routes_to_its_own_loopback_through_lo():
    assert hardware.route_to("127.0.0.1") == ("127.0.0.1", "lo")
    assert hardware.route_to("name.invalid") is None


@pytest.mark.parametrize("device, flags, capability, chosen", [
    ("cpu", {"avx2", "amx_bf16", "amx_tile", "avx512_bf16"}, None, "bf16"),  # Xeon with AMX
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, None, "bf16"),  # AVX-512 BF16 alone: 1.47x (bench/RESULTS.md)
    ("cpu", {"avx2", "fma", "avx512f"}, None, "fp32"),  # no bf16 units: bf16 emulated, about 10x slower
    ("cpu", set(), None, "fp32"),  # flags unknown
    ("cuda", set(), 9.0, "bf16"),  # H100, H200
    ("cuda", set(), 8.0, "bf16"),  # A100
    ("cuda", {"amx_bf16"}, 7.5, "fp32"),  # T4: the GPU computes, not the CPU
    ("cuda", set(), None, "fp32"),  # capability unknown
])
def test_precision_auto_is_bf16_only_where_the_device_computes_it_natively(device, flags, capability, chosen):
    assert spec.auto_precision(device, frozenset(flags), capability) == chosen


def test_precision_auto_is_decided_by_the_launch_and_left_to_the_node_under_slurm(tmp_path):
    amx = frozenset({"amx_bf16"})

    def resolve(cpu_flags, is_installed=spec.installed, **options):
        return spec.resolve({"recipe": RECIPE, "cpu": True, "name": "r", "precision": "auto", **options}, 0, 41234,
                            is_installed=is_installed, cpu_flags=cpu_flags)

    here = resolve(amx)
    assert here.precision == "bf16"
    assert contract.worker_env(here, cpus=2, base={})["DTRAIN_PRECISION"] == "bf16"
    submitted = resolve(None)  # `dtrain slurm submit`
    assert submitted.precision == "auto"
    assert spec.decide_precision(submitted, frozenset({"avx2", "avx512f"}), None).precision == "fp32"
    assert spec.decide_precision(submitted, amx, None).precision == "bf16"
    with pytest.raises(UsageError, match="--precision auto is decided on the node that computes, and --strategy "
                                         "zero2's DeepSpeed config needs it when the job is submitted"):
        resolve(None, is_installed=lambda package: True, strategy="zero2")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 amx_bf16 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert hardware.cpu_flags(str(cpuinfo)) == frozenset({"fpu", "sse2", "amx_bf16", "avx512_bf16"})
    assert hardware.cpu_flags(str(tmp_path / "none")) == frozenset()


@pytest.mark.parametrize("options, launcher", [
    ({"cpu": True}, "direct"),  # one process needs no launcher
    ({"cpu": True, "nproc": 2}, "local"),  # one node: dtrain's own agent, which does not import torch
    ({"gpus_available": 8}, "local"),
    ({"cpu": True, "nproc": 2, "max_restarts": 1}, "torchrun"),  # restarts are torchrun's
    ({"cpu": True, "nodes": 2, "name": "x"}, "torchrun"),  # so is a rendezvous of nodes
    ({"cpu": True, "nproc": 2, "launcher": "torchrun"}, "torchrun"),
])
def test_the_launcher_is_none_for_one_process_dtrains_agent_on_one_node_and_torchrun_beyond(options, launcher):
    options = dict(options)
    available = options.pop("gpus_available", 0)
    assert spec.resolve({"recipe": RECIPE, **options}, gpus_available=available, free_port=29400).launcher == launcher


@pytest.mark.parametrize("options, words", [
    ({"launcher": "local", "nodes": 2, "name": "x"}, "--launcher local starts the processes of one node, and this "
                                                     "job has 2; leave --launcher out."),
    ({"launcher": "local", "max_restarts": 1}, "--launcher local does not restart workers"),
    ({"launcher": "direct", "nproc": 2}, "--launcher direct runs one process on one node"),
])
def test_a_launcher_of_one_node_is_refused_beyond_it(options, words):
    with pytest.raises(UsageError, match=words):
        spec.resolve({"recipe": RECIPE, "cpu": True, **options}, gpus_available=0, free_port=29400)


def test_dtrains_agent_takes_the_rendezvous_address_and_the_log_folder():
    one_node = resolve(gpus_available=2, gpus=2, name="n", recipe_args=("--epochs", "2"))
    argv, env = local.build_command(one_node, cpus=8, base_env={}, python="python")
    assert argv == ["python", "-m", "dtrain.launch.agent", "--nproc", "2", "--master-addr", "127.0.0.1", "--master-port",
                    "41234", "--log-dir", "runs/n/logs/n_local/attempt_0", RECIPE, "--epochs", "2"]
    assert env["OMP_NUM_THREADS"] == "4"
