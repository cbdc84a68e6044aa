"""The `dtrain` command line. It must never import torch: `--help` and `--dry-run` stay instant."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource

from dtrain import __version__, config, hardware, slurm
from dtrain.errors import UsageError

STARTED = time.time()


def _options(*decorators: Callable) -> Callable[[Callable], Callable]:
    """Apply click decorators in the order they are listed (as they read in --help)."""
    def apply(func: Callable) -> Callable:
        for decorate in reversed(decorators):
            func = decorate(func)
        return func
    return apply


# Options shared by every command that runs a recipe: one name for one thing.
_run_options = _options(
    click.argument("recipe", type=str),
    click.argument("recipe_args", nargs=-1, type=click.UNPROCESSED),
    click.option("--cpu", is_flag=True, default=None, help="Run on CPU processes (gloo), even if GPUs exist."),
    click.option("--precision", type=click.Choice(config.PRECISIONS), default=None,
                 help="Numeric precision: fp32 (default), bf16 autocast, or fp16 autocast with a GradScaler."),
    click.option("--seed", type=int, default=None, help="Base random seed (default 0); rank r uses seed + r."),
    click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (smoke runs)."),
    click.option("--name", default=None, help="Run name: the run directory is runs/NAME (default: recipe-timestamp)."),
    click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="Run directory (overrides runs/NAME)."),
    click.option("--checkpoint-every", default=None,
                 help="When to checkpoint: N steps, epoch (default), N,epoch, or never."),
    click.option("--keep-last", type=int, default=None, help="Keep only the newest K committed checkpoints."),
    click.option("--resume", default=None,
                 help="auto (default: continue from the run directory's newest checkpoint), never, "
                      "or a checkpoints/step_N folder."),
    click.option("--async-checkpoint", is_flag=True, default=None,
                 help="Write checkpoints in the background while training goes on."),
    click.option("--wandb", type=click.Choice(config.WANDB_MODES), default=None,
                 help="Weights & Biases from rank 0: auto (default: online with credentials, else offline), "
                      "online, offline, disabled."),
    click.option("--wandb-project", default=None, help=f"W&B project (default {config.DEFAULT_WANDB_PROJECT})."),
    click.option("--wandb-entity", default=None, help="W&B entity (team or user)."),
    click.option("--wandb-group", default=None, help="W&B group (default: the run name for multi-node jobs)."),
    click.option("--tags", default=None, help="W&B tags, comma-separated."),
    click.option("--strategy", type=click.Choice(config.STRATEGIES), default=None,
                 help="ddp (default), fsdp (FSDP2: fully_shard per block), or DeepSpeed ZeRO stage 1, 2 or 3."),
    click.option("--grad-accum", type=int, default=None,
                 help="Accumulate gradients over N micro-batches per optimizer step (default 1)."),
    click.option("--activation-checkpointing", is_flag=False, flag_value="auto", default=None,
                 metavar="[CLASS,...]",
                 help="Recompute these blocks' activations in backward; no value: the recipe's blocks."),
    click.option("--deepspeed-config", default=None, metavar="JSON",
                 help="DeepSpeed config for the ZeRO strategies (default launch/deepspeed/zeroN.json); "
                      "must agree with --strategy, --precision and --grad-accum."),
)

# Options of the commands that start processes through a launcher (`launch`, `slurm submit`).
_job_options = _options(
    click.option("--launcher", type=click.Choice(config.LAUNCHERS), default=None,
                 help="What starts the processes: torchrun (default), accelerate launch, or the deepspeed launcher."),
    click.option("--nproc", type=int, default=None, help="CPU processes per node (with --cpu)."),
    click.option("--nodes", type=int, default=None, help="Number of nodes (default 1)."),
    click.option("--max-restarts", type=int, default=None, help="Restart the whole group up to K times when a worker dies."),
    click.option("--max-requeues", type=int, default=None,
                 help=f"Under SLURM, requeue the job at most K times on the pre-timeout signal "
                      f"(default {config.DEFAULT_MAX_REQUEUES})."),
    click.option("--profile", type=str, default=None, help="YAML file of these options (see launch/); the command line wins."),
    click.option("--dry-run", is_flag=True, help="Print what would run, run nothing."),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtrain")
def cli() -> None:
    """Launch PyTorch training recipes on one CPU, one GPU, many GPUs or many nodes."""


@cli.command()
@_run_options
@click.option("--gpus", type=int, default=None, help="GPUs (= processes) per node; default: every visible GPU.")
@_job_options
@click.option("--node-rank", type=int, default=None, help="This node's rank, 0 .. nodes-1 (under srun: SLURM_NODEID).")
@click.option("--master-addr", default=None,
              help="Rendezvous host: node rank 0's address (default 127.0.0.1; under SLURM the job's first node).")
@click.option("--master-port", type=int, default=None,
              help="Rendezvous port (default: a free port on one node, 29500 on many, from the job id under SLURM).")
@click.option("--preempt-signal", default=None,
              help=f"Signal that makes every rank checkpoint and stop (default {config.DEFAULT_PREEMPT_SIGNAL}); "
                   "under SLURM rank 0 then requeues the job.")
@click.pass_context
def launch(ctx: click.Context, profile: str | None, dry_run: bool, **options: Any) -> int:
    """Run RECIPE on every process (torchrun, accelerate or deepspeed). Recipe arguments go after `--`.

    \b
    dtrain launch recipes/mnist_cnn.py --gpus 8
    dtrain launch recipes/mnist_cnn.py --cpu --nproc 2 -- --epochs 1
    """
    if profile is not None:
        options = _apply_profile(ctx, profile, options)
    explicit_port = options.get("master_port") is not None
    allocation = slurm.allocation(os.environ)
    if allocation is not None:
        implied = slurm.launch_defaults(allocation, options["recipe"])
        options = {**options, **{k: v for k, v in implied.items() if options.get(k) is None}}
    gpus_available = 0 if options.get("cpu") else hardware.visible_gpus()
    capability = hardware.min_compute_capability() if gpus_available and options.get("precision") == "bf16" else None
    spec = config.resolve(options, gpus_available, hardware.free_port(), compute_capability=capability)

    if allocation is not None and not allocation.in_step:
        # In an allocation (salloc, or an sbatch script) but not in a step: one task per node via srun.
        argv = slurm.srun_command(allocation.nodes, [sys.executable, "-m", "dtrain.cli", *sys.argv[1:]])
        if dry_run:
            click.echo(shlex.join(argv))
            return 0
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise UsageError(f"cannot start srun inside SLURM job {allocation.job_id} ({exc.strerror}); "
                             "put SLURM's commands on PATH.") from None

    _check_port(spec, explicit_port or allocation is not None)
    from dtrain import launchers

    spec = _resolve_wandb(spec, quiet=dry_run)
    argv, env, files = launchers.build(spec, hardware.cpu_count(), os.environ)
    if sys.stdout.isatty():
        env[config.ENV_TTY] = os.ttyname(sys.stdout.fileno())
    if dry_run:
        for path, text in files.items():
            click.echo(f"# {path}\n{text.rstrip()}\n")
        click.echo(_render_command(argv, env, os.environ))
        return 0
    env[config.ENV_LAUNCH_TIME] = f"{STARTED:.3f}"
    if spec.device == "cpu" and not options.get("cpu"):
        click.echo("dtrain: no GPU is visible; running 1 CPU process (use --cpu --nproc N for more).", err=True)
    from dtrain.job import run_job, write_files

    write_files(files)
    return run_job(argv, env, spec.launcher_log, preempt_signal=spec.preempt_signal,
                   rank_prefixes=spec.launcher == "torchrun")


@cli.command()
@_run_options
def debug(**options: Any) -> int:
    """Run RECIPE in this process (world size 1, GPU 0 or CPU), so breakpoints and pdb work.

    \b
    dtrain debug recipes/mnist_cnn.py --max-steps 20 -- --epochs 1
    """
    gpus_available = 0 if options.get("cpu") else min(hardware.visible_gpus(), 1)
    spec = config.resolve(options, gpus_available, free_port=config.DEFAULT_MASTER_PORT)
    spec = _resolve_wandb(dataclasses.replace(spec, nproc=1), quiet=False)
    from dtrain.debug import run_in_process

    return run_in_process(spec)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir: str) -> int:
    """Plot RUN_DIR's loss, learning rate, accuracy and confusion matrix (PNG, in RUN_DIR/report/) and summarise it."""
    from dtrain import report as run_report

    path = Path(run_dir)
    records, evaluations = run_report.read_run(path)
    for png in run_report.plot(path, records, evaluations):
        click.echo(f"wrote {png}")
    click.echo(run_report.summary(path, records, evaluations))
    return 0


