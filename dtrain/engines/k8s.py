"""Kubernetes, the second cluster engine: a Kubeflow TrainJob (or a plain JobSet) from the same spec, and the
placement `dtrain launch` reads inside a pod. The only module that names Kubernetes' objects, its variables and
`kubectl`.

A TrainJob becomes a JobSet with one replicated job `node` of one indexed Job: pod i is `<job>-node-0-<i>`, whose
host name resolves as `<job>-node-0-<i>.<job>` through the headless Service the JobSet makes. The Trainer's torch
plugin gives every pod its placement as `PET_*` variables; dtrain's own JobSet gives the same ones, so one reader
serves both. The spec travels in a ConfigMap mounted in every pod, whose container runs `dtrain launch --spec`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dtrain.core import hardware
from dtrain.core.contract import Job
from dtrain.core.options import SUBMIT, Option, at_least
from dtrain.core.rundir import DEFAULT, SPEC, RunDir
from dtrain.core.spec import DEFAULT_MASTER_PORT, LaunchSpec, dtrain_argv, resolve
from dtrain.engines import Allocation, Submission, Sweep, shown
from dtrain.errors import UsageError

NAME = "k8s"
FORMATS = ("trainjob", "jobset")
REPLICATED_JOB = "node"  # the torch-distributed runtime's one replicated job; dtrain's JobSet names its own the same
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime a TrainJob refers to
SPEC_MOUNT = "/etc/dtrain"  # where every pod mounts the ConfigMap that holds the spec
RUN_VOLUME = "run"
SPEC_VOLUME = "dtrain-spec"
MANIFEST = "manifest.yaml"  # in the local run directory's k8s/ folder: what `kubectl apply` gets
GPU = "nvidia.com/gpu"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035: what a TrainJob's and a JobSet's name must be
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # RFC 1123 subdomain: a PersistentVolumeClaim's name
_KUBERNETES = "KUBERNETES_SERVICE_HOST"  # set in every pod

_SUBMIT = frozenset({SUBMIT})
OPTIONS: tuple[Option, ...] = (
    Option("image", str, "The container image: it holds dtrain and the recipe (whose path is resolved inside it).",
           "engine", commands=_SUBMIT),
    Option("namespace", str, "Kubernetes namespace (default: kubectl's current one).", "engine", commands=_SUBMIT),
    Option("volume", str, "A PersistentVolumeClaim mounted at PATH in every pod, where the run directory goes "
           "(without one, a restarted pod starts over).", "engine", commands=_SUBMIT, metavar="CLAIM:PATH"),
    Option("format", str, "What to submit: a Kubeflow TrainJob (default) or a plain JobSet.", "engine",
           default="trainjob", commands=_SUBMIT, choices=FORMATS),
    Option("grace", int, "Seconds a pod has after SIGTERM to checkpoint and stop (default 120).", "engine",
           default=120, commands=_SUBMIT, check=at_least(1)),
)
_BY_NAME = {option.name: option for option in OPTIONS}


# --- names, volumes, placement: pure -------------------------------------------------------------

def pod_host(job: str, index: int) -> str:
    """Pod `index`'s host name under the JobSet's headless Service (its short name, then `.<job>`)."""
    return f"{job}-{REPLICATED_JOB}-0-{index}"


def master_addr(job: str) -> str:
    return f"{pod_host(job, 0)}.{job}"


def longest_name(nodes: int) -> int:
    """A job's name, with its pods' suffix, must be one DNS label (63 characters)."""
    return 63 - len(pod_host("", nodes - 1))


def job_name(given: str | None, recipe: str, nodes: int, now: float | None = None) -> str:
    """The name given, checked, or one derived from the recipe and the time (`mnist-cnn-20261207-093000`)."""
    longest = longest_name(nodes)
    if given is not None:
        if not _LABEL.match(given) or len(given) > longest:
            raise UsageError(f"--name {given!r} is not a name Kubernetes takes for this job: lower-case letters, digits "
                             f"and '-', starting with a letter, at most {longest} characters for {nodes} node(s) "
                             f"(its pods add '{pod_host('', nodes - 1)}').")
        return given
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    stem = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", Path(recipe).stem.lower())).strip("-")
    stem = re.sub(r"^[^a-z]+", "", stem) or "job"
    return f"{stem[: longest - len(stamp) - 1].rstrip('-')}-{stamp}"


def parse_volume(text: str) -> tuple[str, str]:
    """`CLAIM:/PATH` -> (claim, mount path)."""
    claim, sep, path = text.partition(":")
    if not sep or not _CLAIM.match(claim) or not path.startswith("/"):
        raise UsageError(f"--volume {text!r} is not CLAIM:/PATH; name a PersistentVolumeClaim and where every pod "
                         "mounts it, as in --volume runs-pvc:/mnt/runs.")
    return claim, path.rstrip("/") or "/"


def run_dir_in_pod(name: str, mount: str | None) -> str:
    """The run directory inside the pods: on the volume, or (without one) in the container's own filesystem."""
    return str(Path(mount or ".") / DEFAULT / name)


