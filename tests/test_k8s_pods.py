"""A TrainJob's pods emulated for real: three processes in network namespaces (the `namespaces` fixture), each with
its own address, host name (a UTS namespace) and hosts file holding the pods' names, given exactly the variables the
Trainer's torch plugin injects and the container command `dtrain k8s submit` rendered. They train as one job,
step for step as `dtrain launch` of the same spec on one host; and the pods' usual failures: rank 0's name that
resolves late or never."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dtrain.engines import k8s

from conftest import ADDRESSES, ROOT, empty_namespaces, hosts_file, metrics, run_dtrain

JOB = "pods"
SPEC_MOUNT = Path(k8s.SPEC_MOUNT)


@pytest.fixture(autouse=True)
def nothing_left(namespaces):
    yield
    empty_namespaces(namespaces)


@pytest.fixture(scope="module")
def spec_mount():
    """`ip netns exec` mounts /etc/netns/NAME/dtrain over /etc/dtrain (the pods' ConfigMap) only where that exists."""
    made = not SPEC_MOUNT.exists()
    SPEC_MOUNT.mkdir(exist_ok=True)
    yield
    if made:
        SPEC_MOUNT.rmdir()


def submitted(tmp_path, *recipe_args: str) -> tuple[dict, list[str]]:
    """The ConfigMap's spec and the container command of `dtrain k8s submit` for 3 CPU pods, the run directory on a
    volume at `tmp_path` (what every pod mounts)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = run_dtrain("k8s", "submit", "recipes/mnist_cnn.py", "--cpu", "--nproc", "1", "--nodes", str(len(ADDRESSES)),
                     "--image", "dtrain:test", "--volume", f"runs:{tmp_path}", "--name", JOB, "--wandb", "disabled",
                     "--checkpoint-every", "never", "--timeout", "60", "--rdzv-timeout", "60", "--dry-run", "--",
                     *recipe_args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config_map, job = yaml.safe_load_all(out.stdout)
    return json.loads(config_map["data"]["spec.json"]), job["spec"]["trainer"]["command"]


# The image's own environment: its Python first, and the math of each process on one thread (these pods share this
# machine's cores; one host splits them among its processes), so that pods and one host compute alike.
IMAGE = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": os.environ["HOME"],
         "OMP_NUM_THREADS": "1"}


def start_pods(namespaces, spec: dict, command: list[str], names_known: bool = True) -> list:
    """Each pod: the spec where the ConfigMap is mounted, the plugin's variables, its own host name."""
    hosts = "".join(f"{address} {k8s.pod_host(JOB, i)}.{JOB} {k8s.pod_host(JOB, i)}\n"
                    for i, address in enumerate(ADDRESSES) if names_known or i > 0)
    pods = []
    for i, (namespace, _) in enumerate(namespaces):
        (Path("/etc/netns") / namespace / "dtrain").mkdir(exist_ok=True)
        (Path("/etc/netns") / namespace / "dtrain" / "spec.json").write_text(json.dumps(spec))
        hosts_file(namespace).write_text("127.0.0.1 localhost\n" + hosts)
        injected = {"PET_NNODES": str(len(ADDRESSES)), "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(i),
                    "PET_MASTER_ADDR": k8s.master_addr(JOB), "PET_MASTER_PORT": "29500"}
        environment = {**IMAGE, "KUBERNETES_SERVICE_HOST": "10.96.0.1", **injected}
        pods.append(subprocess.Popen(
            ["ip", "netns", "exec", namespace, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
             k8s.pod_host(JOB, i), *command], cwd=ROOT, env=environment, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return pods


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["train/loss"]) for row in metrics(run_dir, "train")]


def test_three_pods_train_as_one_job_step_for_step_as_one_host(namespaces, spec_mount, tmp_path, data_dir):
    args = ("--epochs", "1", "--log-every", "10", "--limit-train-batches", "30", "--limit-eval-batches", "2",
            "--data-dir", data_dir)
    spec, command = submitted(tmp_path / "volume", *args)
    pods = start_pods(namespaces, spec, command)
    outputs = [pod.communicate(timeout=300) for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0, 0], outputs
    in_pods = Path(spec["run_dir"])
    config = yaml.safe_load((in_pods / "config.yaml").read_text())
    assert config["world_size"] == 3 and sorted(config["rank_nodes"]) == [k8s.pod_host(JOB, i) for i in range(3)]
    assert config["cluster_job"] == {"engine": "k8s", "id": JOB, "requeues": 0}
    assert config["placement"] == {"nodes": 3, "node_rank": 0, "rank0": f"{k8s.master_addr(JOB)}:29500"}
    assert config["network"]["MASTER_ADDR"] != "127.0.0.1"

    one_host = tmp_path / "one-host"
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "3", "--run-dir", str(one_host),
                     "--wandb", "disabled", "--checkpoint-every", "never", "--", *args, env=IMAGE)
    assert out.returncode == 0, out.stderr
    assert losses(in_pods) == losses(one_host) and len(losses(one_host)) == 3  # bit for bit at fp32


