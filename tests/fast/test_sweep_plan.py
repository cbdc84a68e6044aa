"""The sweep's deciders: grid and draws parsed, the plan, names, which runs are finished, the summary and the
best run; and bad input on the command line: one sentence, exit 2, nothing written."""

from __future__ import annotations

import json
import random

import pytest

from dtrain.core.rundir import RunDir
from dtrain.errors import UsageError
from dtrain.launch import sweep

from conftest import run_dtrain


def test_the_plan_is_every_combination_in_order_with_its_recipe_arguments():
    runs = sweep.plan(sweep.parse_grid(["lr=1e-3,3e-4", "--batch-size=64,128"]), {}, None, 0, ["--epochs", "1"])
    assert [r.params for r in runs] == [{"lr": "1e-3", "batch-size": "64"}, {"lr": "1e-3", "batch-size": "128"},
                                        {"lr": "3e-4", "batch-size": "64"}, {"lr": "3e-4", "batch-size": "128"}]
    assert [r.name for r in runs][:2] == ["000_lr=1e-3_batch-size=64", "001_lr=1e-3_batch-size=128"]
    assert sweep.recipe_args(runs[3], ["--epochs", "1"]) == ("--lr", "3e-4", "--batch-size", "128", "--epochs", "1")


def test_draws_are_seeded_within_their_range_and_whole_for_whole_bounds():
    draws = sweep.parse_draws(["lr=1e-4:1e-2:log", "layers=2:6"])
    first = sweep.plan(sweep.parse_grid(["wd=0,0.1"]), draws, 3, seed=5, fixed_args=[])
    again = sweep.plan(sweep.parse_grid(["wd=0,0.1"]), draws, 3, seed=5, fixed_args=[])
    other = sweep.plan(sweep.parse_grid(["wd=0,0.1"]), draws, 3, seed=6, fixed_args=[])
    assert len(first) == 6 and first == again and first != other
    assert all(1e-4 <= float(r.params["lr"]) <= 1e-2 and r.params["layers"] in {"2", "3", "4", "5", "6"}
               for r in first)
    logs = [sweep.Draw(1e-4, 1e-2, log=True, whole=False).sample(random.Random(s)) for s in range(400)]
    assert 0.35 < sum(float(x) < 1e-3 for x in logs) / 400 < 0.65  # log-uniform: half below the geometric middle


def test_the_same_command_names_the_same_sweep_and_another_grid_another():
    runs = sweep.plan({"lr": ["1", "2"]}, {}, None, 0, [])
    assert sweep.default_name("recipes/mnist_mlp.py", runs, ["--epochs", "1"]) == \
        sweep.default_name("recipes/mnist_mlp.py", list(runs), ["--epochs", "1"])
    assert sweep.default_name("recipes/mnist_mlp.py", runs, []).startswith("mnist_mlp-sweep-")
    assert sweep.default_name("recipes/mnist_mlp.py", runs, []) != sweep.default_name("recipes/mnist_mlp.py", runs[:1], [])


