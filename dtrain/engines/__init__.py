"""Cluster engines: what runs a job on many machines (SLURM; a third party's through an entry point).

An engine is one module with two faces (as submitit keeps both faces of SLURM in one file, and torchx has
one module per scheduler):
- the worker face, read inside a job: which job this is (its id, how often it was requeued, this
  node's name and the ranks when the engine starts the workers itself), where the job's nodes meet
  (`allocation`), and how to put the job back in the queue (`requeue`);
- the launch face, for engines that submit: their options (rows like the one table's), the files a
  job needs (pure: `render`), and the few calls to the scheduler (submit, status, cancel, logs, the
  facts `dtrain doctor` prints). An engine that only places (a cloud launcher that starts
  `dtrain launch` on every machine with the placement in the environment) has the worker face only.

Engines are found in `BUILTIN` and in the `dtrain.engines` entry-point group (name = "module:object"),
so an engine installs as a package of its own; `dtrain <engine> ...` is made from what is found.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from dtrain.core.contract import Job
from dtrain.core.spec import LaunchSpec, toward
from dtrain.errors import UsageError

if TYPE_CHECKING:
    from dtrain.core.options import Option

GROUP = "dtrain.engines"
BUILTIN = {"slurm": "dtrain.engines.slurm:ENGINE", "k8s": "dtrain.engines.k8s:ENGINE",
           "skypilot": "dtrain.engines.skypilot:ENGINE"}


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Where `dtrain launch` runs inside a job: the placement the engine gives each node."""

    engine: str
    job_id: str
    nodes: int | None  # None: the engine does not say (a hand-written JobSet's pods), and --nodes does
    node_rank: int
    first_host: str  # where the nodes meet: node rank 0
    master_port: int
    per_node: bool = True  # started once per node; False: once for the whole job (a batch script), see `fan_out`

    @property
    def group(self) -> str:
        """The W&B group of the job's runs."""
        return f"{self.engine}-{self.job_id}"


@dataclasses.dataclass(frozen=True)
class Submission:
    """What `dtrain <engine> submit` writes before it submits: every file, and which one the engine submits."""

    files: Mapping[str, str]  # path -> text: the spec(s) the nodes launch and the engine's own job files
    script: str  # the file the engine submits
    command: tuple[str, ...] = ()  # what submitting it runs (`--dry-run` shows it)
    summary: Sequence[str] = ()  # what to tell the user once submitted; "{job_id}" is filled in
    kept_by_dry_run: bool = False  # --dry-run writes the files too (manifests to apply by hand), and submits none
    tasks: tuple[int, ...] = ()  # a job array's task indices


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep submitted as one job (an array): each run not finished yet, with its own options."""

    name: str
    directory: str
    runs: Sequence[tuple[int, Mapping[str, Any]]]  # (index in the plan, the run's options: name, run_dir, ...)
    total: int  # runs in the plan, finished ones included
    at_once: int


@runtime_checkable
class Engine(Protocol):
    """The worker face; `Submitter` adds the launch face."""

    name: str  # its command group (`dtrain NAME ...`) and its folder in a run directory
    requeues: bool  # a preempted job goes back in the queue by `requeue`; False: the engine starts it again itself

    def job(self, environ: Mapping[str, str]) -> Job | None:
        """The job this process runs in, or None outside one of this engine's."""

    def allocation(self, environ: Mapping[str, str]) -> Allocation | None:
        """Where this `dtrain launch` runs in the job, or None outside one."""

    def requeue(self, job_id: str) -> None:
        """Put the running job back in the queue after a preemption checkpoint (where `requeues`)."""