# --- the manifests: pure ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class K8sJob:
    """What the job asks of Kubernetes beyond the spec."""

    name: str
    image: str
    format: str = "trainjob"
    namespace: str | None = None
    volume: tuple[str, str] | None = None  # (claim, mount path)
    grace: int = 120
    gpus_per_node: int = 0  # 0: CPU pods


def _metadata(job: K8sJob, name: str) -> dict[str, Any]:
    return {"name": name, **({"namespace": job.namespace} if job.namespace else {})}


def config_map(job: K8sJob, spec: LaunchSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(job, f"{job.name}-spec"),
            "data": {SPEC: spec.to_json()}}


def container_command() -> list[str]:
    """What every pod runs: the image's dtrain, on the spec the ConfigMap holds."""
    return [*dtrain_argv("python"), "launch", "--spec", f"{SPEC_MOUNT}/{SPEC}"]


def _volumes(job: K8sJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the pod's volumes, the container's mounts): the spec, and the run directory's claim."""
    volumes: list[dict[str, Any]] = [{"name": SPEC_VOLUME, "configMap": {"name": f"{job.name}-spec"}}]
    mounts: list[dict[str, Any]] = [{"name": SPEC_VOLUME, "mountPath": SPEC_MOUNT, "readOnly": True}]
    if job.volume is not None:
        volumes.append({"name": RUN_VOLUME, "persistentVolumeClaim": {"claimName": job.volume[0]}})
        mounts.append({"name": RUN_VOLUME, "mountPath": job.volume[1]})
    return volumes, mounts


def _gpu_limits(job: K8sJob) -> dict[str, Any]:
    return {"limits": {GPU: job.gpus_per_node}} if job.gpus_per_node else {}


def trainjob(job: K8sJob, spec: LaunchSpec) -> dict[str, Any]:
    """A TrainJob of the torch-distributed runtime: the plugin gives each pod its placement (`PET_*`); the pod
    template's additions (the spec's and the run directory's volumes, the grace period) go in a runtime patch."""
    volumes, mounts = _volumes(job)
    trainer: dict[str, Any] = {"image": job.image, "command": container_command(), "numNodes": spec.nodes,
                               "numProcPerNode": spec.nproc}
    if job.gpus_per_node:
        trainer["resourcesPerNode"] = _gpu_limits(job)
    pod = {"terminationGracePeriodSeconds": job.grace, "volumes": volumes,
           "containers": [{"name": REPLICATED_JOB, "volumeMounts": mounts}]}
    patch = {"manager": "dtrain", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": REPLICATED_JOB, "template": {"spec": {"template": {"spec": pod}}}}]}}}}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": _metadata(job, job.name),
            "spec": {"runtimeRef": {"name": RUNTIME}, "trainer": trainer, "runtimePatches": [patch]}}


def _placement_env(job: K8sJob, spec: LaunchSpec) -> list[dict[str, Any]]:
    """What the Trainer's torch plugin injects, so that one reader serves a TrainJob's pods and a JobSet's."""
    return [{"name": "PET_NNODES", "value": str(spec.nodes)},
            {"name": "PET_NPROC_PER_NODE", "value": str(spec.nproc)},
            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
            {"name": "PET_MASTER_ADDR", "value": master_addr(job.name)},
            {"name": "PET_MASTER_PORT", "value": str(DEFAULT_MASTER_PORT)}]


def jobset(job: K8sJob, spec: LaunchSpec) -> dict[str, Any]:
    """A plain JobSet of one indexed Job, shaped as a TrainJob's: pods resolve by name before they are ready
    (`publishNotReadyAddresses`), and a failed pod restarts the whole set (`--max-requeues` times)."""
    volumes, mounts = _volumes(job)
    container = {"name": REPLICATED_JOB, "image": job.image, "command": container_command(),
                 "env": _placement_env(job, spec), "ports": [{"containerPort": DEFAULT_MASTER_PORT}],
                 "volumeMounts": mounts, **({"resources": _gpu_limits(job)} if job.gpus_per_node else {})}
    pod = {"restartPolicy": "Never", "terminationGracePeriodSeconds": job.grace, "volumes": volumes,
           "containers": [container]}
    indexed = {"parallelism": spec.nodes, "completions": spec.nodes, "completionMode": "Indexed", "backoffLimit": 0,
               "template": {"spec": pod}}
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": _metadata(job, job.name),
            "spec": {"network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
                     "failurePolicy": {"maxRestarts": spec.max_requeues},
                     "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": indexed}}]}}


