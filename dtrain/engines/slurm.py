"""SLURM, the first cluster engine: both faces in one module, and the only one that names SLURM's variables and commands.

The deciding functions are pure (parse `--time` and `--signal`, render the script, read a job
step's variables); `submit`, `show_job`, `cancel` and `requeue` only run sbatch/scontrol/scancel and
turn their failures into one sentence. The job carries its resolved LaunchSpec as a file: every
node launches that spec, with its own placement. `ENGINE` is what `dtrain.engines` finds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from dtrain.core import options, profiles
from dtrain.core.options import SUBMIT, Option
from dtrain.core.rundir import DEFAULT, SPEC, RunDir
from dtrain.core.spec import DEFAULT_MASTER_PORT, LaunchSpec, default_name, dtrain_argv, resolve
from dtrain.engines import Allocation, Job, Submission, Sweep, shown
from dtrain.errors import UsageError

NAME = "slurm"

TEMPLATE = resources.files("dtrain") / "defaults" / "job.sbatch"
OUTPUT_PATTERN = "slurm-%j.out"
ARRAY_OUTPUT_PATTERN = "slurm-%A_%a.out"  # a job array's: in the sweep directory's slurm/ folder, one per task
SCRIPT = "job.sbatch"  # beside the spec every node launches, in the run directory's slurm/ folder
TASK_SPEC = "task-{}.json"  # in a sweep directory's slurm/ folder: what array task N launches
SIGNAL_LEAD_S = 90  # the default --signal: the preemption signal this long before the time limit
# Rendezvous ports come from the job id, below Linux's ephemeral range (32768+).
_PORT_BASE, _PORT_SPAN = 10000, 20000


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """The resources and behaviour asked of SLURM: the #SBATCH lines and what runs before the step."""

    nodes: int
    gpus_per_node: int = 0  # 0: a CPU job
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal: str = f"{options.default('preempt_signal')}@{SIGNAL_LEAD_S}"
    modules: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    array: str | None = None  # a job array's tasks, as sbatch --array takes them (0-3%2): one run of a sweep each


_SUBMIT = frozenset({SUBMIT})
OPTIONS: tuple[Option, ...] = tuple(Option(name, kind, help, "engine", commands=_SUBMIT) for name, kind, help in (
    ("cpus_per_task", int, "CPUs for each node's launcher and its processes."),
    ("mem", str, "Memory per node, as sbatch takes it (64G)."),
    ("time", str, "Time limit: minutes, HH:MM:SS or D-HH:MM:SS."),
    ("partition", str, "SLURM partition."),
    ("account", str, "SLURM account."),
    ("qos", str, "SLURM quality of service."),
    ("constraint", str, "SLURM node features (sbatch --constraint)."),
    ("exclusive", bool, "Do not share the nodes with other jobs."),
    ("signal", str, "Pre-timeout signal, [B:]NAME@SECONDS (default: --preempt-signal @90): checkpoint and requeue."),
    ("cluster_profile", str, "cluster/NAME.yaml: partition, account, GPUs per node, modules, setup."),
    ("template", str, "sbatch template (default: dtrain's job.sbatch, as in cluster/job.sbatch)."),
))


# --- cluster profiles ------------------------------------------------------------------------------

PROFILE_KEYS = ("partition", "account", "qos", "constraint", "gpus_per_node", "cpus_per_task", "mem", "time",
                "exclusive", "signal", "max_requeues", "modules", "setup")