@pytest.mark.parametrize("grid, draws, count, fixed, words", [
    (["lr"], [], None, [], "is not KEY=V1,V2"),
    (["lr="], [], None, [], "is not KEY=V1,V2"),
    (["lr=1,,2"], [], None, [], "is not KEY=V1,V2"),
    (["=1,2"], [], None, [], "does not start with a recipe argument's name"),
    (["lr=1", "lr=2"], [], None, [], "--grid names lr twice"),
    (["lr=1,2"], ["lr=1:2"], 2, [], "lr is in both --grid and --draw"),
    (["lr=1,2"], [], None, ["--lr", "3"], "--lr is both swept and fixed"),
    (["lr=1,2"], [], None, ["--lr=3"], "--lr is both swept and fixed"),
    ([], ["lr=2:1"], 2, [], "LOW < HIGH"),
    ([], ["lr=0:1:log"], 2, [], "LOW > 0 for log"),
    ([], ["lr=1:2:exp"], 2, [], "is not KEY=LOW:HIGH"),
    ([], ["lr=1:2"], None, [], "--draw needs --draws N"),
    (["lr=1,2"], [], 3, [], "--draws needs at least one --draw"),
    ([], [], None, [], "a sweep needs --grid"),
])
def test_a_bad_grid_or_draw_is_one_sentence(grid, draws, count, fixed, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        sweep.plan(sweep.parse_grid(grid), sweep.parse_draws(draws), count, 0, fixed)


def test_a_sweep_directory_keeps_its_plan(tmp_path):
    runs = sweep.plan({"lr": ["1", "2"]}, {}, None, 0, [])
    record = sweep.plan_record("r.py", runs, [])
    assert sweep.check_same_plan(tmp_path, record) is False
    RunDir(tmp_path).plan.write_text(json.dumps(record))
    assert sweep.check_same_plan(tmp_path, record) is True
    assert sweep.runs_of(sweep.read_plan(tmp_path)) == runs
    with pytest.raises(UsageError, match="holds a sweep of other runs"):
        sweep.check_same_plan(tmp_path, sweep.plan_record("r.py", runs[:1], []))


def test_a_run_is_finished_only_when_its_last_launch_exited_0(tmp_path):
    assert sweep.status(tmp_path) == "not run" and not sweep.finished(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    assert sweep.status(tmp_path) == "running or stopped"
    for code, said in ((130, "interrupted"), (1, "failed (exit 1)"), (0, "finished")):
        RunDir(tmp_path).ended.write_text(json.dumps({"exit_code": code}))
        assert sweep.status(tmp_path) == said and sweep.finished(tmp_path) == (code == 0)


ROWS = [
    {"step": 10, "kind": "startup", "startup_s": 4.0},
    {"step": 10, "kind": "train", "train/loss": 0.9, "lr": 0.1},
    {"step": 20, "kind": "train", "train/loss": 0.5, "lr": 0.1},
    {"step": 20, "kind": "epoch", "epoch": 1, "eval/accuracy": 0.91},
    {"step": 20, "kind": "system", "compute_s/max": 0.1},
]


def test_the_summary_has_each_runs_arguments_status_and_final_values(tmp_path):
    runs = sweep.plan({"lr": ["1e-3", "3e-3"]}, {}, None, 0, [])
    other = [{**r, "eval/accuracy": 0.95} if "eval/accuracy" in r else r for r in ROWS]
    rows = sweep.summary(tmp_path, runs, read=lambda d: ROWS if d.name.startswith("000") else other)
    assert rows[0] == {"run": "000_lr=1e-3", "--lr": "1e-3", "status": "not run", "train/loss": 0.5, "lr": 0.1,
                       "epoch": 1, "eval/accuracy": 0.91, "step": 20}
    assert sweep.best(rows, sweep.parse_metric("eval/accuracy")) == 1
    assert sweep.best(rows, sweep.parse_metric("train/loss")) in (0, 1)
    assert sweep.parse_metric("train/loss") == ("train/loss", "min")
    assert sweep.parse_metric("eval/accuracy:min") == ("eval/accuracy", "min")
    names = sweep.columns(rows, runs, "eval/accuracy")
    assert names == ["run", "--lr", "status", "step", "eval/accuracy", "train/loss"]
    table = sweep.format_table(rows, names, 1).splitlines()
    assert table[2].startswith("* 001_lr=3e-3") and not table[1].startswith("*")
    files = sweep.summary_files(rows, names, 1, ("eval/accuracy", "max"))
    assert files["summary.csv"].splitlines()[2] == "001_lr=3e-3,3e-3,not run,20,0.95,0.5,1"
    assert json.loads(files["summary.json"])["best"] == "001_lr=3e-3"
    with pytest.raises(UsageError, match="no run of this sweep logged 'eval/acc'; pass --metric with one of "
                                         "eval/accuracy, train/loss"):
        sweep.best(rows, ("eval/acc", "max"))
    assert sweep.best(rows, ("eval/acc", "max"), required=False) is None
    with pytest.raises(UsageError, match="is not NAME, NAME:min or NAME:max"):
        sweep.parse_metric("eval/accuracy:best")


def test_runs_at_once_get_their_own_gpus_or_share_of_cpus():
    assert sweep.slot_devices("cuda", 2, 2, 4) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert sweep.slot_devices("cpu", 2, 1, 8) == [{"OMP_NUM_THREADS": "4"}] * 2
    with pytest.raises(UsageError, match="need 6 GPUs and 4 are visible; pass --parallel 2"):
        sweep.slot_devices("cuda", 3, 2, 4)
    with pytest.raises(UsageError, match="need 4 cores and this machine has 2; pass --parallel 1"):
        sweep.slot_devices("cpu", 2, 2, 2)


@pytest.mark.parametrize("args, words", [
    (["--grid", "lr=1,2", "--grid", "lr=3"], "--grid names lr twice"),
    (["--grid", "lr:1,2"], "is not KEY=V1,V2"),
    (["--grid", "lr=1,2", "--parallel", "999"], "--parallel 999 runs of 1 CPU process(es) need 999 cores"),
    (["--grid", "lr=1,2", "--metric", "acc:best"], "is not NAME, NAME:min or NAME:max"),
    (["--grid", "lr=1,2", "--", "--lr", "3"], "--lr is both swept and fixed"),
])
def test_bad_sweep_input_is_one_sentence_and_writes_nothing(tmp_path, args, words):
    out = run_dtrain("sweep", "recipes/mnist_mlp.py", "--cpu", "--run-dir", str(tmp_path / "s"), *args)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("dtrain: error: ") and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert words in out.stderr
    assert not (tmp_path / "s").exists()


def test_a_dry_run_lists_each_run_and_writes_nothing(tmp_path):
    out = run_dtrain("sweep", "recipes/mnist_mlp.py", "--cpu", "--run-dir", str(tmp_path / "s"), "--grid",
                     "lr=1e-3,3e-4", "--dry-run", "--", "--epochs", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1:] == [
        "# --cpu (from the command line)", f"# --run-dir {tmp_path / 's'} (from the command line)",
        "000_lr=1e-3: dtrain launch recipes/mnist_mlp.py -- --lr 1e-3 --epochs 1",
        "001_lr=3e-4: dtrain launch recipes/mnist_mlp.py -- --lr 3e-4 --epochs 1"]
    assert not (tmp_path / "s").exists()