def manifests(job: K8sJob, spec: LaunchSpec) -> list[dict[str, Any]]:
    return [config_map(job, spec), (trainjob if job.format == "trainjob" else jobset)(job, spec)]


class _Dumper(yaml.SafeDumper):
    """Text of several lines (the spec in the ConfigMap) as a literal block, as a person would write it."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def render(documents: Sequence[Mapping[str, Any]]) -> str:
    return yaml.dump_all(list(documents), Dumper=_Dumper, sort_keys=False, width=1000)


def resolve_job(given: Mapping[str, Any], nodes: int) -> K8sJob:
    """The engine's options checked, with the job's name; UsageError otherwise."""
    image = given.get("image")
    if not image:
        raise UsageError("dtrain k8s submit needs --image IMAGE: an image that holds dtrain and the recipe.")
    cpu, gpus = bool(given.get("cpu")), given.get("gpus_per_node")
    if cpu and gpus:
        raise UsageError("--cpu and --gpus-per-node contradict each other; pass one of them.")
    if not cpu and (gpus is None or gpus < 1):
        raise UsageError("say how many GPUs each pod uses with --gpus-per-node G (at least 1), or run CPU "
                         "processes with --cpu.")
    if given.get("min_nodes") is not None:
        raise UsageError("a TrainJob or JobSet restarts its pods as one group, never on fewer of them; leave "
                         "--min-nodes out on Kubernetes (SLURM and `dtrain launch` across nodes shrink).")
    if given.get("preflight"):
        raise UsageError("a TrainJob or JobSet cannot put itself back in the queue without a node; leave --preflight "
                         "out on Kubernetes (run `dtrain doctor --nproc N` in a pod to time the nodes).")
    volume = parse_volume(given["volume"]) if given.get("volume") else None
    return K8sJob(name=job_name(given.get("name"), given["recipe"], nodes), image=image,
                  format=_BY_NAME["format"].value(given.get("format")), namespace=given.get("namespace"),
                  volume=volume, grace=_BY_NAME["grace"].value(given.get("grace")), gpus_per_node=gpus or 0)


# --- the worker face: a pod's placement -----------------------------------------------------------

def _job_of(master: str) -> str:
    """The job's name from rank 0's pod's: `<job>-node-0-0.<job>[.<namespace>.svc...]` -> `<job>`."""
    labels = master.split(".")
    return labels[1] if len(labels) > 1 else labels[0]


def allocation(environ: Mapping[str, str]) -> Allocation | None:
    """Where this pod's `dtrain launch` runs: the Trainer's `PET_*` variables (a TrainJob's, dtrain's JobSet's),
    or PyTorchJob v1's, whose `RANK` is the pod's index and `WORLD_SIZE` the pods (never a process rank here:
    `dtrain launch` is no launcher's worker)."""
    if environ.get("PET_NODE_RANK") and environ.get("PET_MASTER_ADDR"):
        host = environ["PET_MASTER_ADDR"]
        return Allocation(engine=NAME, job_id=_job_of(host), nodes=int(environ.get("PET_NNODES", "1")),
                          node_rank=int(environ["PET_NODE_RANK"]), first_host=host,
                          master_port=int(environ.get("PET_MASTER_PORT") or DEFAULT_MASTER_PORT))
    if environ.get(_KUBERNETES) and environ.get("JOB_COMPLETION_INDEX"):
        return jobset_placement(int(environ["JOB_COMPLETION_INDEX"]), socket.gethostname(), socket.getfqdn())
    if environ.get(_KUBERNETES) and environ.get("MASTER_ADDR") and environ.get("RANK") and environ.get("WORLD_SIZE"):
        host = environ["MASTER_ADDR"]
        return Allocation(engine=NAME, job_id=host.split(".")[0], nodes=int(environ["WORLD_SIZE"]),
                          node_rank=int(environ["RANK"]), first_host=host,
                          master_port=int(environ.get("MASTER_PORT") or DEFAULT_MASTER_PORT))
    return None


