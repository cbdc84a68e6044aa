"""The `dtrain` command line. It must never import torch: `--help` and `--dry-run` stay instant."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from typing import Any, Callable

import click
from click.core import ParameterSource

from dtrain import __version__, config, hardware
from dtrain.errors import UsageError


def _common_options(func: Callable) -> Callable:
    """Options shared by `launch` and `debug`: one name for one thing."""
    decorators = [
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
        click.argument("recipe_args", nargs=-1, type=click.UNPROCESSED),
        click.argument("recipe", type=str),
    ]
    for decorate in decorators:
        func = decorate(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtrain")
def cli() -> None:
    """Launch PyTorch training recipes on one CPU, one GPU, many GPUs or many nodes."""


@cli.command()
@_common_options
@click.option("--gpus", type=int, default=None, help="GPUs (= processes) per node; default: every visible GPU.")
@click.option("--nproc", type=int, default=None, help="CPU processes per node (with --cpu).")
@click.option("--nodes", type=int, default=None, help="Number of nodes (default 1).")
@click.option("--node-rank", type=int, default=None, help="This node's rank, 0 .. nodes-1.")
@click.option("--master-addr", default=None, help="Rendezvous host: node rank 0's address (default 127.0.0.1).")
@click.option("--master-port", type=int, default=None,
              help="Rendezvous port (default: a free port on one node, 29500 on many).")
@click.option("--max-restarts", type=int, default=None, help="Restart the whole group up to K times when a worker dies.")
@click.option("--profile", type=str, default=None, help="YAML file of these options (see launch/); the command line wins.")
@click.option("--dry-run", is_flag=True, help="Print the command and environment, run nothing.")
@click.pass_context
def launch(ctx: click.Context, profile: str | None, dry_run: bool, **options: Any) -> int:
    """Run RECIPE on every process through torchrun. Recipe arguments go after `--`.

    \b
    dtrain launch recipes/mnist_cnn.py --gpus 8
    dtrain launch recipes/mnist_cnn.py --cpu --nproc 2 -- --epochs 1
    """
    if profile is not None:
        options = _apply_profile(ctx, profile, options)
    gpus_available = 0 if options.get("cpu") else hardware.visible_gpus()
    spec = config.resolve(options, gpus_available, hardware.free_port())
    _check_port(spec, options.get("master_port") is not None)

    from dtrain.launchers import torchrun

    argv, env = torchrun.build_command(spec, hardware.cpu_count(), os.environ)
    if dry_run:
        click.echo(_render_command(argv, env, os.environ))
        return 0
    if spec.device == "cpu" and not options.get("cpu"):
        click.echo("dtrain: no GPU is visible; running 1 CPU process (use --cpu --nproc N for more).", err=True)
    from dtrain.job import run_job

    return run_job(argv, env, spec.log_dir)


@cli.command()
@_common_options
def debug(**options: Any) -> int:
    """Run RECIPE in this process (world size 1, GPU 0 or CPU), so breakpoints and pdb work.

    \b
    dtrain debug recipes/mnist_cnn.py --max-steps 20 -- --epochs 1
    """
    gpus_available = 0 if options.get("cpu") else min(hardware.visible_gpus(), 1)
    spec = config.resolve(options, gpus_available, free_port=config.DEFAULT_MASTER_PORT)
    spec = dataclasses.replace(spec, nproc=1)
    from dtrain.debug import run_in_process

    return run_in_process(spec)


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
    from pathlib import Path

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