def load_cluster_profile(path: str) -> dict[str, Any]:
    """Read cluster/NAME.yaml. Its `gpus_per_node` is what the nodes have: the default and the maximum."""
    data = profiles.load(path, example="cluster/local.yaml")
    unknown = sorted(set(data) - set(PROFILE_KEYS))
    if unknown:
        raise UsageError(f"cluster profile {path} has an unknown key {unknown[0]!r}; "
                         f"known keys: {', '.join(PROFILE_KEYS)}.")
    for key, kind in (("gpus_per_node", int), ("cpus_per_task", int), ("max_requeues", int), ("exclusive", bool),
                      ("time", str), ("signal", str), ("mem", str)):
        if key in data and not isinstance(data[key], kind) or kind is int and isinstance(data.get(key), bool):
            hint = " (quote it: time: \"04:00:00\")" if key == "time" else ""
            raise UsageError(f"cluster profile {path}: {key} must be {'an' if kind is int else 'a'} "
                             f"{kind.__name__}{hint}, got {data[key]!r}.")
    for key in ("modules", "setup"):
        value = data.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"cluster profile {path}: {key} must be a list of strings.")
        data[key] = tuple(value)
    return data


def resolve_job(given: Mapping[str, Any], profile: Mapping[str, Any], profile_path: str | None) -> SlurmJob:
    """Merge command-line options over the cluster profile and check them; raise UsageError otherwise."""

    def pick(key: str, default: Any = None) -> Any:
        value = given.get(key)
        return profile.get(key, default) if value is None else value

    cpu = bool(given.get("cpu"))
    gpus = given.get("gpus_per_node")
    node_gpus = profile.get("gpus_per_node")
    if cpu:
        if gpus:
            raise UsageError("--cpu and --gpus-per-node contradict each other; pass one of them.")
        gpus = 0
    elif gpus is None:
        if not node_gpus:
            raise UsageError("say how many GPUs each node should use with --gpus-per-node G "
                             "(or a cluster profile's gpus_per_node), or run CPU processes with --cpu.")
        gpus = node_gpus
    if not cpu and gpus < 1:
        raise UsageError(f"--gpus-per-node must be at least 1, got {gpus}; use --cpu for a CPU job.")
    if node_gpus and gpus > node_gpus:
        raise UsageError(f"--gpus-per-node {gpus} is more than the {node_gpus} GPUs per node that cluster profile "
                         f"{profile_path} allows; pass --gpus-per-node {node_gpus} or fewer.")
    cpus = pick("cpus_per_task")
    if cpus is not None and cpus < 1:
        raise UsageError(f"--cpus-per-task must be at least 1, got {cpus}.")
    time_limit = pick("time")
    limit_s = parse_time(str(time_limit)) if time_limit is not None else None
    signal_spec = _signal(pick("signal"), given.get("preempt_signal"))
    _, _, lead_s = parse_signal(signal_spec)
    if limit_s is not None and lead_s >= limit_s:
        raise UsageError(f"--signal {signal_spec} would fire {lead_s} s before the end of a job whose --time "
                         f"{time_limit} is only {limit_s} s; give the job more time or the signal less.")
    job = SlurmJob(
        nodes=pick("nodes", 1), gpus_per_node=gpus, cpus_per_task=cpus, mem=pick("mem"),
        time=str(time_limit) if time_limit is not None else None, partition=pick("partition"),
        account=pick("account"), qos=pick("qos"), constraint=pick("constraint"),
        exclusive=bool(pick("exclusive", False)), signal=signal_spec,
        modules=tuple(profile.get("modules", ())), setup=tuple(profile.get("setup", ())),
    )
    for key in ("mem", "partition", "account", "qos", "constraint"):
        _check_directive_value(f"--{key}", getattr(job, key))
    return job


def _signal(signal_spec: str | None, preempt_signal: str | None) -> str:
    """`--signal` and `--preempt-signal` name one signal: either gives it, both must agree."""
    if signal_spec is None:
        name = options.BY_NAME["preempt_signal"].value(preempt_signal)
        return f"{name}@{SIGNAL_LEAD_S}"
    name = parse_signal(signal_spec)[1]
    if preempt_signal is not None and options.signal_name("--preempt-signal", preempt_signal) != name:
        raise UsageError(f"--signal {signal_spec} sends SIG{name}, but --preempt-signal is {preempt_signal}; make "
                         "them agree, or give only one of them.")
    return signal_spec


# --- pure parsing ----------------------------------------------------------------------------------

_TIME_FORMS = (
    re.compile(r"^(?P<m>\d+)$"),
    re.compile(r"^(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)$"),
    re.compile(r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)$"),
)


