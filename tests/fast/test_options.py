"""The option table is the one source: the click commands, the spec's defaults, the workers'
environment and its reader, and the documented contract all agree with it."""

from __future__ import annotations

import json
import re
import shlex

import click
import pytest

from dtrain.cli import cli
from dtrain.core import contract, options
from dtrain.core.hardware import free_port
from dtrain.core.options import OPTIONS, SPEC_OPTIONS, WORKER_OPTIONS
from dtrain.core.spec import resolve
from dtrain.engines import slurm

from conftest import GPU_GROUP, ROOT

RECIPE = str(ROOT / "recipes" / "mnist_cnn.py")
GROUPS = sorted({option.group for option in OPTIONS if option.group})


def examples(group: str | None) -> dict:
    """Every example value that may go with `group`'s (as typed on a command line)."""
    return {o.name: o.example for o in OPTIONS if o.example is not None and o.group in (None, group)}


def command(name: str) -> click.Command:
    if name == "submit":
        return cli.get_command(click.Context(cli), "slurm").commands["submit"]
    return cli.commands[name]


@pytest.mark.parametrize("name", ["launch", "debug", "submit"])
def test_each_command_takes_exactly_its_rows_with_their_flags(name):
    """The table's rows for the command, in its order (then, for `slurm submit`, the engine's own rows)."""
    params = {p.name: p for p in command(name).params if isinstance(p, click.Option)}
    rows = options.for_command(name) + (slurm.OPTIONS if name == "submit" else ())
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
    assert launch_spec.options == {**{option.name: option.default for option in SPEC_OPTIONS}, "launcher": "local"}
    worker = contract.read_env({})
    assert worker.options == {option.name: option.default for option in WORKER_OPTIONS}


