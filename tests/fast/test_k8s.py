"""The Kubernetes engine's launch face: what `dtrain k8s submit` renders is what an API server with the TrainJob and
JobSet CRDs of ../shared/k8s/ would create (structure, unknown fields, the CRDs' rules), the ConfigMap is one the
`kubernetes` client reads back whole, recipe arguments reach the pods byte for byte; and its worker face: a pod's
placement from the variables the Trainer's torch plugin (or PyTorchJob v1) gives it."""

from __future__ import annotations

import copy
import itertools
import json
import os

import pytest
import yaml

from dtrain.core import hardware
from dtrain.core.spec import LaunchSpec
from dtrain.engines import k8s
from dtrain.errors import UsageError

from conftest import ROOT, run_dtrain
from k8s_schema import validate

RECIPE = str(ROOT / "recipes" / "mnist_cnn.py")
HOSTILE = ("--note", "it's \"quoted\" $(rm -rf /) `id` ; a  b\n", "--empty", "")


def given(fmt: str, nodes: int, gpus: int, volume: bool, **more) -> dict:
    devices = {"gpus_per_node": gpus} if gpus else {"cpu": True, "nproc": 2}
    return {"recipe": RECIPE, "recipe_args": HOSTILE, "nodes": nodes, "image": "registry.example/team/dtrain:1.2",
            "format": fmt, **devices, **({"volume": "runs-pvc:/mnt/runs"} if volume else {}), **more}


def rendered(options: dict) -> list[dict]:
    submission = k8s.ENGINE.render(options, {}, None, workdir="/home/alice/work", python="/usr/bin/python3")
    return list(yaml.safe_load_all(submission.files[submission.script]))


CASES = list(itertools.product(k8s.FORMATS, (1, 3), (0, 8), (False, True)))


@pytest.mark.parametrize("fmt, nodes, gpus, volume", CASES,
                         ids=[f"{f}-{n}node-{'gpu' if g else 'cpu'}{'-volume' if v else ''}" for f, n, g, v in CASES])
def test_every_manifest_is_one_the_api_server_would_create(fmt, nodes, gpus, volume):
    documents = rendered(given(fmt, nodes, gpus, volume))
    assert [d["kind"] for d in documents] == ["ConfigMap", {"trainjob": "TrainJob", "jobset": "JobSet"}[fmt]]
    for document in documents:
        assert validate(document) == [], document["kind"]
    spec = LaunchSpec.from_json(documents[0]["data"]["spec.json"], "the ConfigMap")
    assert (spec.nodes, spec.nproc, spec.device) == (nodes, gpus or 2, "cuda" if gpus else "cpu")
    assert spec.recipe_args == HOSTILE  # byte for byte, through YAML and JSON, never through a shell
    assert spec.preempt_signal == "TERM"  # what Kubernetes sends a pod it stops
    assert spec.run_dir == (f"/mnt/runs/runs/{spec.name}" if volume else f"runs/{spec.name}")