def parse_time(text: str) -> int | None:
    """A SLURM time limit in seconds (None for unlimited), in any of the forms sbatch accepts."""
    text = text.strip()
    if text.lower() in ("unlimited", "infinite"):
        return None
    for form in _TIME_FORMS:
        match = form.match(text)
        if match:
            parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
            seconds = ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
            if seconds > 0:
                return seconds
    raise UsageError(f"--time {text!r} is not a SLURM time; use minutes (90), HH:MM:SS (02:00:00) "
                     "or D-HH:MM:SS (1-12:00:00).")


def parse_signal(text: str) -> tuple[bool, str, int]:
    """`[B:]SIG[@SECONDS]` (sbatch --signal) -> (to the batch shell only, signal name, seconds before the end)."""
    text = str(text).strip()
    batch = text.upper().startswith("B:")
    name, _, lead = text[2 if batch else 0:].partition("@")
    if lead and not lead.isdigit():
        raise UsageError(f"--signal {text!r}: the time after '@' must be whole seconds, as in USR2@90.")
    try:
        return batch, options.signal_name("--signal", name), int(lead or 60)
    except UsageError:
        raise UsageError(f"--signal {text!r} is not a signal SLURM can send; use NAME@SECONDS such as USR2@90.") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[003-004,010],login1" -> "gpu003"."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], nodelist[:end])


def hostnames(nodelist: str) -> list[str]:
    """Every host of a SLURM hostlist: "n[1-3,5],login1" -> n1, n2, n3, n5, login1 (zero padding kept)."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist or ""):
        match = re.match(r"^(.*?)\[([^\]]*)\](.*)$", part)
        if match is None:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            hosts += [f"{prefix}{n:0{len(low)}d}{suffix}" for n in range(int(low), int(high or low) + 1)]
    return hosts


def rendezvous_port(job_id: str) -> int:
    """A port from the job id: concurrent jobs sharing a first node do not collide, a requeue keeps it."""
    return _PORT_BASE + int(job_id) % _PORT_SPAN


def _max_tasks_per_node(value: str) -> int:
    """Largest count in SLURM_STEP_TASKS_PER_NODE, e.g. "2(x3),1" -> 2."""
    counts = [int(m) for m in re.findall(r"(?:^|,)(\d+)", value)]
    return max(counts, default=1)


def job(environ: Mapping[str, str]) -> Job | None:
    """SLURM's account of the job a worker runs in; the ranks are SLURM's where srun started the workers."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None

    def number(name: str) -> int | None:
        return int(environ[name]) if environ.get(name) else None

    return Job(engine=NAME, job_id=job_id, requeue_count=number("SLURM_RESTART_COUNT") or 0,
               node_name=environ.get("SLURMD_NODENAME") or None, rank=number("SLURM_PROCID"),
               local_rank=number("SLURM_LOCALID"), world_size=number("SLURM_NTASKS"))


def allocation(environ: Mapping[str, str]) -> Allocation | None:
    """Read SLURM's variables, or None outside a job. In a step, dtrain must be one task per node."""
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    in_step = "SLURM_STEP_ID" in environ
    nodes = environ.get("SLURM_STEP_NUM_NODES" if in_step else "SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES", "1")
    nodelist = environ.get("SLURM_STEP_NODELIST" if in_step else "SLURM_JOB_NODELIST") or environ.get(
        "SLURM_JOB_NODELIST", "localhost")
    if in_step:
        tasks = _max_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))
        if tasks > 1:
            raise UsageError(f"srun started {tasks} copies of dtrain launch on a node; start one per node "
                             "(srun --ntasks-per-node=1 dtrain launch ...): dtrain starts the processes.")
    return Allocation(engine=NAME, job_id=job_id, nodes=int(nodes), per_node=in_step,
                      node_rank=int(environ.get("SLURM_NODEID", "0")) if in_step else 0,
                      first_host=first_host(nodelist), master_port=rendezvous_port(job_id))