def test_the_documented_contract_is_the_table():
    """docs/architecture.md holds `python -m dtrain.core.contract`'s table, once; the README repeats none of it."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert text.count(contract.markdown_table()) == 1, "rewrite the table with: python -m dtrain.core.contract"
    readme = (ROOT / "README.md").read_text()
    assert not any(option.env in readme for option in WORKER_OPTIONS)



def run_launch(monkeypatch, capsys, argv: list[str], environ: dict[str, str]) -> tuple[int, str, str]:
    """`dtrain launch ARGV --dry-run` through the real entry point, in this process, with `environ` exported: its exit
    code, stdout and stderr."""
    from dtrain.cli import main

    with monkeypatch.context() as shell:
        for key, value in environ.items():
            shell.setenv(key, value)
        shell.setattr("sys.argv", ["dtrain", "launch", *argv, "--dry-run"])
        with pytest.raises(SystemExit) as exit_:
            main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def workers_variables(out: str) -> dict[str, str]:
    """The variables a dry run prints before the command (after any file it would write): what every worker gets
    from dtrain."""
    command = out[re.search(r"^[A-Z][A-Z0-9_]*=", out, re.M).start():]
    words = shlex.split(command.replace("\\\n", " "))
    return dict(word.split("=", 1) for word in words[:next(n for n, word in enumerate(words) if "=" not in word)])


def origins(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("# --")]


def devices_for(group: str | None, monkeypatch) -> list[str]:
    """The GPU group's examples need one GPU process: a GPU count and its capability are what this machine cannot
    have, so they are the two facts mocked."""
    if group != GPU_GROUP:
        return ["--cpu", "--nproc", "2"]
    monkeypatch.setattr("dtrain.core.hardware.visible_gpus", lambda: 1)
    monkeypatch.setattr("dtrain.core.hardware.min_compute_capability", lambda: 9.0)
    return ["--gpus", "1"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_worker_options_variable_in_the_shell_reaches_the_workers_as_its_flag_does(monkeypatch, capsys, group):
    monkeypatch.chdir(ROOT)  # the examples' paths are the repository's
    base = [RECIPE, *devices_for(group, monkeypatch), "--name", "env", "--master-port", str(free_port())]
    chosen = [o for o in WORKER_OPTIONS if (o.group == group if group == GPU_GROUP else o.name in examples(group))]
    exported = {o.env: o.encode(o.value(o.example)) for o in chosen}
    code, by_flags, err = run_launch(monkeypatch, capsys, [*base, *(w for o in chosen for w in o.argv(o.example))], {})
    assert code == 0, err
    code, by_variables, err = run_launch(monkeypatch, capsys, base, exported)
    assert (code, err) == (0, "")
    flag_env, variable_env = workers_variables(by_flags), workers_variables(by_variables)
    assert variable_env.pop(contract.SOURCES) != flag_env.pop(contract.SOURCES)
    assert variable_env == flag_env  # every worker variable, and the command
    assert by_variables.splitlines()[-1] == by_flags.splitlines()[-1]
    set_away = [o for o in chosen if o.value(o.example) != o.default]
    assert json.loads(workers_variables(by_variables)[contract.SOURCES]) == {o.name: o.env for o in set_away}
    assert json.loads(workers_variables(by_flags)[contract.SOURCES]) == {o.name: contract.COMMAND_LINE for o in set_away}
    assert [line for line in origins(by_variables) if "(from DTRAIN_" in line] == [
        f"# {o.shown(o.value(o.example))} (from {o.env})" for o in set_away]

    # A flag given as well wins: each option whose default is a value, given as a flag (a flag's variable set to 0).
    flagged = [o for o in chosen if o.default not in (None, ())]
    flags = [w for o in flagged for w in o.argv(True if o.kind is bool else o.default)]
    against = {**exported, **{o.env: "0" for o in flagged if o.kind is bool}}
    code, both, err = run_launch(monkeypatch, capsys, [*base, *flags], against)
    assert code == 0, err
    code, alone, err = run_launch(monkeypatch, capsys, [*base, *flags], {})
    assert code == 0, err
    assert flagged and all(workers_variables(both)[o.env] == workers_variables(alone)[o.env] for o in flagged)


@pytest.mark.parametrize("variable, sentence", [
    ("DTRAIN_TIMEOUT_S=abc", "DTRAIN_TIMEOUT_S='abc' is not a whole number, which --timeout takes, e.g. 120; fix or "
                             "unset DTRAIN_TIMEOUT_S."),
    ("DTRAIN_TIMEOUT_S=0", "--timeout must be at least 1, got 0 (from DTRAIN_TIMEOUT_S='0'); fix or unset "
                           "DTRAIN_TIMEOUT_S."),
    ("DTRAIN_PRECISION=fp8", "unknown --precision 'fp8'; use one of fp32, bf16, fp16, auto (from "
                             "DTRAIN_PRECISION='fp8'); fix or unset DTRAIN_PRECISION."),
    ("DTRAIN_ASYNC_CHECKPOINT=maybe", "DTRAIN_ASYNC_CHECKPOINT='maybe' is not 1 or 0, which --async-checkpoint "
                                      "takes; fix or unset DTRAIN_ASYNC_CHECKPOINT."),
])
def test_a_malformed_variable_is_one_sentence_naming_it(monkeypatch, capsys, variable, sentence):
    assert run_launch(monkeypatch, capsys, [RECIPE, "--cpu"], dict([variable.split("=", 1)])) == (
        2, "", f"dtrain: error: {sentence}\n")


def test_a_misspelt_variable_is_named_with_the_nearest_and_ignored(monkeypatch, capsys):
    code, out, err = run_launch(monkeypatch, capsys, [RECIPE, "--cpu", "--name", "env"],
                                {"DTRAIN_TIMOUT_S": "30", "DTRAIN_DATA_DIR": "/data"})
    assert code == 0 and workers_variables(out)["DTRAIN_TIMEOUT_S"] == "600"
    assert err == ("dtrain: warning: DTRAIN_TIMOUT_S is not a variable dtrain reads, and is ignored; did you mean "
                   "DTRAIN_TIMEOUT_S?\n")


def test_the_typed_fields_are_the_tables_rows():
    """dtrain/core/fields.py, which LaunchSpec and WorkerEnv inherit, is what the table generates today."""
    committed = (ROOT / "dtrain" / "core" / "fields.py").read_text()
    assert committed == options.fields_module(), "regenerate it: python -m dtrain.core.options > dtrain/core/fields.py"
