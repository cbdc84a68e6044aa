"""The `dtrain` command line. It must never import torch: `--help` and `--dry-run` stay instant.

Every option comes from the table in `dtrain.core.options`; a command here takes the rows made for it,
resolves them into a LaunchSpec (`dtrain.core.spec`) and acts on that spec.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from dtrain import __version__, engines
from dtrain.core import contract, exports, hardware, options, rundir
from dtrain.core.options import DEBUG, LAUNCH, SUBMIT, SWEEP, Option
from dtrain.core.rundir import RunDir
from dtrain.core.spec import AUTO, DEFAULT_MASTER_PORT, LaunchSpec, decide_precision, dtrain_argv, resolve
from dtrain.core.wandb_mode import wandb_mode
from dtrain.errors import UsageError
from dtrain.launch import launchers

STARTED = time.time()


def _click_option(option: Option) -> Callable[[Callable], Callable]:
    kwargs: dict[str, Any] = {"default": None, "help": option.help}
    if option.multiple:
        kwargs["multiple"] = True
    if option.kind is bool:
        kwargs["is_flag"] = True
    elif option.flag_value is not None:
        kwargs.update(is_flag=False, flag_value=option.flag_value)
    if option.choices:
        kwargs["type"] = click.Choice(option.choices)
    elif option.kind in (int, float):
        kwargs["type"] = option.kind
    if option.metavar:
        kwargs["metavar"] = option.metavar
    return click.option(option.flag, option.name, **kwargs)


def _command_options(command: str, recipe_required: bool = True,
                     extra: tuple[Option, ...] = ()) -> Callable[[Callable], Callable]:
    """RECIPE, its arguments (after `--`), and the table's options for `command` (then `extra`, an engine's), in
    the table's order."""
    def apply(func: Callable) -> Callable:
        for option in reversed(options.for_command(command) + extra):
            func = _click_option(option)(func)
        func = click.argument("recipe_args", nargs=-1, type=click.UNPROCESSED)(func)
        return click.argument("recipe", required=recipe_required)(func)
    return apply