def job_dir(run_dir: str | Path) -> Path:
    return RunDir.of(run_dir).engine_dir(NAME)


def spec_path(run_dir: str | Path) -> Path:
    return job_dir(run_dir) / SPEC


def task_spec_path(sweep_dir: str | Path, index: int | str) -> Path:
    return job_dir(sweep_dir) / TASK_SPEC.format(index)


def array_spec(indices: Sequence[int], at_once: int) -> str:
    """sbatch's --array value for these task indices, at most `at_once` running: [0, 1, 2, 5] -> 0-2,5%2."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans) + f"%{at_once}"


def check_array_size(highest_index: int, max_array_size: int) -> None:
    """SLURM refuses an array index at or above the cluster's MaxArraySize."""
    if highest_index >= max_array_size:
        raise UsageError(f"this sweep needs array tasks up to index {highest_index}, and this cluster's MaxArraySize "
                         f"is {max_array_size}; split the sweep (fewer --grid values or --draws) or ask the "
                         "cluster's admins for a larger MaxArraySize.")


def parse_max_array_size(config: str) -> int:
    """MaxArraySize from `scontrol show config` (SLURM's default, 1001, when it is not there)."""
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
    return int(found.group(1)) if found else 1001


# --- the script ----------------------------------------------------------------------------------

def srun_command(nodes: int, command: Sequence[str], cpus_per_task: int | None = None,
                 elastic: bool = False) -> list[str]:
    """One task per node: each runs `dtrain launch`, which starts that node's processes. A task that fails stops
    the others, unless the job may go on without a node (`elastic`: --min-nodes), whose step then outlives the
    failure of a task or of a node."""
    argv = ["srun", f"--nodes={nodes}", "--ntasks-per-node=1",
            *(("--kill-on-bad-exit=0", "--no-kill") if elastic else ("--kill-on-bad-exit=1",))]
    if cpus_per_task is not None:
        argv.append(f"--cpus-per-task={cpus_per_task}")  # srun does not inherit it from sbatch
    return argv + list(command)


def directives(job: SlurmJob, name: str, run_dir: str, workdir: str, elastic: bool = False) -> list[str]:
    """The #SBATCH lines. Their values cannot be quoted, so each must be one plain word."""
    lines = [
        f"--job-name={name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
    ]
    optional = {"gpus-per-node": job.gpus_per_node or None, "cpus-per-task": job.cpus_per_task, "mem": job.mem,
                "time": job.time, "partition": job.partition, "account": job.account, "qos": job.qos,
                "constraint": job.constraint}
    lines += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    if job.exclusive:
        lines.append("--exclusive")
    if elastic:
        lines.append("--no-kill")  # a node that fails leaves the job to the others (--min-nodes)
    if job.array:
        lines.append(f"--array={job.array}")
    lines += [
        f"--signal={job.signal}",
        "--requeue",
        "--open-mode=append",
        f"--output={job_dir(run_dir) / (ARRAY_OUTPUT_PATTERN if job.array else OUTPUT_PATTERN)}",
        f"--chdir={workdir}",
    ]
    for line in lines:
        _check_directive_value("the job", line, what="an #SBATCH line")
    return [f"#SBATCH {line}" for line in lines]


_PLAIN_WORD = re.compile(r"^[^\s\"'\\`$;]+$")


def _check_directive_value(option: str, value: str | None, what: str = "its value") -> None:
    if value is not None and not _PLAIN_WORD.match(str(value)):
        raise UsageError(f"{option}: {value!r} holds a space, quote or shell character, which {what} cannot "
                         "carry; choose a value (or a run directory path) without them.")