@pytest.mark.parametrize("fmt", k8s.FORMATS)
def test_the_pods_run_dtrain_on_the_mounted_spec_with_the_plugins_placement(fmt):
    config_map, job = rendered(given(fmt, 3, 8, True))
    name = job["metadata"]["name"]
    if fmt == "trainjob":
        trainer = job["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 8)  # never the plugin's "auto"
        assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8}}
        command = trainer["command"]
        pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]["spec"]
    else:
        pod = job["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        command = container["command"]
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
        assert env == {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "8",
                       "PET_NODE_RANK": {"fieldRef": {"fieldPath": k8s.COMPLETION_INDEX}},
                       "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500"}
        assert job["spec"]["network"]["publishNotReadyAddresses"] is True
    assert command == ["python", "-m", "dtrain.cli", "launch", "--spec", "/etc/dtrain/spec.json"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert {"name": "dtrain-spec", "configMap": {"name": config_map["metadata"]["name"]}} in pod["volumes"]
    assert {"name": "run", "persistentVolumeClaim": {"claimName": "runs-pvc"}} in pod["volumes"]


@pytest.mark.parametrize("mutate, says", [
    (lambda job: job["spec"]["trainer"].update(numNode=job["spec"]["trainer"].pop("numNodes")), "numNode: unknown"),
    (lambda job: job["spec"]["trainer"].update(numProcPerNode="2"), "numProcPerNode: '2' is not of type integer"),
    (lambda job: job["spec"]["trainer"].update(numProcPerNode=0), "numProcPerNode must be greater than or equal to 1"),
    (lambda job: job["spec"].pop("runtimeRef"), ".spec.runtimeRef: required"),
    (lambda job: job["metadata"].update(name="Mnist_CNN"), "metadata.name must match RFC 1035"),
    (lambda job: job["spec"]["runtimePatches"][0].pop("manager"), "manager: required"),
])
def test_a_misspelt_mistyped_or_missing_field_fails_the_same_check(mutate, says):
    _, job = rendered(given("trainjob", 3, 0, True))
    broken = copy.deepcopy(job)
    mutate(broken)
    assert any(says in error for error in validate(broken)), validate(broken)


def test_a_misspelt_or_mistyped_field_deep_in_a_jobsets_pod_fails_the_same_check():
    _, job = rendered(given("jobset", 3, 8, True))
    pod = job["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "eight"
    problems = validate(job)
    assert len(problems) == 2 and "terminationGracePeriod: unknown field" in problems[-1], problems


def test_a_misspelt_field_of_the_configmap_fails_its_model():
    config_map, _ = rendered(given("jobset", 1, 0, False))
    assert validate({**config_map, "datta": config_map.pop("data")}) != []


def test_a_name_is_derived_from_the_recipe_or_refused_in_one_sentence():
    assert k8s.job_name(None, "recipes/My_Recipe.v2.py", nodes=3, now=0).startswith("my-recipe-v2-19700101-")
    long = k8s.job_name(None, "x" * 80 + ".py", nodes=100, now=0)
    assert len(long + "-node-0-99") == 63
    assert k8s.job_name("exp-1", RECIPE, nodes=2) == "exp-1"
    for bad in ("Exp1", "exp_1", "1exp", "e" * 56):
        with pytest.raises(UsageError, match="is not a name Kubernetes takes"):
            k8s.job_name(bad, RECIPE, nodes=10)


@pytest.mark.parametrize("options, says", [
    ({"image": None}, "needs --image IMAGE"),
    ({"gpus_per_node": None, "cpu": None}, "--gpus-per-node G"),
    ({"cpu": True}, "--cpu and --gpus-per-node contradict"),
    ({"volume": "runs-pvc"}, "is not CLAIM:/PATH"),
    ({"preempt_signal": "USR2"}, "in a pod SIGTERM is what asks dtrain to checkpoint"),
])
def test_what_the_engine_cannot_run_is_one_sentence(options, says):
    with pytest.raises(UsageError, match=says):
        rendered({**given("trainjob", 2, 8, False), **options})


def test_through_the_cli_it_exits_2_and_writes_nothing(tmp_path):
    out = run_dtrain("k8s", "submit", RECIPE, "--gpus-per-node", "8", "--dry-run", cwd=tmp_path)  # no --image
    assert (out.returncode, out.stdout) == (2, "") and out.stderr.count("\n") == 1 and "--image" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_is_refused():
    out = run_dtrain("k8s", "submit", RECIPE, "--cpu", "--image", "i", "--grid", "lr=1,2", "--dry-run")
    assert out.returncode == 2 and "not a sweep" in out.stderr


def test_a_shrink_is_refused():
    out = run_dtrain("k8s", "submit", RECIPE, "--cpu", "--image", "i", "--nodes", "3", "--min-nodes", "2", "--dry-run")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("dtrain: error: a TrainJob or JobSet restarts its pods as one group, never on fewer of "
                          "them; leave --min-nodes out on Kubernetes (SLURM and `dtrain launch` across nodes "
                          "shrink).\n")


@pytest.mark.parametrize("environ, expected", [
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "PET_NNODES": "3", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2",
      "PET_MASTER_ADDR": "exp-node-0-0.exp", "PET_MASTER_PORT": "29500"},
     ("exp", 3, 2, "exp-node-0-0.exp", 29500)),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "MASTER_ADDR": "exp-master-0", "MASTER_PORT": "23456",
      "WORLD_SIZE": "4", "RANK": "1"},  # PyTorchJob v1: RANK is the pod's index
     ("exp-master-0", 4, 1, "exp-master-0", 23456)),
])
def test_a_pods_placement_comes_from_its_variables(environ, expected):
    where = k8s.allocation(environ)
    assert where is not None
    assert (where.job_id, where.nodes, where.node_rank, where.first_host, where.master_port) == expected
    assert where.engine == "k8s" and where.per_node


def test_outside_a_pod_there_is_no_placement():
    assert k8s.allocation({"MASTER_ADDR": "h", "RANK": "1", "WORLD_SIZE": "2"}) is None  # no Kubernetes here
    assert k8s.job({}) is None


def test_dtrain_launch_in_a_pod_takes_its_placement():
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "PET_NNODES": "3", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "exp-node-0-0.exp", "PET_MASTER_PORT": "29500"}
    out = run_dtrain("launch", RECIPE, "--cpu", "--nproc", "2", "--dry-run", env=pod)
    assert out.returncode == 0, out.stderr
    for expected in ("--nnodes 3", "--node-rank 1", "--rdzv-endpoint exp-node-0-0.exp:29500", "--rdzv-id mnist_cnn-exp"):
        assert expected in out.stdout, out.stdout


@pytest.mark.parametrize("fmt", k8s.FORMATS)
def test_the_manifests_to_copy_are_what_submit_renders(fmt, tmp_path):
    """cluster/k8s-<format>.yaml, shown in docs/kubernetes.md, is today's rendering of its command; a dry run writes
    it where `kubectl apply -f` takes it by hand."""
    out = run_dtrain("k8s", "submit", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--nodes", "3", "--image",
                     "registry.example/team/train:1.2", "--volume", "runs-pvc:/mnt/runs", "--name", "mnist-cnn-example",
                     "--format", fmt, "--dry-run", "--", "--epochs", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "cluster" / f"k8s-{fmt}.yaml").read_text(), "regenerate it with that command"
    manifest = tmp_path / "runs" / "mnist-cnn-example" / "k8s" / "manifest.yaml"
    assert manifest.read_text() == out.stdout
    assert out.stderr == f"# submitting runs: kubectl apply -f {manifest}\n"