class _Commands(click.Group):
    """dtrain's own commands, and a group for each cluster engine found (`dtrain.engines`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *engines.submitters()])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in engines.submitters():
            command = _engine_group(engines.submitters()[name])
        return command


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtrain")
def cli() -> None:
    """Launch PyTorch training recipes on one CPU, one GPU, many GPUs or many nodes."""


@cli.command()
@_command_options(LAUNCH, recipe_required=False)
@click.pass_context
def launch(ctx: click.Context, profile: str | None, dry_run: bool | None, spec: str | None, **given: Any) -> int:
    """Run RECIPE on every process (torchrun, accelerate or deepspeed). Recipe arguments go after `--`.

    \b
    dtrain launch recipes/mnist_cnn.py --gpus 8
    dtrain launch recipes/mnist_cnn.py --cpu --nproc 2 -- --epochs 1
    """
    allocation = engines.allocation(os.environ)
    if spec is not None:
        launch_spec = _submitted_spec(ctx, spec, allocation, wait=not dry_run)
    else:
        if given["recipe"] is None:
            raise UsageError("dtrain launch needs a RECIPE (a Python training script), or --spec FILE.")
        given, sources = _given(ctx, given, profile, LAUNCH)
        if allocation is not None:
            implied = engines.launch_defaults(allocation, given["recipe"])
            given = {**given, **{k: v for k, v in implied.items() if given.get(k) is None}}
            if allocation.per_node and not dry_run:
                _wait_for_rank0(allocation, options.BY_NAME["rdzv_timeout"].value(given.get("rdzv_timeout")))
        gpus_available = 0 if given.get("cpu") else hardware.visible_gpus()
        launch_spec = resolve(given, gpus_available, hardware.free_port(), route=hardware.route_to, sources=sources,
                              **_precision_facts(given.get("precision"), gpus_available))

    if allocation is not None and not allocation.per_node:
        # In a job (an allocation, or a batch script) but started once for all of it: once per node, by the engine,
        # and this process stays to requeue the job without a node that made it fail.
        engine = engines.submitters()[allocation.engine]
        argv = engine.fan_out(allocation, [*dtrain_argv(), *sys.argv[1:]], elastic=launch_spec.min_nodes is not None)
        if dry_run:
            click.echo(shlex.join(argv))
            return 0
        if shutil.which(argv[0]) is None:
            raise UsageError(f"cannot start {argv[0]} inside {allocation.engine} job {allocation.job_id} (it is not "
                             f"on PATH); put the {allocation.engine} commands on PATH.")
        from dtrain.launch.job import run_across_nodes

        job = engines.job(os.environ)
        assert job is not None  # an allocation is a job's
        return run_across_nodes(launch_spec, argv, engine, job, started=STARTED)

    _check_port(launch_spec, explicit=given.get("master_port") is not None or allocation is not None)
    launch_spec = _resolve_wandb(launch_spec, quiet=bool(dry_run))
    argv, env, files = launchers.build(launch_spec, hardware.cpu_count(), os.environ)
    if sys.stdout.isatty():
        env[contract.TTY] = os.ttyname(sys.stdout.fileno())
    if dry_run:
        for path, text in files.items():
            click.echo(f"# {path}\n{text.rstrip()}\n")
        _echo_origins(given, launch_spec)
        click.echo(_render_command(argv, env, os.environ))
        return 0
    env[contract.LAUNCH_TIME] = f"{STARTED:.3f}"
    if launch_spec.device == "cpu" and spec is None and not given.get("cpu"):
        click.echo("dtrain: no GPU is visible; running 1 CPU process (use --cpu --nproc N for more).", err=True)
    from dtrain.launch.job import probe_run_dir, record_end, run_dir_lock, run_job, write_files

    probe_run_dir(launch_spec.run_dir)
    with run_dir_lock(launch_spec):
        write_files(files)
        if launch_spec.node_rank == 0:
            record_end(launch_spec.run_dir, None)
        code = run_job(launch_spec, argv, env, started=STARTED)
        if launch_spec.node_rank == 0:
            record_end(launch_spec.run_dir, code)
    return code


def _wait_for_rank0(where: engines.Allocation, timeout: int) -> None:
    """Node 0's name may not resolve yet (its pod is starting): wait for it as long as the rendezvous would (not
    for a dry run, which starts nothing)."""
    def say() -> None:
        click.echo(f"dtrain: waiting for rank 0's host {where.first_host} to resolve (at most {timeout} s) ...", err=True)

    if where.nodes != 1 and not hardware.wait_to_resolve(where.first_host, timeout, said=say):
        raise UsageError(f"rank 0's host {where.first_host} did not resolve within --rdzv-timeout {timeout} s: its pod "
                         "or node never came up, or the name is wrong; look at the job's first pod or node.")


def _submitted_spec(ctx: click.Context, path: str, allocation: engines.Allocation | None, wait: bool) -> LaunchSpec:
    """The spec `dtrain <engine> submit` saved, placed on this node of the job."""
    others = [p.opts[0] if isinstance(p, click.Option) else p.human_readable_name for p in ctx.command.params
              if p.name not in ("spec", "dry_run") and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if others:
        raise UsageError(f"--spec FILE holds every option of the job; give no other ({', '.join(others)}).")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the launch spec {path} ({exc.strerror}); `dtrain <engine> submit` writes it "
                         "into the run directory's folder of that engine.") from None
    launch_spec = LaunchSpec.from_json(text, path)
    if allocation is not None and allocation.per_node:
        if wait:
            _wait_for_rank0(allocation, launch_spec.rdzv_timeout)
        launch_spec = engines.place(launch_spec, allocation, route=hardware.route_to)
    elif launch_spec.nodes == 1:  # a sweep's run: its port was free when the sweep began
        launch_spec = launch_spec.replace(master_port=hardware.free_port())
    gpus = hardware.visible_gpus() if launch_spec.device == "cuda" else 0  # nvidia-smi: asked once
    facts = _precision_facts(launch_spec.precision, gpus)
    launch_spec = decide_precision(launch_spec, facts["cpu_flags"], facts["compute_capability"])
    if launch_spec.device == "cuda" and gpus < launch_spec.nproc:
        raise UsageError(f"this node sees {gpus} GPU(s), but the job runs {launch_spec.nproc} "
                         "processes on each; ask the job for them (--gpus-per-node).")
    return launch_spec


@cli.command()
@_command_options(DEBUG)
@click.pass_context
def debug(ctx: click.Context, **given: Any) -> int:
    """Run RECIPE in this process (world size 1, GPU 0 or CPU), so breakpoints and pdb work.

    \b
    dtrain debug recipes/mnist_cnn.py --max-steps 20 -- --epochs 1
    """
    given, sources = _given(ctx, given, None, DEBUG)
    gpus_available = 0 if given.get("cpu") else min(hardware.visible_gpus(), 1)
    launch_spec = resolve(given, gpus_available, free_port=DEFAULT_MASTER_PORT, sources=sources,
                          **_precision_facts(given.get("precision"), gpus_available))
    launch_spec = _resolve_wandb(launch_spec.replace(nproc=1), quiet=False)
    from dtrain.launch.debug import run_in_process
    from dtrain.launch.job import probe_run_dir, run_dir_lock

    probe_run_dir(launch_spec.run_dir)
    with run_dir_lock(launch_spec):
        return run_in_process(launch_spec)


@cli.command()
@_command_options(SWEEP)
@click.pass_context
def sweep(ctx: click.Context, profile: str | None, dry_run: bool | None, grid: tuple[str, ...], draw: tuple[str, ...],
          draws: int | None, sweep_seed: int | None, parallel: int | None, metric: str | None, **given: Any) -> int:
    """Run RECIPE once per combination of --grid values (and --draws random --draw values), each in its own
    run directory under runs/NAME/; the same command again skips finished runs and resumes the others.

    \b
    dtrain sweep recipes/mnist_mlp.py --cpu --grid lr=1e-3,3e-4 --grid batch-size=64,128 --metric eval/accuracy
    """
    from dtrain.launch import sweep as sweeps

    given, sources = _given(ctx, given, profile, SWEEP)
    goal = sweeps.parse_metric(metric) if metric else None
    plan = _plan_sweep(given, grid, draw, draws, sweep_seed)
    runs, name, sweep_dir = plan.runs, plan.name, plan.sweep_dir
    gpus_available = 0 if given.get("cpu") else hardware.visible_gpus()
    facts = _precision_facts(given.get("precision"), gpus_available)
    specs = [resolve(run_given, gpus_available, hardware.free_port(), sources=sources, **facts)
             for run_given in plan.launch_options(given)]
    mode = _resolve_wandb(specs[0], quiet=bool(dry_run)).wandb  # decided once, for every run
    specs = [s.replace(wandb=mode) for s in specs]
    slots = sweeps.slot_devices(specs[0].device, options.BY_NAME["parallel"].value(parallel), specs[0].nproc,
                                gpus_available if specs[0].device == "cuda" else hardware.cpu_count())
    if dry_run:
        click.echo(f"# {_relative(str(sweep_dir))}: {len(runs)} runs, {len(slots)} at a time")
        _echo_origins(given, specs[0])
        for run, launch_spec in zip(runs, specs):
            click.echo(f"{run.name}: dtrain launch {shlex.join([launch_spec.recipe, '--', *launch_spec.recipe_args])}")
        return 0

    from dtrain.launch.job import probe_run_dir, write_files

    probe_run_dir(str(sweep_dir))
    write_files(plan.new_files())
    say = functools.partial(_say_sweep, name)
    commands = []
    for run, launch_spec in zip(runs, specs):
        if sweeps.finished(launch_spec.run_dir):
            say(f"run {run.name}: finished before, skipped")
            continue
        spec_file = launch_spec.paths.spec
        write_files({str(spec_file): launch_spec.to_json()})
        console = launch_spec.paths.console_log if len(slots) > 1 else None
        if console is not None:
            console.parent.mkdir(parents=True, exist_ok=True)
        commands.append((run.name, sweeps.launch_argv(spec_file), console))
    codes, stopped_by = sweeps.start_runs(commands, slots, say)
    _sweep_summary(sweep_dir, runs, goal, required=stopped_by is None, say=say)
    if stopped_by is not None:
        return 128 + stopped_by
    failed = [run for run, code in codes.items() if code != 0]
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)}; their logs/ say why.")
    return 1 if failed else 0


def _say_sweep(name: str, text: str) -> None:
    click.echo(f"dtrain sweep {name}: {text}", err=True)


def _sweep_summary(sweep_dir: Path, runs: list[Any], goal: tuple[str, str] | None, required: bool,
                   say: Callable[[str], None], read: Callable[[Path], list[dict]] | None = None) -> list[dict[str, Any]]:
    """Print the sweep's table (the best run marked by `goal`) and write it as summary.csv and summary.json;
    a metric that no run logged is refused first, when `required`. `read`: a run's rows (default: its
    metrics.jsonl)."""
    from dtrain.core import metrics
    from dtrain.launch import sweep as sweeps
    from dtrain.launch.job import write_files

    rows = sweeps.summary(sweep_dir, runs, read or metrics.read)
    best = sweeps.best(rows, goal, required) if goal else None
    names = sweeps.columns(rows, runs, goal[0] if goal else None)
    write_files({str(sweep_dir / f): text for f, text in sweeps.summary_files(rows, names, best, goal).items()})
    click.echo(sweeps.format_table(rows, names, best))
    if best is not None and goal is not None:
        say(f"best run by {goal[0]} ({goal[1]}): {rows[best]['run']}")
    say(f"summary in {_relative(str(sweep_dir / rundir.SUMMARIES[0]))} and {rundir.SUMMARIES[1]}")
    return rows


@dataclasses.dataclass(frozen=True)
class _SweepPlan:
    runs: list[Any]  # dtrain.launch.sweep.Run
    fixed: tuple[str, ...]
    name: str
    sweep_dir: Path
    record: dict[str, Any]  # sweep.json

    def new_files(self) -> dict[str, str]:
        """sweep.json, unless the sweep directory holds this plan already (another plan there is refused)."""
        from dtrain.launch import sweep as sweeps

        if sweeps.check_same_plan(self.sweep_dir, self.record):
            return {}
        return {str(RunDir.of(self.sweep_dir).plan): json.dumps(self.record, indent=1) + "\n"}

    def own_options(self, given: Mapping[str, Any]) -> list[dict[str, Any]]:
        """What each run sets over the options given: its run directory, name and recipe arguments; W&B's group
        is the sweep's unless given."""
        from dtrain.launch import sweep as sweeps

        return [{"name": f"{self.name}-{run.index:03d}", "run_dir": str(self.sweep_dir / run.name),
                 "recipe_args": sweeps.recipe_args(run, self.fixed),
                 "wandb_group": given.get("wandb_group") or self.name} for run in self.runs]

    def launch_options(self, given: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Each run's options for `resolve`."""
        return [{**given, **own} for own in self.own_options(given)]

    def pending_runs(self, given: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        """(index, own options) of each run that has not finished: what a cluster job of the sweep runs."""
        from dtrain.launch import sweep as sweeps

        return [(run.index, own) for run, own in zip(self.runs, self.own_options(given))
                if not sweeps.finished(own["run_dir"])]


def _plan_sweep(given: Mapping[str, Any], grid: tuple[str, ...], draw: tuple[str, ...], draws: int | None,
                sweep_seed: int | None) -> _SweepPlan:
    """The runs of `dtrain sweep` or a job array, and the sweep directory (--run-dir, or runs/--name, or
    runs/ a name the same command always gives)."""
    from dtrain.launch import sweep as sweeps

    fixed = tuple(given.get("recipe_args") or ())
    runs = sweeps.plan(sweeps.parse_grid(grid), sweeps.parse_draws(draw), options.BY_NAME["draws"].value(draws),
                       options.BY_NAME["sweep_seed"].value(sweep_seed), fixed)
    run_dir = given.get("run_dir")
    name = given.get("name") or (re.sub(r"[^A-Za-z0-9._-]", "_", Path(run_dir).name) if run_dir
                                 else sweeps.default_name(given["recipe"], runs, fixed))
    return _SweepPlan(runs, fixed, name, Path(run_dir or rundir.DEFAULT / name),
                      sweeps.plan_record(given["recipe"], runs, fixed))


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--metric", metavar="NAME[:min|max]", help="For a sweep: the series that marks the best run.")
def report(run_dir: str, metric: str | None) -> int:
    """Plot RUN_DIR's loss, learning rate, accuracy and confusion matrix (PNG, in RUN_DIR/report/) and summarise it.
    For a sweep's directory: the table of its runs (also as summary.csv and .json) and their curves overlaid."""
    from dtrain.core import metrics as metrics_file
    from dtrain.launch import sweep as sweeps
    from dtrain.outputs import report as run_report

    path = Path(run_dir)
    plan = sweeps.read_plan(path)
    if plan is not None:
        goal = sweeps.parse_metric(metric) if metric else None
        runs = sweeps.runs_of(plan)
        curves = {run.name: metrics_file.read(path / run.name) for run in runs
                  if RunDir(path / run.name).metrics.is_file()}
        _sweep_summary(path, runs, goal, required=True, say=lambda text: click.echo(f"dtrain report: {text}", err=True),
                       read=lambda run_dir: curves.get(run_dir.name, []))  # a run without metrics: no values
        click.echo(f"wrote {run_report.plot_sweep(path, curves, goal[0] if goal else None)}")
        return 0
    if metric is not None:
        raise UsageError(f"--metric marks the best run of a sweep, and {run_dir} is one run (no {rundir.PLAN}); "
                         "give a sweep's directory, or leave --metric out.")
    records, evaluations = run_report.read_run(path)
    for png in run_report.plot(path, records, evaluations):
        click.echo(f"wrote {png}")
    click.echo(run_report.summary(path, records, evaluations))
    return 0


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def stack(run_dir: str) -> int:
    """Print the Python stacks of every rank of RUN_DIR's job that runs on this node, without stopping it."""
    from dtrain.core import hangs
    from dtrain.launch.job import ended as ended_record

    debug = RunDir.of(run_dir).debug
    if not hangs.live_ranks(run_dir):
        raise UsageError(f"no rank has announced itself in {debug}; give the run directory of a job that dtrain "
                         "started (runs/NAME).")
    ended = ended_record(run_dir)
    if ended is not None and not hangs.announced_since(run_dir, ended.get("time", 0.0)):
        raise UsageError(f"the job of {run_dir} has ended (exit code {ended.get('exit_code')}); dtrain stack asks a "
                         f"running job for its stacks (a job that hung or failed left its last ones in {debug}).")
    stacks, notes = hangs.dump_live_stacks(run_dir)
    for rank, text in sorted(stacks.items()):
        click.echo(f"=== rank {rank}\n{text.rstrip()}\n")
    for note in notes:
        click.echo(f"dtrain: {note}", err=True)
    return 0 if stacks else 1


@cli.command()
@click.option("--nproc", type=int, help="Also run the preflight on N CPU processes.")
@click.option("--gpus", type=int, help="Also run the preflight on N GPUs.")
@click.option("--runs", default=str(rundir.DEFAULT), show_default=True, help="The folder runs are written to (its free space).")
def doctor(nproc: int | None, gpus: int | None, runs: str) -> int:
    """Versions, GPUs and their topology, network, SLURM and free space; with --nproc or --gpus, a preflight
    (a matmul on every rank, an all-reduce; on every node of a SLURM job run from its batch script) that names
    ranks slower than the others. Exit 1 if it names one."""
    from dtrain.launch import doctor as checks

    if nproc is not None and gpus is not None:
        raise UsageError("--nproc (CPU processes) and --gpus contradict each other; pass one of them.")
    for label, text in checks.versions() + checks.gpus() + checks.network() + checks.engine_facts() + checks.disk(runs):
        click.echo(f"{label:<12} {text}")
    if nproc is None and gpus is None:
        return 0
    devices = ["--cpu", "--nproc", str(nproc)] if nproc is not None else ["--gpus", str(gpus)]
    lines, slow = checks.preflight_lines(checks.run_preflight(devices, runs))
    click.echo("\n".join(lines))
    return 1 if slow else 0


def _engine_group(engine: engines.Submitter) -> click.Group:
    """`dtrain NAME submit|status|cancel|logs` for a cluster engine: the table's options of `submit` and the
    engine's own; the engine renders the job's files and makes the calls."""
    group = click.Group(engine.name, help=engine.description)

    @group.command("submit")
    @_command_options(SUBMIT, extra=engine.options)
    @click.pass_context
    def submit(ctx: click.Context, profile: str | None, dry_run: bool | None, grid: tuple[str, ...],
               draw: tuple[str, ...], draws: int | None, sweep_seed: int | None, parallel: int | None,
               **given: Any) -> int:
        given, sources = _given(ctx, given, profile, SUBMIT)
        sweep = None
        plan: _SweepPlan | None = None
        if grid or draw:
            plan = _plan_sweep(given, grid, draw, draws, sweep_seed)
            plan = dataclasses.replace(plan, sweep_dir=Path(os.path.abspath(plan.sweep_dir)))
            pending = plan.pending_runs(given)
            if not pending:
                click.echo(f"every run of sweep {plan.name} has finished ({_relative(str(plan.sweep_dir))}); "
                           "nothing to submit.")
                return 0
            sweep = engines.Sweep(plan.name, str(plan.sweep_dir), pending, total=len(plan.runs),
                                  at_once=options.BY_NAME["parallel"].value(parallel))
        elif draws is not None or parallel is not None:
            raise UsageError("--draws and --parallel are for a sweep; give --grid or --draw too, or leave them out.")
        submission = engine.render(given, sources, sweep, workdir=os.getcwd(), python=sys.executable)
        if dry_run:
            if submission.kept_by_dry_run:
                from dtrain.launch.job import write_files

                write_files(submission.files)
            for path, text in submission.files.items():
                if path != submission.script:
                    click.echo(f"# {_relative(path)}\n{text}")
            click.echo(submission.files[submission.script], nl=False)
            click.echo(f"# submitting runs: {shlex.join(submission.command)}", err=True)
            return 0
        job_id = _write_and_submit(engine, submission, plan.new_files() if plan is not None else {})
        for line in submission.summary:
            click.echo(line.replace("{job_id}", job_id))
        return 0

    submit.help = (f"Submit RECIPE as a {engine.name} job: the run directory's {engine.name}/ folder gets the job's "
                   "files and the launch spec every node runs. With --grid or --draw, one job for the sweep's runs, "
                   "each in its own run directory.")

    @group.command("status")
    @click.argument("job_id")
    def status(job_id: str) -> int:
        """State, nodes, requeues, time and output file of JOB_ID; for a sweep's job, each run's state."""
        click.echo(engine.status(job_id, _sweep_status))
        return 0

    @group.command("cancel")
    @click.argument("job_id")
    def cancel(job_id: str) -> int:
        """Cancel JOB_ID (every node's processes get SIGTERM, then SIGKILL)."""
        engine.cancel(job_id)
        click.echo(f"cancelled job {job_id}")
        return 0

    @group.command("logs")
    @click.argument("job_id")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job ends.")
    @click.option("--node", type=int, help="The node whose output to print, where the engine keeps one per node "
                                           "(default: node 0).")
    def logs(job_id: str, follow: bool, node: int | None) -> int:
        """Print JOB_ID's output (every requeue's), as the engine keeps it."""
        note = engine.logs(job_id, node, follow, lambda text: click.echo(text, nl=False))
        if note is not None:
            click.echo(f"dtrain: {note}", err=True)
        return 0

    return group


def _sweep_status(sweep_dir: Path) -> list[tuple[int, str, str]] | None:
    """Each run of the sweep planned in `sweep_dir` (index, name, how it ended), or None without a plan there."""
    from dtrain.launch import sweep as sweeps

    plan = sweeps.read_plan(sweep_dir)
    if plan is None:
        return None
    return [(run.index, run.name, sweeps.status(sweep_dir / run.name)) for run in sweeps.runs_of(plan)]


def _write_and_submit(engine: engines.Submitter, submission: engines.Submission, more: Mapping[str, str]) -> str:
    """Write the job's files (and `more`: a sweep's plan), and submit it; if the engine refuses, remove the job's
    files (and the folders made for them) again."""
    from dtrain.launch.job import write_files

    written = [Path(p) for p in {**submission.files, **more}]
    created = sorted({p for path in written for p in path.parents if not p.exists()}, key=lambda p: -len(p.parts))
    write_files({**submission.files, **more})
    try:
        return engine.submit(submission)
    except UsageError:
        for path in written:
            path.unlink()
        for path in created:
            path.rmdir()
        raise


def _relative(path: str) -> str:
    return os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path


@cli.group()
def ckpt() -> None:
    """Inspect and export a run's checkpoints."""


@ckpt.command("ls")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--verify", is_flag=True, help="Re-hash every file against its manifest (reads all the data).")
def ckpt_ls(run_dir: str, verify: bool) -> int:
    """List RUN_DIR's checkpoints: step, epoch, time, size, state and the metrics at that step."""
    from dtrain.core import checkpoints

    click.echo(checkpoints.format_table(_checkpoint_rows(run_dir, checksums=verify)))
    return 0


def _checkpoint_rows(run_dir: str, checksums: bool, only: str | None = None) -> list[dict]:
    from dtrain.core import checkpoints

    rows = checkpoints.describe(checkpoints.checkpoint_root(run_dir), checksums, only)
    if only is not None and not rows:
        raise UsageError(f"{run_dir} has no checkpoint {only}; `dtrain ckpt ls {run_dir}` lists them.")
    if not rows:
        raise UsageError(f"{run_dir} has no checkpoints (looked in {checkpoints.checkpoint_root(run_dir)}).")
    return rows


@ckpt.command("verify")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("checkpoint", required=False)
def ckpt_verify(run_dir: str, checkpoint: str | None) -> int:
    """Re-hash every file of RUN_DIR's checkpoints (or of CHECKPOINT, a step_N name) against its manifest;
    name each damaged file, and exit 1 if any is."""
    rows = _checkpoint_rows(run_dir, checksums=True, only=Path(checkpoint).name if checkpoint else None)
    for row in rows:
        click.echo(f"{row['name']}: {row['state']}")
        for problem in row["problems"]:
            click.echo(f"  {problem}")
    return 1 if any(row["state"] != "verified" for row in rows) else 0


@ckpt.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--step", type=int, default=None, help="Export this step (default: the newest good checkpoint).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Where to write the state_dict file.")
def ckpt_export(run_dir: str, step: int | None, out: str) -> int:
    """The state-dict format of `dtrain export`, by its old name: a checkpoint's model as one plain state_dict file
    (`model.load_state_dict(torch.load(OUT))`), without the recipe and without a check."""
    from dtrain.core import checkpoints, exports

    click.echo(f"dtrain: `dtrain ckpt export` is `dtrain export {run_dir} --format state-dict` now, which also "
               "checks the file against the recipe's model.", err=True)
    name = checkpoints.step_dir_name(step) if step is not None else None
    source, notes = exports.choose_source(Path(run_dir), name)
    for note in notes:
        click.echo(f"dtrain: {note}", err=True)
    from dtrain.runtime.checkpoint import model_weights, save_atomically

    weights = model_weights(source.path)
    try:
        save_atomically(weights, Path(out))
    except OSError as exc:
        raise UsageError(f"cannot write {out} ({exc.strerror or exc}); pass an --out that can be written, with "
                         "room for the model.") from None
    click.echo(f"wrote {out}: {len(weights)} tensors from {source.path}")
    return 0


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--checkpoint", metavar="step_N|model.pth",
              help="The weights to export: a committed checkpoint or the run's final model.pth (default: the newest "
                   "committed checkpoint, else model.pth).")
@click.option("--format", "formats", default=",".join(exports.FORMATS), show_default=True,
              help="The artifacts to write, comma-separated.")
@click.option("--out", type=click.Path(file_okay=False), help="The folder for the artifacts (default: RUN_DIR/export).")
@click.option("--recipe", type=click.Path(dir_okay=False),
              help="The recipe that builds the model (default: the one config.yaml recorded).")
@click.option("--dynamic-batch", is_flag=True, help="Let the batch size of pt2 and onnx vary (default: the example's).")
@click.option("--eval", "evaluate", is_flag=True,
              help="Also run the recipe's evaluation set through the pt2 and onnx artifacts; print their accuracy "
                   "beside the checkpoint's.")
@click.option("--atol", type=click.FloatRange(min=0), default=exports.ATOL, show_default=True,
              help="Absolute tolerance of an artifact's outputs against the trained model's.")
@click.option("--rtol", type=click.FloatRange(min=0), default=exports.RTOL, show_default=True,
              help="Relative tolerance of an artifact's outputs against the trained model's.")
def export_command(run_dir: str, checkpoint: str | None, formats: str, out: str | None, recipe: str | None,
                   dynamic_batch: bool, evaluate: bool, atol: float, rtol: float) -> int:
    """Export RUN_DIR's trained model to deploy: a state_dict, safetensors, a torch.export program (.pt2) and ONNX,
    each loaded back in a fresh process and checked against the model before it is written (docs/deploy.md)."""
    run = Path(run_dir)
    chosen = exports.parse_formats(formats)
    lacking = exports.missing_packages(chosen)
    if lacking:
        raise UsageError(lacking)
    recorded, recipe_args = exports.recorded_recipe(run)
    source, notes = exports.choose_source(run, checkpoint)
    for note in notes:
        click.echo(f"dtrain: {note}", err=True)
    click.echo(f"dtrain: exporting {source.path}", err=True)
    from dtrain.export.exporter import Request, export

    request = Request(source, chosen, Path(out) if out else RunDir(run).exports, Path(recipe) if recipe else recorded,
                      recipe_args, dynamic_batch, evaluate, atol, rtol)
    record = export(request, say=lambda text: click.echo(f"dtrain: {text}", err=True))
    click.echo(exports.format_summary(record))
    click.echo(f"wrote {request.out} ({rundir.EXPORT_RECORD} says what each file is)")
    return 0


def _given(ctx: click.Context, given: dict[str, Any], profile: str | None,
           command: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The options from where a user sets them, the first one found winning: the command line, a DTRAIN_* variable
    of this shell, the profile (`resolve` fills in the defaults); and where each was set."""
    on_line = [name for name in given if name in options.BY_NAME
               and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    from_environment, warnings = contract.options_from_environment(os.environ, command)
    for warning in warnings:
        click.echo(f"dtrain: warning: {warning}", err=True)
    from_profile = _profile_values(ctx, profile) if profile is not None else {}
    merged, sources = dict(given), dict.fromkeys(on_line, contract.COMMAND_LINE)
    for name, value in {**from_profile, **from_environment}.items():  # a variable wins over the profile
        if name not in sources:
            merged[name] = value
            sources[name] = options.BY_NAME[name].variable if name in from_environment else f"profile {profile}"
    return merged, sources


def _profile_values(ctx: click.Context, path: str) -> dict[str, Any]:
    """The profile's options, converted like command-line values."""
    from dtrain.core import profiles

    params = {p.name: p for p in ctx.command.params
              if isinstance(p, click.Option) and p.name not in ("profile", "dry_run", "spec")}
    values = {}
    for key, value in profiles.load(path).items():
        param = params.get(key)
        if param is None:
            near = difflib.get_close_matches(key, params, n=1)
            fix = f"did you mean {near[0]}?" if near else f"known options: {', '.join(sorted(params))}."
            raise UsageError(f"profile {path} has an unknown option {key!r}; {fix}")
        try:
            values[key] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise UsageError(f"profile {path}: {exc.format_message()}") from None
    return values


def _resolve_wandb(launch_spec: LaunchSpec, quiet: bool) -> LaunchSpec:
    """Decide `--wandb auto` here, once, and say so when it means offline or disabled."""
    mode, notice = wandb_mode(launch_spec.wandb, os.environ)
    if notice and not quiet and launch_spec.node_rank == 0:
        click.echo(f"dtrain: {notice}", err=True)
    return launch_spec.replace(wandb=mode)


def _precision_facts(precision: str | None, gpus: int) -> dict[str, Any]:
    """What `--precision auto` (and bf16's check) is decided from, read from this machine only when needed."""
    return {"cpu_flags": hardware.cpu_flags() if precision == AUTO else frozenset(),
            "compute_capability": hardware.min_compute_capability() if gpus and precision in ("bf16", AUTO) else None}


def _check_port(launch_spec: LaunchSpec, explicit: bool) -> None:
    """The rendezvous store binds on node rank 0: fail now, in one sentence, if its port is taken."""
    if launch_spec.node_rank != 0 or not (explicit or launch_spec.nodes > 1):
        return
    if hardware.is_local_address(launch_spec.master_addr) and not hardware.port_is_free(launch_spec.master_port):
        raise UsageError(
            f"port {launch_spec.master_port} is already in use on this machine; pass another --master-port"
            + (" or leave it out to pick a free one." if launch_spec.nodes == 1 else ".")
        )


def _echo_origins(given: Mapping[str, Any], launch_spec: LaunchSpec) -> None:
    """A dry run's `# --timeout 30 (from DTRAIN_TIMEOUT_S)` lines: each value given away from its default."""
    for line in options.origins({**given, **launch_spec.options}, launch_spec.sources):
        click.echo(f"# {line}")


def _render_command(argv: list[str], env: dict[str, str], base: os._Environ | dict) -> str:
    """A shell-pasteable line: the variables dtrain sets (its own always, though the shell had them), then the
    exact argv."""
    changed = [f"{key}={shlex.quote(value)}" for key, value in sorted(env.items())
               if base.get(key) != value or key in contract.VARIABLES]
    return " \\\n  ".join(changed + [shlex.join(argv)])


def main() -> None:
    try:
        code = cli.main(prog_name="dtrain", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.NoSuchOption as exc:
        click.echo(f"dtrain: error: dtrain has no option {exc.option_name}; recipe arguments go after '--', "
                   f"as in: dtrain launch RECIPE --cpu -- {exc.option_name} VALUE", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"dtrain: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except UsageError as exc:
        click.echo(f"dtrain: error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