def render_script(template: str, job: SlurmJob, spec: LaunchSpec, python: str, workdir: str) -> str:
    """The sbatch script: the template with its {{ placeholders }} filled; every user value quoted.
    It runs `dtrain launch --spec` once, with the spec file `dtrain slurm submit` writes beside it, which starts
    one on every node (srun, `fan_out`) and requeues the job without a node that made it fail; in a job array (`job.array`, `spec.run_dir` the sweep directory) each task
    launches its own run's, slurm/task-$SLURM_ARRAY_TASK_ID.json."""
    spec_file = (shlex.quote(str(task_spec_path(spec.run_dir, ""))[:-len(".json")]) + '"${SLURM_ARRAY_TASK_ID}".json'
                 if job.array else shlex.quote(str(spec_path(spec.run_dir))))
    lines = [f"{shlex.join([*dtrain_argv(python), 'launch', '--spec'])} {spec_file}"]
    setup = [f"module load {shlex.quote(module)}" for module in job.modules] + list(job.setup)
    values = {
        "directives": "\n".join(directives(job, spec.name, spec.run_dir, workdir, elastic=spec.min_nodes is not None)),
        "setup": "\n".join(setup) if setup else "# (no modules or setup lines: add them in a cluster profile)",
        "max_requeues": str(spec.max_requeues),
        "command": " \\\n    ".join(lines),
    }

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise UsageError(f"the sbatch template has an unknown placeholder {{{{ {key} }}}}; "
                             f"known: {', '.join(values)}.")
        return values[key]

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", fill, template)


def output_path(run_dir: str | Path, job_id: str) -> Path:
    return job_dir(run_dir) / OUTPUT_PATTERN.replace("%j", job_id)


# --- calls to SLURM's commands -------------------------------------------------------------------

def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise UsageError(f"{argv[0]} is not on PATH, so SLURM cannot be reached from here; run this on a "
                         "login node of the cluster (or look at the script with --dry-run).") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"{argv[0]} did not answer within {timeout:.0f} s; check the controller with "
                         "`scontrol ping`.") from None
    if result.returncode != 0:
        raise UsageError(failure(argv[0], result.stderr, result.returncode))
    return result