def test_rank_0s_name_that_resolves_late_is_waited_for(namespaces, spec_mount, tmp_path, data_dir):
    spec, command = submitted(tmp_path / "volume", "--epochs", "1", "--log-every", "10", "--limit-train-batches", "10",
                              "--limit-eval-batches", "1", "--data-dir", data_dir)
    pods = start_pods(namespaces, spec, command, names_known=False)
    time.sleep(5)
    everything = "".join(f"{a} {k8s.pod_host(JOB, i)}.{JOB} {k8s.pod_host(JOB, i)}\n" for i, a in enumerate(ADDRESSES))
    for namespace, _ in namespaces:
        with open(hosts_file(namespace), "r+") as hosts:  # in place: each pod sees the file it mounted
            hosts.seek(0)
            hosts.write("127.0.0.1 localhost\n" + everything)
            hosts.truncate()
    outputs = [pod.communicate(timeout=300) for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0, 0], outputs
    assert f"waiting for rank 0's host {k8s.master_addr(JOB)} to resolve" in outputs[1][1]


def test_rank_0s_name_that_never_resolves_ends_every_pod_in_one_sentence(namespaces, spec_mount, tmp_path):
    spec, command = submitted(tmp_path / "volume", "--epochs", "1")
    spec["options"]["rdzv_timeout"] = 10
    begun = time.monotonic()
    pods = start_pods(namespaces, spec, command, names_known=False)
    outputs = [pod.communicate(timeout=120) for pod in pods]
    assert time.monotonic() - begun < 10 + 30
    for pod, (_, stderr) in zip(pods, outputs):
        assert pod.returncode == 2 and stderr.splitlines()[-1] == (
            f"dtrain: error: rank 0's host {k8s.master_addr(JOB)} did not resolve within --rdzv-timeout 10 s: its "
            "pod or node never came up, or the name is wrong; look at the job's first pod or node."), stderr


def test_sigterm_to_every_pod_checkpoints_within_the_grace_period_and_new_pods_resume(namespaces, spec_mount, tmp_path,
                                                                                     data_dir):
    """Kubernetes stops a pod with SIGTERM to its first process (then SIGKILL after the grace period)."""
    spec, command = submitted(tmp_path / "volume", "--epochs", "1", "--log-every", "10", "--limit-train-batches", "60",
                              "--limit-eval-batches", "1", "--data-dir", data_dir)
    run_dir = Path(spec["run_dir"])
    pods = start_pods(namespaces, spec, command)
    deadline = time.monotonic() + 180
    while not ((run_dir / "metrics.jsonl").exists() and any(r["step"] >= 20 for r in metrics(run_dir, "train"))):
        assert time.monotonic() < deadline and all(pod.poll() is None for pod in pods), "training did not start"
        time.sleep(0.2)
    stopped = time.monotonic()
    for pod in pods:
        pod.send_signal(15)
    outputs = [pod.communicate(timeout=300) for pod in pods]
    assert time.monotonic() - stopped < 120, "within the grace period"
    assert [pod.returncode for pod in pods] == [143, 143, 143], outputs
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "COMMITTED").is_file()
    step = int(latest.split("_")[1])
    assert f"stopped at step {step} on SIGTERM with a checkpoint; k8s starts job {JOB} again itself" in outputs[0][0]

    again = start_pods(namespaces, spec, command)
    outputs = [pod.communicate(timeout=300) for pod in again]
    assert [pod.returncode for pod in again] == [0, 0, 0], outputs
    assert f"resuming from {run_dir}/checkpoints/{latest} (step {step}," in outputs[0][0]
    assert [r["step"] for r in metrics(run_dir, "train")][-1] == 60


def test_two_skypilot_vms_train_as_one_job_step_for_step_as_one_host(namespaces, tmp_path, data_dir):
    args = ("--epochs", "1", "--log-every", "10", "--limit-train-batches", "30", "--limit-eval-batches", "2",
            "--data-dir", data_dir)
    run_dir = tmp_path / "sky"
    vms = []
    for i, (namespace, _) in enumerate(namespaces[:2]):
        environment = {**IMAGE, "SKYPILOT_NODE_RANK": str(i), "SKYPILOT_NODE_IPS": "\n".join(ADDRESSES[:2]) + "\n",
                       "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NUM_GPUS_PER_NODE": "0", "SKYPILOT_TASK_ID": "sky-train-1"}
        vms.append(subprocess.Popen(
            ["ip", "netns", "exec", namespace, "dtrain", "launch", "recipes/mnist_cnn.py", "--cpu", "--run-dir",
             str(run_dir), "--wandb", "disabled", "--checkpoint-every", "never", "--", *args],
            cwd=ROOT, env=environment, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [vm.communicate(timeout=300) for vm in vms]
    assert [vm.returncode for vm in vms] == [0, 0], outputs
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["cluster_job"] == {
        "engine": "skypilot", "id": "sky-train-1", "requeues": 0}

    one_host = tmp_path / "one-host"
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(one_host),
                     "--wandb", "disabled", "--checkpoint-every", "never", "--", *args, env=IMAGE)
    assert out.returncode == 0, out.stderr
    assert losses(run_dir) == losses(one_host) and len(losses(one_host)) == 3