def jobset_placement(index: int, host: str, fqdn: str) -> Allocation | None:
    """A hand-written JobSet's pod (one indexed Job per replicated job): its completion index is its node rank,
    and node 0 is the pod of index 0 of the same Job. The host name is `<jobset>-<replicated job>-<job>-<pod>`, the
    full name adds the subdomain (the JobSet's headless Service) that `/etc/hosts` holds. The number of pods is
    not in a pod's environment: `dtrain launch --nodes N` says it."""
    labels = fqdn.split(".")
    pod = re.match(r"^(.+-\d+)-(\d+)$", host)
    if pod is None or len(labels) < 2 or labels[0] != host:
        return None
    return Allocation(engine=NAME, job_id=labels[1], nodes=None, node_rank=index,
                      first_host=f"{pod.group(1)}-0.{labels[1]}", master_port=DEFAULT_MASTER_PORT)


def job(environ: Mapping[str, str]) -> Job | None:
    """A pod's job, for its workers: its name (pods restart in place, so no requeue count is kept)."""
    if not environ.get(_KUBERNETES) or not environ.get("PET_MASTER_ADDR"):
        return None
    host = environ["PET_MASTER_ADDR"]
    return Job(engine=NAME, job_id=_job_of(host))


# --- calls to kubectl ------------------------------------------------------------------------------

_NO_KUBECTL = ("kubectl is not on PATH, so the cluster cannot be reached from here; install it, or look at the "
               "manifests with --dry-run.")


def _kubectl(args: Sequence[str], timeout: float = 60) -> str:
    argv = ["kubectl", *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UsageError(_NO_KUBECTL) from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"kubectl did not answer within {timeout:.0f} s; check the cluster with "
                         "`kubectl cluster-info`.") from None
    if result.returncode != 0:
        raise UsageError(refusal(result.stderr, result.returncode))
    return result.stdout