@cli.group("slurm")
def slurm_group() -> None:
    """Submit a recipe as a SLURM job, and follow, inspect or cancel it."""


@slurm_group.command("submit")
@_run_options
@click.option("--gpus-per-node", type=int, default=None, help="GPUs (= processes) per node.")
@_job_options
@click.option("--cpus-per-task", type=int, default=None, help="CPUs for each node's launcher and its processes.")
@click.option("--mem", default=None, help="Memory per node, as sbatch takes it (64G).")
@click.option("--time", "time_limit", default=None, help="Time limit: minutes, HH:MM:SS or D-HH:MM:SS.")
@click.option("--partition", default=None)
@click.option("--account", default=None)
@click.option("--qos", default=None)
@click.option("--constraint", default=None)
@click.option("--exclusive", is_flag=True, default=None, help="Do not share the nodes with other jobs.")
@click.option("--signal", default=None,
              help=f"Pre-timeout signal, [B:]NAME@SECONDS (default {slurm.DEFAULT_SIGNAL}): checkpoint and requeue.")
@click.option("--cluster-profile", default=None, help="cluster/NAME.yaml: partition, account, GPUs per node, modules, setup.")
@click.option("--template", default=None, help=f"sbatch template (default {slurm.TEMPLATE.parent.name}/{slurm.TEMPLATE.name}).")
@click.pass_context
def slurm_submit(ctx: click.Context, profile: str | None, dry_run: bool, cluster_profile: str | None,
                 template: str | None, time_limit: str | None, **options: Any) -> int:
    """Render an sbatch script for RECIPE into runs/NAME/slurm/job.sbatch and submit it.

    \b
    dtrain slurm submit recipes/mnist_cnn.py --nodes 4 --gpus-per-node 8 --time 02:00:00
    dtrain slurm submit recipes/mnist_cnn.py --nodes 2 --cpu --nproc 1 --dry-run -- --epochs 1
    """
    if profile is not None:
        options = _apply_profile(ctx, profile, options)
    cluster = slurm.load_cluster_profile(cluster_profile) if cluster_profile else {}
    job = slurm.resolve_job({**options, "time": time_limit}, cluster, cluster_profile, cpu=bool(options.get("cpu")))
    template_text = slurm.read_template(template)

    name = options.get("name") or config.default_name(options["recipe"])
    run_dir = os.path.abspath(options.get("run_dir") or os.path.join("runs", name))
    _, preempt_signal, _ = slurm.parse_signal(job.signal)
    launch_options = {**options, "name": name, "run_dir": run_dir, "nodes": job.nodes, "node_rank": 0,
                      "gpus": job.gpus_per_node or None, "preempt_signal": preempt_signal,
                      "max_requeues": cluster.get("max_requeues") if options.get("max_requeues") is None
                      else options["max_requeues"]}
    spec = config.resolve(launch_options, gpus_available=job.gpus_per_node, free_port=config.DEFAULT_MASTER_PORT)
    script = slurm.render_script(template_text, job, spec, python=sys.executable, workdir=os.getcwd())
    if dry_run:
        click.echo(script, nl=False)
        return 0

    slurm_dir = Path(run_dir) / "slurm"
    created = [p for p in (slurm_dir, *slurm_dir.parents) if not p.exists()]  # removed again if sbatch fails
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script_path = slurm_dir / "job.sbatch"
    script_path.write_text(script)
    files = config.launch_files(spec)  # read by every node's `dtrain launch`
    from dtrain.job import write_files

    write_files(files)
    try:
        job_id = slurm.submit(script_path)
    except UsageError:
        for path in [script_path, *map(Path, files)]:
            path.unlink()
        for path in created:
            path.rmdir()
        raise
    click.echo(f"submitted job {job_id}: {job.nodes} node(s), run directory {_relative(run_dir)}")
    click.echo(f"  script  {_relative(str(script_path))}")
    click.echo(f"  output  {_relative(str(slurm.output_path(run_dir, job_id)))}")
    click.echo(f"  follow  dtrain slurm logs {job_id} --follow   (status, cancel: dtrain slurm status|cancel {job_id})")
    return 0