@runtime_checkable
class Submitter(Engine, Protocol):
    description: str  # one line: the command group's help
    options: tuple[Option, ...]  # its own options of `submit`, beside the table's (scope "engine")

    def fan_out(self, where: Allocation, argv: Sequence[str], elastic: bool = False) -> list[str]:
        """A command that runs `argv` once on every node of the allocation (for a launch started once per job); with
        `elastic` (--min-nodes), one that goes on when a node's copy fails."""

    def requeue_without(self, job_id: str, nodes: Sequence[str], needed: int,
                        announce: Callable[[list[str]], None]) -> list[str]:
        """From the job's own launch (the one that fanned out): put the failed job back in the queue, never again on
        `nodes` nor on those it excluded before; `announce(all it excludes now)` just before, and return them (an
        engine that stops this process as it requeues the job, as SLURM does, never returns). UsageError, before
        anything changes, when that would leave fewer than `needed` nodes or the engine cannot."""

    def render(self, given: Mapping[str, Any], sources: Mapping[str, str], sweep: Sweep | None, workdir: str,
               python: str) -> Submission:
        """The job's files for the options given (pure but for reading the files they name): one run, or one job
        for the runs of a sweep. Raises UsageError for what the engine cannot run."""

    def submit(self, submission: Submission) -> str:
        """Submit the written job; its id."""

    def status(self, job_id: str, sweep_status: Callable[[Path], list[tuple[int, str, str]] | None]) -> str:
        """A few lines about the job; `sweep_status` reads a sweep directory's runs (index, name, how it ended)."""

    def cancel(self, job_id: str) -> None: ...

    def logs(self, job_id: str, node: int | None, follow: bool, echo: Callable[[str], None]) -> str | None:
        """Show the job's output through `echo` (a node's, where the engine keeps one per node; `node` None: the
        engine's default); with `follow`, until the job ends. A note when there was none to show."""

    def doctor_facts(self, environ: Mapping[str, str]) -> list[tuple[str, str]]:
        """(label, text) lines for `dtrain doctor`."""


def _entry_points() -> dict[str, str]:
    return {point.name: point.value for point in importlib.metadata.entry_points(group=GROUP)}


def _load(name: str, target: str) -> Engine:
    module, _, attribute = target.partition(":")
    try:
        engine = getattr(importlib.import_module(module), attribute)
    except Exception as exc:  # whatever a third party's module raises: one sentence, never dtrain's traceback
        raise UsageError(f"engine {name} ({target}) cannot be loaded ({type(exc).__name__}: {exc}); reinstall the "
                         "package that provides it, or uninstall it.") from None
    if not isinstance(engine, Engine) or engine.name != name:
        raise UsageError(f"engine {name} ({target}) is not a dtrain engine named {name!r}; fix its entry point.")
    return engine


_FOUND: dict[str, Engine] = {}


def available() -> dict[str, Engine]:
    """Every engine, by name: the built-in ones, then those installed (a built-in name is not replaced)."""
    if not _FOUND:
        _FOUND.update({name: _load(name, target) for name, target in {**_entry_points(), **BUILTIN}.items()})
    return _FOUND


def submitters() -> dict[str, Submitter]:
    return {name: engine for name, engine in available().items() if isinstance(engine, Submitter)}


def get(name: str) -> Engine:
    try:
        return available()[name]
    except KeyError:
        raise UsageError(f"no engine named {name!r} is installed; known: {', '.join(available())}.") from None


def job(environ: Mapping[str, str]) -> Job | None:
    """The job this worker runs in, by the first engine that knows it."""
    return next((found for engine in available().values() if (found := engine.job(environ)) is not None), None)


def allocation(environ: Mapping[str, str]) -> Allocation | None:
    """Where this `dtrain launch` runs, by the first engine whose job it is in."""
    return next((found for engine in available().values() if (found := engine.allocation(environ)) is not None),
                None)


def shown(path: str | Path, workdir: str) -> str:
    """A path as a submit's summary shows it: relative to where the command ran, when it lies under it."""
    path = str(path)
    return path[len(workdir) + 1:] if path.startswith(workdir + "/") else path


def launch_defaults(where: Allocation, recipe: str) -> dict[str, Any]:
    """The `dtrain launch` options a job implies; the command line still wins over them."""
    implied = {"nodes": where.nodes, "node_rank": where.node_rank, "master_addr": where.first_host,
               "master_port": where.master_port, "name": f"{Path(recipe).stem}-{where.job_id}", "wandb_group": where.group}
    return {name: value for name, value in implied.items() if value is not None}


def place(spec: LaunchSpec, where: Allocation,
          route: Callable[[str], tuple[str, str] | None] = lambda host: None) -> LaunchSpec:
    """A submitted spec on this node of the job: everything as submitted, but the placement (and, for
    many nodes, this node's address and interface toward the first one: `route`, as `spec.resolve`)."""
    if where.nodes is not None and where.nodes != spec.nodes:
        raise UsageError(f"the {where.engine} job runs this step on {where.nodes} node(s), but {spec.run_dir} was "
                         f"submitted for {spec.nodes}; start it on {spec.nodes} node(s).")
    return spec.replace(node_rank=where.node_rank, master_addr=where.first_host, master_port=where.master_port,
                        network=toward(where.first_host, route) if spec.nodes > 1 else None,
                        wandb_group=spec.wandb_group or where.group)

