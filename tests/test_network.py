"""Two nodes that share no loopback: two of the network namespaces of the `namespaces` fixture (conftest), each
"node" with its own address from the 198.18.0.0/15 test range (../shared/notes/multi-node-netns.md). Every
node's `dtrain launch` finds the interface that routes to node 0 (for gloo and NCCL) and the address it
advertises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ADDRESSES, DTRAIN, ROOT, empty_namespaces, ip, metrics, namespace_pids


@pytest.fixture(autouse=True)
def nothing_left(namespaces):
    yield
    empty_namespaces(namespaces)


def start(namespaces, node: int, run_dir, *args: str, nodes: int = 2) -> subprocess.Popen:
    """`dtrain launch` node `node` of `nodes` in its namespace; `args`: launch options, then `--` and the recipe's."""
    cut = args.index("--") if "--" in args else len(args)
    return subprocess.Popen(["ip", "netns", "exec", namespaces[node][0], DTRAIN, "launch", *args[:cut], "--nodes",
                             str(nodes),
                             "--node-rank", str(node), "--master-addr", ADDRESSES[0], "--run-dir", str(run_dir),
                             "--wandb", "disabled", *args[cut:]],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "deepspeed"])
def test_two_nodes_on_a_network_train_together(namespaces, tmp_path, data_dir, launcher):
    run_dir = tmp_path / "run"
    port = str(29600 + ["torchrun", "accelerate", "deepspeed"].index(launcher))
    args = ("recipes/mnist_cnn.py", "--cpu", "--nproc", "1", "--launcher", launcher, "--name", f"net-{launcher}",
            "--master-port", port, "--timeout", "60", "--rdzv-timeout", "60", "--checkpoint-every", "never",
            "--max-steps", "20", "--", "--epochs", "1", "--log-every", "10", "--limit-eval-batches", "4", "--data-dir", data_dir)
    nodes = [start(namespaces, node, run_dir, *args) for node in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert [r["step"] for r in metrics(run_dir, "train")] == [10, 20]
    network = yaml.safe_load((run_dir / "config.yaml").read_text())["network"]
    assert network["MASTER_ADDR"] == ADDRESSES[0]
    assert network["GLOO_SOCKET_IFNAME"] in {veth for _, veth in namespaces}  # rank 0's node's veth, not lo


def test_a_node_that_never_comes_ends_the_rendezvous_in_one_sentence(namespaces, tmp_path):
    begun = time.monotonic()
    node = start(namespaces, 0, tmp_path / "run", "recipes/mnist_cnn.py", "--cpu", "--name", "alone",
                 "--master-port", "29610", "--rdzv-timeout", "10")
    stdout, stderr = node.communicate(timeout=120)
    assert node.returncode == 1 and time.monotonic() - begun < 10 + 30
    assert stderr.strip().splitlines()[-1] == (
        f"dtrain: the rendezvous at {ADDRESSES[0]}:29610 timed out after 10 s: 1 of 2 nodes came (node 0), node 1 "
        "did not; start `dtrain launch` on every node with the same --name, --nodes, --master-addr and "
        "--master-port, or give them more time with --rdzv-timeout.")
    assert "Traceback" not in stdout + stderr


def parent(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def wait_for_step(run_dir, step: int, nodes, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not ((run_dir / "metrics.jsonl").exists() and any(r["step"] >= step for r in metrics(run_dir, "train"))):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), "training did not start"
        time.sleep(0.2)


def test_a_node_cut_off_the_network_and_the_node_it_left_both_end_naming_each_other(namespaces, tmp_path, data_dir):
    """Node 1's link goes down mid-epoch: node 0 names node 1; node 1, whose launcher's agent would wait for node 0's
    store for many minutes, names the host it lost. Both end within the collective time-out + 60 s, nothing left."""
    run_dir = tmp_path / "run"
    args = ("recipes/mnist_cnn.py", "--cpu", "--nproc", "1", "--name", "drop", "--master-port", "29611", "--timeout",
            "30", "--checkpoint-every", "never", "--", "--epochs", "1", "--log-every", "10", "--data-dir", data_dir)
    nodes = [start(namespaces, node, run_dir, *args) for node in (0, 1)]
    wait_for_step(run_dir, 20, nodes)
    ip("-n", namespaces[1][0], "link", "set", namespaces[1][1], "down")
    dropped = time.monotonic()
    outputs = [node.communicate(timeout=150) for node in nodes]
    assert time.monotonic() - dropped < 30 + 60 and [node.returncode for node in nodes] == [1, 1], outputs
    first = [next(line for line in stderr.splitlines() if line.startswith("dtrain: ")) for _, stderr in outputs]
    assert first[0].startswith(f"dtrain: node 1 ({ADDRESSES[1]}) did not answer on the network when the collective "
                               "timed out: it dropped off"), outputs[0][1]
    assert outputs[1][1].splitlines()[-1] == (
        f"dtrain: node 1 lost the rendezvous host {ADDRESSES[0]} (node 0): it stopped answering on the network while "
        "this node waited for it, so this node stopped its ranks; the job goes on only with node 0 back.")
    assert "Traceback" not in outputs[0][1] + outputs[1][1]
    assert [namespace_pids(name) for name, _ in namespaces[:2]] == [[], []]  # no dtrain, torchrun or worker left


def test_a_node_whose_workers_die_restarts_with_the_other_and_resumes(namespaces, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = ("recipes/mnist_cnn.py", "--cpu", "--nproc", "1", "--name", "restart", "--master-port", "29612",
            "--max-restarts", "1", "--checkpoint-every", "10", "--timeout", "60", "--rdzv-timeout", "60",
            "--max-steps", "60", "--",
            "--epochs", "1", "--log-every", "10", "--limit-eval-batches", "4", "--data-dir", data_dir)
    nodes = [start(namespaces, node, run_dir, *args) for node in (0, 1)]
    wait_for_step(run_dir, 20, nodes)
    workers = [pid for pid in namespace_pids(namespaces[1][0]) if b"torch.distributed.run" in cmdline(parent(pid))]
    assert len(workers) == 1, "node 1's one worker is running"
    os.kill(workers[0], 9)
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "resuming from" in outputs[0][0] + outputs[1][0]
    assert [r["step"] for r in metrics(run_dir, "train")][-1] == 60
    restart = metrics(run_dir, "restart")  # the same world again, no node lost
    assert len(restart) == 1 and (restart[0]["world_size"], restart[0]["previous_world_size"]) == (2, 2)
    assert "lost; restarting" not in outputs[0][0]


def elastic_args(port: int, data_dir: str) -> tuple[str, ...]:
    return ("recipes/mnist_cnn.py", "--cpu", "--nproc", "1", "--name", "shrink", "--master-port", str(port),
            "--min-nodes", "2", "--checkpoint-every", "10", "--timeout", "60", "--rdzv-timeout", "60",
            "--max-steps", "50", "--", "--epochs", "1", "--log-every", "10", "--limit-eval-batches", "2",
            "--data-dir", data_dir)


def wait_for_checkpoint(run_dir, step: int, nodes, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not (run_dir / "checkpoints" / f"step_{step:07d}" / "COMMITTED").exists():
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes), "no checkpoint came"
        time.sleep(0.05)


def kill_node(namespace: str) -> None:
    for pid in namespace_pids(namespace):
        os.kill(pid, 9)


def test_a_lost_node_shrinks_the_job_which_resumes_on_the_others_as_a_fresh_resume_would(namespaces, tmp_path,
                                                                                         data_dir):
    """--min-nodes 2 of 3: node 2 (dtrain, torchrun and its worker) is killed after a checkpoint; nodes 0 and 1 go
    on without a command typed, on 2 nodes from that checkpoint, and train as a fresh 2-node resume of it does."""
    run_dir = tmp_path / "run"
    nodes = [start(namespaces, node, run_dir, *elastic_args(29613, data_dir), nodes=3) for node in range(3)]
    wait_for_checkpoint(run_dir, 20, nodes)
    kill_node(namespaces[2][0])
    killed = time.time()
    outputs = [node.communicate(timeout=300) for node in nodes[:2]]
    assert [node.returncode for node in nodes[:2]] == [0, 0], outputs
    resumed = int(re.search(r"dtrain: node 2 lost; restarting on 2 nodes from step (\d+) \(each rank's batch kept",
                            outputs[0][0])[1])
    restart = metrics(run_dir, "restart")
    assert len(restart) == 1 and restart[0]["step"] == resumed + 1
    assert (restart[0]["world_size"], restart[0]["previous_world_size"]) == (2, 3)
    assert 0 < restart[0]["heal_s"] < restart[0]["time"] - killed + 5
    print(f"heal: {restart[0]['heal_s']:.1f} s from the first failure to the first step on 2 nodes")

    reference = tmp_path / "reference"
    (reference / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_dir / "checkpoints" / f"step_{resumed:07d}", reference / "checkpoints" / f"step_{resumed:07d}")
    args = elastic_args(29614, data_dir)
    cut = args.index("--min-nodes")
    fresh = [start(namespaces, node, reference, *args[:cut], *args[cut + 2:]) for node in range(2)]
    outputs = [node.communicate(timeout=300) for node in fresh]
    assert [node.returncode for node in fresh] == [0, 0], outputs
    after = {r["step"]: r["train/loss"] for r in metrics(run_dir, "train") if r["step"] > resumed + 10}
    assert after and after == {r["step"]: r["train/loss"] for r in metrics(reference, "train") if r["step"] in after}


def test_a_shrink_needs_node_0_and_every_other_node_ends_saying_so(namespaces, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    nodes = [start(namespaces, node, run_dir, *elastic_args(29615, data_dir), nodes=3) for node in range(3)]
    wait_for_checkpoint(run_dir, 10, nodes)
    kill_node(namespaces[0][0])
    killed = time.monotonic()
    outputs = [node.communicate(timeout=300) for node in nodes[1:]]
    assert time.monotonic() - killed < 60 + 60 and [node.returncode for node in nodes[1:]] == [1, 1], outputs
    for node, (_, stderr) in zip((1, 2), outputs):
        assert stderr.splitlines()[-1] == (
            f"dtrain: node {node} lost the rendezvous host {ADDRESSES[0]} (node 0): its rendezvous store went away, so "
            "this node stopped its ranks; the job goes on only with node 0 back (a shrink, --min-nodes, needs node 0 "
            "alive: it holds the rendezvous).")
    assert [namespace_pids(name) for name, _ in namespaces] == [[], [], []]


def test_a_replica_group_killed_mid_run_heals_from_its_peer_which_never_stopped(namespaces, tmp_path, data_dir):
    """Two replica groups (torchft) on two "nodes", joined by a lighthouse on node 0. Group 1's worker is SIGKILLed at
    step 20 and its torchrun starts it again: group 0 keeps stepping meanwhile, group 1 takes group 0's model,
    optimizer and step over the network (there is no checkpoint to read), and after that both hold the same weights,
    bit for bit."""
    lighthouse = f"{ADDRESSES[0]}:29616"
    beacon = subprocess.Popen(["ip", "netns", "exec", namespaces[0][0], str(Path(DTRAIN).parent / "torchft_lighthouse"),
                               "--min_replicas", "1", "--quorum_tick_ms", "100", "--join_timeout_ms", "1000",
                               "--heartbeat_timeout_ms", "1000", "--bind", lighthouse],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = [tmp_path / f"group{group}" for group in (0, 1)]
    groups = [subprocess.Popen(
        ["ip", "netns", "exec", namespaces[group][0], DTRAIN, "launch", "recipes/mnist_cnn.py", "--cpu",
         "--replica-groups", "2", "--replica-group", str(group), "--lighthouse", f"http://{lighthouse}",
         "--max-restarts", "1", "--max-steps", "150", "--checkpoint-every", "never", "--run-dir", str(runs[group]),
         "--wandb", "disabled", "--", "--epochs", "1", "--log-every", "1", "--limit-eval-batches", "2",
         "--data-dir", data_dir], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for group in (0, 1)]
    try:
        wait_for_step(runs[1], 20, groups)
        workers = [pid for pid in namespace_pids(namespaces[1][0]) if b"torch.distributed.run" in cmdline(parent(pid))]
        assert len(workers) == 1, "group 1's one worker is running"
        os.kill(workers[0], 9)
        killed = time.time()
        outputs = [group.communicate(timeout=300) for group in groups]
    finally:
        beacon.terminate()
        beacon.wait(timeout=30)
    assert [group.returncode for group in groups] == [0, 0], outputs

    [restart], heals = metrics(runs[1], "restart"), metrics(runs[1], "heal")
    heal = heals[-1]  # the first is group 1 joining group 0 at the start
    assert "previous_world_size" not in restart and not (runs[1] / "checkpoints").exists()  # no checkpoint read
    assert heal["previous_step"] == 0 and heal["step"] > 21 and heal["participants"] == 1
    survivor = [r for r in metrics(runs[0], "train") if r["time"] >= killed - 1]
    stepped_alone = [r["step"] for r in survivor if killed < r["time"] < heal["time"]]
    assert len(stepped_alone) >= 5 and heal["step"] - 1 in stepped_alone, stepped_alone
    first = stepped_alone[0]
    assert stepped_alone == list(range(first, first + len(stepped_alone))) and 20 <= first <= 25, stepped_alone
    for dropped in re.findall(r"dtrain: replica group 0 dropped step (\d+): ", outputs[0][0]):  # a kill mid-exchange
        assert int(dropped) in stepped_alone  # the step is taken again
    longest_stop = max(b["time"] - a["time"] for a, b in zip(survivor, survivor[1:]))
    assert longest_stop < heal["time"] - killed
    assert f"dtrain: replica group 1 took a live peer's state at step {heal['step'] - 1} in" in outputs[1][0]
    losses = [{r["step"]: r["train/loss"] for r in metrics(run, "train") if r["step"] > heal["step"]} for run in runs]
    assert losses[0].keys() == losses[1].keys() and losses[0] != losses[1]  # one model, a shard of the data each
    weights = [torch_load(run / "model.pth") for run in runs]
    assert weights[0].keys() == weights[1].keys() and all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    print(f"group 1 killed after step 20: group 0 stepped {len(stepped_alone)} steps alone, its longest stop "
          f"{longest_stop:.2f} s; group 1 stepped again {heal['time'] - killed:.2f} s after the kill, "
          f"peer_heal_s {heal['peer_heal_s']} s")


def torch_load(path):
    import torch

    return torch.load(path, weights_only=True)
