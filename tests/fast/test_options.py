"""The option table is the one source: the click commands, the spec's defaults, the workers'
environment and its reader, and the documented contract all agree with it."""

from __future__ import annotations

import click
import pytest

from dtrain import contract, options
from dtrain.cli import cli
from dtrain.options import OPTIONS, SPEC_OPTIONS, WORKER_OPTIONS
from dtrain.spec import resolve

from conftest import GPU_GROUP, ROOT

RECIPE = str(ROOT / "recipes" / "mnist_cnn.py")
GROUPS = sorted({option.group for option in OPTIONS if option.group})


def examples(group: str | None) -> dict:
    """Every example value that may go with `group`'s (as typed on a command line)."""
    return {o.name: o.example for o in OPTIONS if o.example is not None and o.group in (None, group)}


def command(name: str) -> click.Command:
    return {"launch": cli.commands["launch"], "debug": cli.commands["debug"],
            "submit": cli.commands["slurm"].commands["submit"]}[name]


@pytest.mark.parametrize("name", ["launch", "debug", "submit"])
def test_each_command_takes_exactly_its_rows_with_their_flags(name):
    params = {p.name: p for p in command(name).params if isinstance(p, click.Option)}
    rows = options.for_command(name)
    assert list(params) == [row.name for row in rows]
    for row in rows:
        param = params[row.name]
        assert param.opts == [row.flag] and param.help == row.help
        assert param.is_flag == (row.kind is bool)
        assert tuple(getattr(param.type, "choices", ())) == (row.choices or ())


def test_every_worker_option_has_a_variable_an_example_other_than_its_default_and_at_most_two_groups():
    assert all(option.env and option.env.startswith("DTRAIN_") for option in WORKER_OPTIONS)
    assert len({option.env for option in WORKER_OPTIONS}) == len(WORKER_OPTIONS)
    for option in WORKER_OPTIONS:
        assert option.example is not None and option.value(option.example) != option.default, option.name
    assert len(GROUPS) <= 3


@pytest.mark.parametrize("group", [group for group in GROUPS if group != GPU_GROUP])
def test_command_line_to_spec_to_environment_to_worker_and_back(group):
    """Every example through click's parsing of `dtrain launch`, the spec, the variables and
    `read_env`: each worker option arrives as the value the launch resolved."""
    argv = [RECIPE] + [word for name, value in examples(group).items() for word in options.BY_NAME[name].argv(value)]
    given = command("launch").make_context("launch", argv).params
    launch_spec = resolve(given, gpus_available=0, free_port=29400)
    assert launch_spec.options == resolve(
        {"recipe": RECIPE, **{name: options.BY_NAME[name].value(value) for name, value in examples(group).items()}},
        gpus_available=0, free_port=29400).options
    worker = contract.read_env(contract.worker_env(launch_spec, cpus=2, base={}))
    for option in WORKER_OPTIONS:
        expected = options.BY_NAME[option.name].value(option.example) if option.name in examples(group) \
            else launch_spec.options[option.name]
        assert worker.options[option.name] == launch_spec.options[option.name] == expected, option.name
    assert (worker.device, worker.run_dir, worker.launched_world_size) == ("cpu", launch_spec.run_dir, 2)


def test_the_gpu_groups_examples_reach_the_worker_of_a_one_gpu_run():
    argv = [RECIPE, "--gpus", "1"] + [word for option in OPTIONS if option.group == GPU_GROUP
                                      for word in option.argv(option.example)]
    launch_spec = resolve(command("launch").make_context("launch", argv).params, gpus_available=1, free_port=29400)
    worker = contract.read_env(contract.worker_env(launch_spec, cpus=2, base={}))
    assert worker.device == "cuda"
    for option in OPTIONS:
        if option.group == GPU_GROUP:
            assert worker.options[option.name] == launch_spec.options[option.name] == option.value(option.example)


def test_defaults_come_from_the_table():
    launch_spec = resolve({"recipe": RECIPE, "cpu": True, "nproc": 2}, gpus_available=0, free_port=29400)
    assert list(launch_spec.options) == [option.name for option in SPEC_OPTIONS]
    assert launch_spec.options == {option.name: option.default for option in SPEC_OPTIONS}
    one = resolve({"recipe": RECIPE, "cpu": True}, gpus_available=0, free_port=29400)
    assert one.options == {**launch_spec.options, "launcher": "direct"}  # one process needs no launcher
    worker = contract.read_env({})
    assert worker.options == {option.name: option.default for option in WORKER_OPTIONS}


def test_the_documented_contract_is_the_table():
    """docs/architecture.md holds `python -m dtrain.contract`'s table, once; the README points there."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert text.count(contract.markdown_table()) == 1, "rewrite the table with: python -m dtrain.contract"
    readme = (ROOT / "README.md").read_text()
    assert not any(option.env in readme for option in WORKER_OPTIONS)