@slurm_group.command("status")
@click.argument("job_id")
def slurm_status(job_id: str) -> int:
    """State, nodes, requeues, time and output file of JOB_ID."""
    click.echo(slurm.describe_job(slurm.show_job(job_id)))
    return 0


@slurm_group.command("cancel")
@click.argument("job_id")
def slurm_cancel(job_id: str) -> int:
    """Cancel JOB_ID (every node's processes get SIGTERM, then SIGKILL)."""
    slurm.cancel(job_id)
    click.echo(f"cancelled job {job_id}")
    return 0


@slurm_group.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new output until the job ends.")
def slurm_logs(job_id: str, follow: bool) -> int:
    """Print JOB_ID's output file (all nodes, every requeue), from the run directory."""
    import time

    fields = slurm.show_job(job_id)
    path = Path(fields.get("StdOut", ""))
    offset = 0
    while True:
        if path.is_file():
            with open(path, errors="replace") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            click.echo(chunk, nl=False)
        if not follow or slurm.job_state(fields) in slurm.TERMINAL_STATES:
            break
        time.sleep(1.0)
        fields = slurm.show_job(job_id)
    if not path.is_file():
        click.echo(f"dtrain: job {job_id} has not written {path} yet ({slurm.job_state(fields)}).", err=True)
    return 0