def failure(command: str, stderr: str, code: int) -> str:
    """One sentence for a SLURM command that failed: what is wrong and what to do, where its words say so."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1].split(": ", 1)[-1] if lines else f"exit code {code}"
    if any("Could not establish a configuration source" in line for line in lines):
        return (f"SLURM has no configuration on this machine ({command}: {last}); set SLURM_CONF to the cluster's "
                "slurm.conf, or run this on a login node of the cluster.")
    if any("Unable to contact slurm controller" in line for line in lines):
        return (f"the SLURM controller is not answering ({command}: {last}); check it with `scontrol ping`, or "
                "start the local one with cluster/local/start.sh.")
    return f"{command} failed: {' '.join(lines) or f'exit code {code}'}"


_SUBMIT_COMMAND = ("sbatch", "--parsable")


def submit(script: Path) -> str:
    """Submit the script; return the job id."""
    out = _run([*_SUBMIT_COMMAND, str(script)]).stdout.strip()
    return out.split(";")[0]


def show_jobs(job_id: str) -> list[dict[str, str]]:
    """`scontrol show job -o`: a mapping (JobState, Restarts, StdOut, ...) per line; a job array gives one
    per task it started, and one for the tasks still pending together."""
    if not re.match(r"^\d+(_\d+)?$", job_id):
        raise UsageError(f"{job_id!r} is not a SLURM job id; pass the number sbatch printed (or ARRAY_TASK).")
    try:
        text = _run(["scontrol", "show", "job", "-o", job_id]).stdout
    except UsageError as exc:
        if "Invalid job id" in str(exc):
            raise UsageError(f"SLURM does not know job {job_id} (finished jobs are forgotten after a few minutes); "
                             "its output stays in the run directory's slurm/ folder.") from None
        raise
    return [parse_job_record(line) for line in text.splitlines() if line.strip()]


def show_job(job_id: str) -> dict[str, str]:
    """One job, or one task of a job array (ARRAY_TASK)."""
    records = show_jobs(job_id)
    if len(records) > 1:
        raise UsageError(f"job {job_id} is a job array; name one task, as in {job_id}_0 (`dtrain slurm status "
                         f"{job_id}` lists them).")
    return records[0]


def max_array_size() -> int:
    return parse_max_array_size(_run(["scontrol", "show", "config"]).stdout)


def parse_job_record(text: str) -> dict[str, str]:
    """Parse one line of `key=value` pairs; values may hold spaces only where no `key=` follows."""
    fields: dict[str, str] = {}
    key = None
    for token in text.strip().split(" "):
        name, sep, value = token.partition("=")
        if sep and re.match(r"^[A-Za-z][A-Za-z0-9_:/]*$", name):
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token
    return fields


def cancel(job_id: str) -> None:
    show_job(job_id)
    _run(["scancel", job_id])


def requeue(job_id: str) -> None:
    """Put a running batch job back in the queue; SLURM stops its processes and later starts it again."""
    _run(["scontrol", "requeue", job_id])


_REQUEUED_WAIT_S = 600  # longer than any KillWait: SLURM kills the requeued job's batch script before it ends


def requeue_without(job_id: str, nodes: Sequence[str], needed: int, announce: Callable[[list[str]], None]) -> list[str]:
    """From inside the job (its batch script's dtrain): put it back in the queue, never again on `nodes` nor on
    those it excluded before; the nodes it now excludes. A running job's ExcNodeList cannot change, a pending one's
    can: hold it in the queue, change it, release it. SLURM stops the batch script as it requeues it (SIGTERM,
    SIGKILL after KillWait), so SIGTERM is ignored meanwhile; and the script must not end by itself after that:
    an exit code that reaches SLURM after the requeue marks the requeued job FAILED. It waits to be killed."""
    record = show_job(job_id)
    excluded = sorted(set(hostnames(record.get("ExcNodeList", "")) if record.get("ExcNodeList") != "(null)" else [])
                      | set(nodes))
    partition = record.get("Partition", "")
    left = [n for n in hostnames(_run(["sinfo", "-h", "-p", partition, "-o", "%N"]).stdout.strip())
            if n not in excluded]
    if len(left) < needed:
        raise UsageError(f"without {', '.join(excluded)} partition {partition} has {len(left)} node(s) and the job "
                         f"needs {needed}, so it is not requeued; repair or drain those nodes, then submit it again.")
    announce(excluded)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _run(["scontrol", "requeuehold", job_id])
    deadline = time.monotonic() + 10
    while True:  # accepted once the job is pending
        done = subprocess.run(["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={','.join(excluded)}"],
                              capture_output=True, text=True)
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    _run(["scontrol", "release", job_id])
    print(f"dtrain: slurm job {job_id} now excludes {', '.join(excluded)}.", file=sys.stderr, flush=True)
    time.sleep(_REQUEUED_WAIT_S)
    return excluded


TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED")


def job_state(fields: Mapping[str, str]) -> str:
    return fields.get("JobState", "UNKNOWN")


def describe_job(fields: Mapping[str, str]) -> str:
    """A few lines a user reads first: state, placement, requeues, time, where the output goes."""
    state = job_state(fields)
    reason = fields.get("Reason", "None")
    lines = [
        f"job {fields.get('JobId')} ({fields.get('JobName')}): {state}" + (f" ({reason})" if reason != "None" else ""),
        f"  nodes     {fields.get('NumNodes')} on {fields.get('NodeList', '(none yet)')}",
        f"  requeues  {fields.get('Restarts', '0')}",
        f"  time      {fields.get('RunTime')} of {fields.get('TimeLimit')}",
        f"  output    {fields.get('StdOut')}",
    ]
    stdout = fields.get("StdOut")
    if stdout:
        lines.append(f"  run dir   {Path(stdout).parent.parent}")
    return "\n".join(lines)


def array_indices(text: str) -> list[int]:
    """`2-3,5%2` (an ArrayTaskId or --array value) -> [2, 3, 5]."""
    indices: list[int] = []
    for part in filter(None, text.split("%")[0].split(",")):
        low, _, high = part.partition("-")
        indices += range(int(low), int(high or low) + 1)
    return indices


def array_tasks(records: Sequence[Mapping[str, str]]) -> dict[int, Mapping[str, str]]:
    """Task index -> its record, from `show_jobs` of a job array (the pending tasks' one record split)."""
    return {index: record for record in records for index in array_indices(record.get("ArrayTaskId", ""))}


def describe_array(array_id: str, name: str, runs: Sequence[tuple[int, str, str]],
                   tasks: Mapping[int, Mapping[str, str]]) -> str:
    """A line per run of the sweep: its task's state in SLURM, or (once SLURM has forgotten the task)
    how the run ended, from its run directory. `runs`: (task index, run name, run directory status)."""
    rows = [("task", "job", "state", "requeues", "run")]
    for index, run, run_status in runs:
        record = tasks.get(index)
        if record is None:
            rows.append((str(index), "-", f"({run_status})", "-", run))
            continue
        state, reason = job_state(record), record.get("Reason", "None")
        rows.append((str(index), f"{array_id}_{index}" if "%" in record.get("ArrayTaskId", "") else record["JobId"],
                     state + (f" ({reason})" if reason != "None" else ""), record.get("Restarts", "0"), run))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [f"job array {array_id} ({name}): {len(runs)} tasks"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def read_template(path: str | None) -> str:
    """The template text (default: dtrain's own, shipped in the package; cluster/job.sbatch shows it)."""
    chosen = Path(path) if path else TEMPLATE
    try:
        return chosen.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the sbatch template {chosen} ({exc.strerror}); pass --template PATH.") from None


@dataclasses.dataclass(frozen=True)
class Slurm:
    """Both faces of SLURM, as `dtrain.engines` asks for them."""

    name: str = NAME
    requeues: bool = True
    description: str = "Submit a recipe as a SLURM job, and follow, inspect or cancel it."
    options: tuple[Option, ...] = OPTIONS

    def job(self, environ: Mapping[str, str]) -> Job | None:
        return job(environ)

    def allocation(self, environ: Mapping[str, str]) -> Allocation | None:
        return allocation(environ)

    def requeue(self, job_id: str) -> None:
        requeue(job_id)

    def fan_out(self, where: Allocation, argv: Sequence[str], elastic: bool = False) -> list[str]:
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")  # srun does not inherit sbatch's --cpus-per-task
        return srun_command(where.nodes or 1, argv, int(cpus) if cpus else None, elastic)  # SLURM says how many

    def requeue_without(self, job_id: str, nodes: Sequence[str], needed: int,
                        announce: Callable[[list[str]], None]) -> list[str]:
        return requeue_without(job_id, nodes, needed, announce)

    def render(self, given: Mapping[str, Any], sources: Mapping[str, str], sweep: Sweep | None, workdir: str,
               python: str) -> Submission:
        profile_path = given.get("cluster_profile")
        cluster = load_cluster_profile(profile_path) if profile_path else {}
        job = resolve_job(given, cluster, profile_path)
        template_text = read_template(given.get("template"))
        given = {**given, "nodes": job.nodes, "node_rank": 0, "gpus": job.gpus_per_node or None,
                 "preempt_signal": parse_signal(job.signal)[1],
                 "max_requeues": cluster.get("max_requeues") if given.get("max_requeues") is None
                 else given["max_requeues"]}

        def spec_of(run_options: Mapping[str, Any]) -> LaunchSpec:
            return resolve(run_options, gpus_available=job.gpus_per_node, free_port=DEFAULT_MASTER_PORT,
                           cpu_flags=None, sources=sources)

        if sweep is not None:
            specs = {index: spec_of({**given, **run}) for index, run in sweep.runs}
            indices = list(specs)
            job = dataclasses.replace(job, array=array_spec(indices, sweep.at_once))
            first = specs[indices[0]].replace(name=sweep.name, run_dir=sweep.directory)
            script = render_script(template_text, job, first, python=python, workdir=workdir)
            script_path = job_dir(sweep.directory) / SCRIPT
            files = {str(task_spec_path(sweep.directory, index)): spec.to_json() for index, spec in specs.items()}
            said = (f"submitted job array {{job_id}}: {len(indices)} of the sweep's {sweep.total} runs, "
                       f"{sweep.at_once} at a time, sweep directory {shown(sweep.directory, workdir)}",
                       f"  status  dtrain slurm status {{job_id}}   (one task: dtrain slurm logs {{job_id}}_{indices[0]})")
            return Submission({**files, str(script_path): script}, str(script_path), _SUBMIT_COMMAND + (str(script_path),),
                              said, tasks=tuple(indices))
        name = given.get("name") or default_name(given["recipe"])
        run_dir = os.path.abspath(given.get("run_dir") or Path(workdir) / DEFAULT / name)
        spec = spec_of({**given, "name": name, "run_dir": run_dir})
        script = render_script(template_text, job, spec, python=python, workdir=workdir)
        script_path = job_dir(run_dir) / SCRIPT
        summary = (f"submitted job {{job_id}}: {job.nodes} node(s), run directory {shown(run_dir, workdir)}",
                   f"  script  {shown(script_path, workdir)}",
                   f"  output  {shown(output_path(run_dir, '{job_id}'), workdir)}",
                   "  follow  dtrain slurm logs {job_id} --follow   (status, cancel: dtrain slurm status|cancel {job_id})")
        return Submission({str(spec_path(run_dir)): spec.to_json(), str(script_path): script}, str(script_path),
                          _SUBMIT_COMMAND + (str(script_path),), summary)

    def submit(self, submission: Submission) -> str:
        if submission.tasks:
            check_array_size(max(submission.tasks), max_array_size())
        return submit(Path(submission.script))

    def status(self, job_id: str, sweep_status: Callable[[Path], list[tuple[int, str, str]] | None]) -> str:
        records = show_jobs(job_id)
        if "_" in job_id or not any(record.get("ArrayJobId") == job_id for record in records):
            return describe_job(records[0])
        sweep_dir = Path(records[0].get("StdOut", "")).parent.parent
        runs = sweep_status(sweep_dir) if sweep_dir.name else None
        if runs is None:
            raise UsageError(f"job array {job_id} was not submitted by dtrain (no sweep plan in {sweep_dir}); "
                             "`scontrol show job` describes it.")
        return (describe_array(job_id, records[0].get("JobName", ""), runs, array_tasks(records))
                + f"\n  sweep directory {sweep_dir}")

    def cancel(self, job_id: str) -> None:
        cancel(job_id)

    def logs(self, job_id: str, node: int | None, follow: bool, echo: Callable[[str], None]) -> str | None:
        """The job's one output file (every node's lines, every requeue's), from the run directory."""
        if node is not None:
            raise UsageError("a SLURM job's output file holds every node's lines; leave --node out.")
        fields = show_job(job_id)
        path = Path(fields.get("StdOut", ""))
        offset = 0
        while True:
            if path.is_file():
                with open(path, errors="replace") as fh:
                    fh.seek(offset)
                    echo(fh.read())
                    offset = fh.tell()
            if not follow or job_state(fields) in TERMINAL_STATES:
                break
            time.sleep(1.0)
            fields = show_job(job_id)
        return None if path.is_file() else f"job {job_id} has not written {path} yet ({job_state(fields)})."

    def doctor_facts(self, environ: Mapping[str, str]) -> list[tuple[str, str]]:
        """The SLURM version (sinfo), and the job this runs in."""
        try:
            found = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return [("SLURM", "no sinfo here")]
        version = found.stdout.strip() if found.returncode == 0 else ""
        if not version:
            return [("SLURM", "sinfo here, but it reaches no cluster (SLURM_CONF unset?)")]
        job_id = environ.get("SLURM_JOB_ID")
        where = (f"in job {job_id} ({environ.get('SLURM_JOB_NUM_NODES', '?')} node(s), this one "
                 f"{environ.get('SLURMD_NODENAME', '?')})" if job_id else "not in a job")
        return [("SLURM", f"{version}; {where}")]


ENGINE = Slurm()