def test_waiting_for_rank_0s_name_gives_up_at_the_timeout():
    tries, slept = [], []

    def resolve(host):
        tries.append(host)
        if len(tries) < 3:
            raise OSError("not yet")

    assert hardware.wait_to_resolve("exp-node-0-0.exp", 60, resolve=resolve, sleep=slept.append)
    assert (len(tries), slept) == (3, [1.0, 1.0])
    assert not hardware.wait_to_resolve("never", 0, resolve=lambda host: (_ for _ in ()).throw(OSError()))


def test_a_pod_whose_rank_0_never_resolves_ends_in_one_sentence():
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "gone-node-0-0.gone.invalid", "PET_MASTER_PORT": "29500"}
    out = run_dtrain("launch", RECIPE, "--cpu", "--rdzv-timeout", "2", env=pod, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1] == ("dtrain: error: rank 0's host gone-node-0-0.gone.invalid did not resolve "
                                          "within --rdzv-timeout 2 s: its pod or node never came up, or the name is "
                                          "wrong; look at the job's first pod or node.")


def stand_in_kubectl(tmp_path, stdout: str = "", stderr: str = "", code: int = 0) -> dict:
    """PATH with a `kubectl` that answers as a cluster would (no cluster can run here), recording its arguments."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (tmp_path / "out").write_text(stdout)
    (tmp_path / "err").write_text(stderr)
    script = folder / "kubectl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/args\ncat {tmp_path}/out\ncat {tmp_path}/err >&2\n'
                      f"exit {code}\n")
    script.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_status_maps_the_jobs_conditions_and_cancel_deletes_the_job_and_its_configmap(tmp_path):
    conditions = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                            {"type": "Complete", "status": "True"}]}}
    env = stand_in_kubectl(tmp_path, stdout=json.dumps(conditions))
    out = run_dtrain("k8s", "status", "team/trainjob/exp-1", env=env)
    assert (out.returncode, out.stdout) == (0, "trainjob exp-1: finished\n"), out.stderr
    assert run_dtrain("k8s", "cancel", "jobset/exp-1", env=env).stdout == "cancelled job jobset/exp-1\n"
    assert (tmp_path / "args").read_text().splitlines() == [
        "--namespace team get trainjob/exp-1 -o json", "delete jobset/exp-1 configmap/exp-1-spec"]
    assert k8s.state({"conditions": [{"type": "Failed", "status": "True"}]}) == "failed"
    assert k8s.state({}) == "running or pending"


@pytest.mark.parametrize("env, says", [
    ({"PATH": "/nonexistent"}, "kubectl is not on PATH, so the cluster cannot be reached from here"),
    ("no-config", "kubectl has no cluster to talk to"),
    ("refused", "the cluster refused: Error from server (Forbidden): trainjobs is forbidden"),
])
def test_no_kubectl_no_kubeconfig_or_a_refusal_is_one_sentence(env, says, tmp_path):
    if env == "no-config":
        env = stand_in_kubectl(tmp_path, stderr="error: no configuration has been provided, try setting KUBERNETES_MASTER "
                               "environment variable\n", code=1)
    elif env == "refused":
        env = stand_in_kubectl(tmp_path, stderr='Error from server (Forbidden): trainjobs is forbidden: User "alice" '
                               "cannot create resource\n", code=1)
    out = run_dtrain("k8s", "submit", RECIPE, "--cpu", "--image", "i", "--name", "exp", cwd=tmp_path,
                     env={**env, "PYTHONPATH": str(ROOT)})
    assert (out.returncode, out.stdout) == (2, "") and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("dtrain: error: ") and says in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # the manifest written for kubectl is removed when it refuses


def test_dtrain_doctor_in_a_pod_says_where_it_is_and_whether_rank_0_resolves():
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "PET_NNODES": "3", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "gone-node-0-0.gone.invalid", "PET_MASTER_PORT": "29500"}
    out = run_dtrain("doctor", env=pod)
    assert ("Kubernetes   pod of node 1 of 3 in job gone; rank 0 is gone-node-0-0.gone.invalid:29500, which "
            "does not resolve (yet)") in out.stdout, out.stdout


def test_a_hand_written_jobsets_pod_finds_node_0_by_the_host_name_rule():
    where = k8s.jobset_placement(2, "train-workers-0-2", "train-workers-0-2.train.team.svc.cluster.local")
    assert where is not None
    assert (where.job_id, where.nodes, where.node_rank, where.first_host) == ("train", None, 2, "train-workers-0-0.train")
    assert k8s.jobset_placement(0, "laptop", "laptop") is None  # no JobSet host name, no subdomain