def refusal(stderr: str, code: int) -> str:
    """One sentence for kubectl's failure: what is wrong and what to do, where its words say so."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = lines[-1] if lines else f"exit code {code}"
    if any("no configuration has been provided" in line or "connection refused" in line for line in lines):
        return f"kubectl has no cluster to talk to ({said}); set KUBECONFIG, or run `kubectl config use-context`."
    return f"the cluster refused: {said}"


def job_id(namespace: str | None, kind: str, name: str) -> str:
    """What status, logs and cancel take: [NAMESPACE/]KIND/NAME (`parse_job_id` reads it back)."""
    return "/".join([*([namespace] if namespace else []), kind, name])


def parse_job_id(text: str) -> tuple[list[str], str, str]:
    """[NAMESPACE/]KIND/NAME -> (kubectl's namespace arguments, kind, name)."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or parts[-2] not in FORMATS or not _LABEL.match(parts[-1]):
        raise UsageError(f"{text!r} is not a job dtrain k8s submitted; pass what it printed, as in "
                         "trainjob/mnist-cnn-20261207-093000 (with its namespace first when it has one).")
    return (["--namespace", parts[0]] if len(parts) == 3 else []), parts[-2], parts[-1]


STATES = (("Failed", "failed"), ("Complete", "finished"), ("Completed", "finished"), ("Suspended", "suspended"))


def state(status: Mapping[str, Any]) -> str:
    """dtrain's word for a TrainJob's or a JobSet's conditions."""
    true = {condition.get("type") for condition in status.get("conditions", []) if condition.get("status") == "True"}
    return next((word for condition, word in STATES if condition in true), "running or pending")


@dataclasses.dataclass(frozen=True)
class Kubernetes:
    """Both faces of Kubernetes, as `dtrain.engines` asks for them."""

    name: str = NAME
    requeues: bool = False  # Kubernetes starts a stopped pod again itself
    description: str = "Submit a recipe as a Kubeflow TrainJob (or a JobSet), and follow, inspect or cancel it."
    options: tuple[Option, ...] = OPTIONS

    def job(self, environ: Mapping[str, str]) -> Job | None:
        return job(environ)

    def allocation(self, environ: Mapping[str, str]) -> Allocation | None:
        return allocation(environ)

    def requeue(self, job_id: str) -> None:
        raise NotImplementedError("Kubernetes starts a stopped pod again itself")

    def fan_out(self, where: Allocation, argv: Sequence[str], elastic: bool = False) -> list[str]:
        return list(argv)  # every pod runs its own `dtrain launch`

    def requeue_without(self, job_id: str, nodes: Sequence[str], needed: int,
                        announce: Callable[[list[str]], None]) -> list[str]:
        raise UsageError("a TrainJob or JobSet is not requeued by dtrain: Kubernetes restarts its pods, and a node "
                         "that fails is the cluster's to cordon.")

    def render(self, given: Mapping[str, Any], sources: Mapping[str, str], sweep: Sweep | None, workdir: str,
               python: str) -> Submission:
        if sweep is not None:
            raise UsageError("dtrain k8s submit runs one run, not a sweep; submit each run, or run `dtrain sweep` "
                             "inside a pod.")
        nodes = given.get("nodes") or 1
        job = resolve_job(given, nodes)
        signal = given.get("preempt_signal")
        if signal not in (None, "TERM"):
            raise UsageError(f"in a pod SIGTERM is what asks dtrain to checkpoint and stop, not SIG{signal}; leave "
                             "--preempt-signal out.")
        spec = resolve({**given, "name": job.name, "run_dir": run_dir_in_pod(job.name, job.volume and job.volume[1]),
                        "nodes": nodes, "node_rank": 0, "gpus": job.gpus_per_node or None, "preempt_signal": "TERM"},
                       gpus_available=job.gpus_per_node, free_port=DEFAULT_MASTER_PORT, is_installed=lambda _: True,
                       cpu_flags=None, sources=sources, recipe_in_image=True)
        manifest = RunDir.of(Path(workdir) / DEFAULT / job.name).engine_dir(NAME) / MANIFEST
        summary = [f"submitted {{job_id}}: {spec.nodes} pod(s) of {spec.nproc} process(es), run directory "
                   f"{spec.run_dir} in the pods",
                   f"  manifest  {shown(manifest, workdir)}",
                   "  follow    dtrain k8s logs {job_id} --follow   (status, cancel: dtrain k8s status|cancel {job_id})"]
        if job.volume is None:
            summary.append("  note      without --volume the run directory is in each pod's own filesystem: a "
                           "restarted pod starts over")
        return Submission({str(manifest): render(manifests(job, spec))}, str(manifest),
                          ("kubectl", "apply", "-f", str(manifest)), tuple(summary), kept_by_dry_run=True)

    def submit(self, submission: Submission) -> str:
        job = list(yaml.safe_load_all(submission.files[submission.script]))[-1]  # after its ConfigMap
        _kubectl(["apply", "-f", submission.script])
        return job_id(job["metadata"].get("namespace"), job["kind"].lower(), job["metadata"]["name"])

    def status(self, job_id: str, sweep_status: Callable[[Path], list[tuple[int, str, str]] | None]) -> str:
        namespace, kind, name = parse_job_id(job_id)
        found = json.loads(_kubectl([*namespace, "get", f"{kind}/{name}", "-o", "json"]))
        return f"{kind} {name}: {state(found.get('status', {}))}"

    def cancel(self, job_id: str) -> None:
        namespace, kind, name = parse_job_id(job_id)
        _kubectl([*namespace, "delete", f"{kind}/{name}", f"configmap/{name}-spec"])

    def logs(self, job_id: str, node: int | None, follow: bool, echo: Callable[[str], None]) -> str | None:
        namespace, _, name = parse_job_id(job_id)
        selector = (f"jobset.sigs.k8s.io/jobset-name={name},"
                    f"batch.kubernetes.io/job-completion-index={node or 0}")
        if not follow:
            echo(_kubectl([*namespace, "logs", "-l", selector, "--tail=-1"]))
            return None
        try:
            with subprocess.Popen(["kubectl", *namespace, "logs", "-l", selector, "--tail=-1", "--follow"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as follower:
                for line in follower.stdout or ():
                    echo(line)
                refused = follower.stderr.read() if follower.stderr else ""
        except FileNotFoundError:
            raise UsageError(_NO_KUBECTL) from None
        if follower.returncode:
            raise UsageError(refusal(refused, follower.returncode))
        return None

    def doctor_facts(self, environ: Mapping[str, str]) -> list[tuple[str, str]]:
        """In a pod: its placement, and whether rank 0's name resolves yet."""
        where = allocation(environ)
        if where is None:
            return []
        resolves = "resolves" if hardware.wait_to_resolve(where.first_host, 0) else "does not resolve (yet)"
        return [("Kubernetes", f"pod of node {where.node_rank} of {where.nodes or '?'} in job {where.job_id}; rank 0 is "
                               f"{where.first_host}:{where.master_port}, which {resolves}")]


ENGINE = Kubernetes()