def _relative(path: str) -> str:
    return os.path.relpath(path) if path.startswith(os.getcwd() + os.sep) else path


@cli.group()
def ckpt() -> None:
    """Inspect and export a run's checkpoints."""


@ckpt.command("ls")
@click.argument("run_dir", type=click.Path(file_okay=False))
def ckpt_ls(run_dir: str) -> int:
    """List RUN_DIR's checkpoints: step, epoch, time, size, state and the metrics at that step."""
    from dtrain import checkpoints

    rows = checkpoints.describe(checkpoints.checkpoint_root(run_dir))
    if not rows:
        raise UsageError(f"{run_dir} has no checkpoints (looked in {checkpoints.checkpoint_root(run_dir)}).")
    click.echo(checkpoints.format_table(rows))
    return 0


@ckpt.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--step", type=int, default=None, help="Export this step (default: the newest good checkpoint).")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Where to write the state_dict file.")
def ckpt_export(run_dir: str, step: int | None, out: str) -> int:
    """Write a checkpoint's model as a plain state_dict (`model.load_state_dict(torch.load(OUT))`)."""
    from dtrain import checkpoints

    if step is None:
        choice = checkpoints.choose_for_resume(run_dir, "auto")
        for note in choice.notes:
            click.echo(f"dtrain: {note}", err=True)
        if choice.path is None:
            raise UsageError(f"{run_dir} has no committed checkpoint to export.")
        path = choice.path
    else:
        path = checkpoints.checkpoint_root(run_dir) / checkpoints.step_dir_name(step)
        if not path.is_dir():
            raise UsageError(f"{run_dir} has no checkpoint for step {step}; `dtrain ckpt ls {run_dir}` lists them.")
    from dtrain.runtime.checkpoint import export_model

    count = export_model(path, Path(out))
    click.echo(f"wrote {out}: {count} tensors from {path}")
    return 0


def _apply_profile(ctx: click.Context, path: str, options: dict[str, Any]) -> dict[str, Any]:
    """Fill options the command line did not set from the profile, converted like CLI values."""
    params = {p.name: p for p in ctx.command.params if isinstance(p, click.Option)}
    merged = dict(options)
    for key, value in config.load_profile(path).items():
        param = params.get(key)
        if param is None or key in ("profile", "dry_run"):
            known = ", ".join(sorted(k for k in params if k not in ("profile", "dry_run")))
            raise UsageError(f"profile {path} has an unknown option {key!r}; known options: {known}.")
        if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE:
            continue
        try:
            merged[key] = param.type_cast_value(ctx, value)
        except click.BadParameter as exc:
            raise UsageError(f"profile {path}: {exc.format_message()}") from None
    return merged


def _resolve_wandb(spec: config.LaunchSpec, quiet: bool) -> config.LaunchSpec:
    """Decide `--wandb auto` here, once, and say so when it means offline or disabled."""
    mode, notice = config.wandb_mode(spec.wandb, os.environ)
    if notice and not quiet and spec.node_rank == 0:
        click.echo(f"dtrain: {notice}", err=True)
    return dataclasses.replace(spec, wandb=mode)


def _check_port(spec: config.LaunchSpec, explicit: bool) -> None:
    """The rendezvous store binds on node rank 0: fail now, in one sentence, if its port is taken."""
    if spec.node_rank != 0 or not (explicit or spec.nodes > 1):
        return
    if hardware.is_local_address(spec.master_addr) and not hardware.port_is_free(spec.master_port):
        raise UsageError(
            f"port {spec.master_port} is already in use on this machine; pass another --master-port"
            + (" or leave it out to pick a free one." if spec.nodes == 1 else ".")
        )


def _render_command(argv: list[str], env: dict[str, str], base: os._Environ | dict) -> str:
    """A shell-pasteable line: the variables dtrain sets, then the exact argv."""
    changed = [f"{key}={shlex.quote(value)}" for key, value in sorted(env.items()) if base.get(key) != value]
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
