"""The `dtrain` command line as a user meets it: no torch import, clear errors, profiles, dry runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, run_dtrain

NO_TORCH_PROBE = """
import sys, time
start = time.perf_counter()
from dtrain.cli import cli
for args in {args}:
    try:
        cli.main(args, prog_name="dtrain", standalone_mode=False)
    except SystemExit:
        pass
print(f"{{time.perf_counter() - start:.3f}}", "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [
    [["--help"]],
    [["launch", "--help"], ["debug", "--help"]],
    [["launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--dry-run", "--", "--epochs", "1"]],
    [["slurm", "--help"], ["slurm", "submit", "--help"]],
    [["slurm", "submit", "recipes/mnist_cnn.py", "--nodes", "4", "--gpus-per-node", "8", "--dry-run"]],
    [["sweep", "recipes/mnist_mlp.py", "--cpu", "--grid", "lr=1e-3,3e-4", "--dry-run"]],
    [["export", "--help"], ["ckpt", "export", "--help"]],
])
def test_help_and_dry_run_never_import_torch(args):
    out = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE.format(args=repr(args))],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    seconds, torch_loaded = out.stdout.split()[-2:]
    assert torch_loaded == "False", out.stdout
    print(f"{args}: {seconds} s in-process")


def test_dry_run_prints_the_exact_command_and_environment(tmp_path):
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--precision", "bf16",
                     "--run-dir", str(tmp_path / "r"), "--dry-run", "--", "--epochs", "1", "--lr", "a b")
    assert out.returncode == 0, out.stderr
    assert "DTRAIN_PRECISION=bf16" in out.stdout and f"DTRAIN_RUN_DIR={tmp_path / 'r'}" in out.stdout
    assert "-m dtrain.launch.agent --nproc 2 --master-addr 127.0.0.1" in out.stdout  # one node: dtrain's own agent
    assert out.stdout.rstrip().endswith("recipes/mnist_cnn.py --epochs 1 --lr 'a b'")
    assert not (tmp_path / "r").exists(), "a dry run must not create the run directory"


@pytest.mark.parametrize("key, fix", [("nprocs", "did you mean nproc?"),
                                      ("colour", "known options: activation_checkpointing, async_checkpoint,")])
def test_a_profile_key_that_is_no_option_is_named_with_the_nearest_one(tmp_path, key, fix):
    profile = tmp_path / "p.yaml"
    profile.write_text(f"{key}: 2\n")
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--profile", str(profile), "--dry-run")
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith(f"dtrain: error: profile {profile} has an unknown option {key!r}; {fix}"), out.stderr


def test_stack_of_a_job_that_has_ended_says_so_and_signals_no_one(tmp_path):
    """The ranks' pids are gone, or belong to other processes now: nothing is sent to them."""
    from dtrain.core.hangs import announced_since, stacks_header
    from dtrain.core.rundir import RunDir

    RunDir(tmp_path).rank_stacks(0).parent.mkdir()
    RunDir(tmp_path).rank_stacks(0).write_text(stacks_header(0, 1, socket.gethostname()))  # pid 1: init, alive
    os.utime(RunDir(tmp_path).rank_stacks(0), (1000.0, 1000.0))
    assert announced_since(tmp_path, 999.0) and not announced_since(tmp_path, 1000.0)  # a later `dtrain debug`: asked
    (tmp_path / "ended.json").write_text('{"exit_code": 0, "time": 1001.0}')
    out = run_dtrain("stack", str(tmp_path))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == (f"dtrain: error: the job of {tmp_path} has ended (exit code 0); dtrain stack asks a running "
                          f"job for its stacks (a job that hung or failed left its last ones in {tmp_path / 'debug'}).\n")


def test_the_command_line_wins_over_a_variable_of_the_shell_which_wins_over_the_profile(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("cpu: true\nnproc: 2\nprecision: fp16\nseed: 5\ntimeout: 50\n")
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--profile", str(profile), "--precision", "bf16",
                     "--name", "p", "--dry-run", env={"DTRAIN_TIMEOUT_S": "30", "DTRAIN_PRECISION": "fp32"})
    assert out.returncode == 0, out.stderr
    assert "-m dtrain.launch.agent --nproc 2" in out.stdout
    assert "DTRAIN_PRECISION=bf16" in out.stdout and "DTRAIN_SEED=5" in out.stdout
    assert "DTRAIN_TIMEOUT_S=30" in out.stdout
    assert out.stdout.splitlines()[:6] == [
        f"# --cpu (from profile {profile})", "# --precision bf16 (from the command line)",
        f"# --seed 5 (from profile {profile})", "# --name p (from the command line)",
        "# --timeout 30 (from DTRAIN_TIMEOUT_S)", f"# --nproc 2 (from profile {profile})"]


def test_shipped_profiles_are_valid():
    for profile in sorted((ROOT / "launch").glob("*.yaml")):
        out = run_dtrain("launch", "recipes/mnist_cnn.py", "--profile", str(profile), "--cpu", "--dry-run")
        assert out.returncode == 0, f"{profile.name}: {out.stderr}"


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def bad_inputs(tmp_path, busy_port):
    (tmp_path / "broken.yaml").write_text("cpu: true\nnproc: [2\n")
    (tmp_path / "unknown.yaml").write_text("gpu: 2\n")
    (tmp_path / "wrongtype.yaml").write_text("nproc: two\n")
    return {
        "gpus without GPU": (["recipes/mnist_cnn.py", "--gpus", "8"], "none is visible on this machine"),
        "missing recipe": (["recipes/nope.py", "--cpu"], "recipe recipes/nope.py does not exist"),
        "unknown precision": (["recipes/mnist_cnn.py", "--precision", "fp8"], "'fp8' is not one of"),
        "nproc 0": (["recipes/mnist_cnn.py", "--cpu", "--nproc", "0"], "--nproc must be at least 1"),
        "malformed profile": (["recipes/mnist_cnn.py", "--profile", str(tmp_path / "broken.yaml")], "not valid YAML"),
        "unknown profile key": (["recipes/mnist_cnn.py", "--profile", str(tmp_path / "unknown.yaml")],
                                "unknown option 'gpu'"),
        "profile wrong type": (["recipes/mnist_cnn.py", "--profile", str(tmp_path / "wrongtype.yaml")],
                               "'two' is not a valid integer"),
        "missing profile": (["recipes/mnist_cnn.py", "--profile", "launch/nope.yaml"], "does not exist"),
        "port in use": (["recipes/mnist_cnn.py", "--cpu", "--master-port", str(busy_port)],
                        f"port {busy_port} is already in use"),
        "recipe option before --": (["recipes/mnist_cnn.py", "--cpu", "--epochs", "1"], "dtrain has no option --epochs; recipe arguments go after '--'"),
    }


@pytest.mark.parametrize("case", [
    "gpus without GPU", "missing recipe", "unknown precision", "nproc 0", "malformed profile",
    "unknown profile key", "profile wrong type", "missing profile", "port in use", "recipe option before --",
])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_bad_input_gets_one_sentence_and_a_nonzero_exit(tmp_path, busy_port, case, dry_run):
    args, words = bad_inputs(tmp_path, busy_port)[case]
    # No GPU is visible in every case (on a GPU machine too): "--gpus 8" must find none.
    out = run_dtrain("launch", *args, *(["--dry-run"] if dry_run else []), "--run-dir", str(tmp_path / "run"),
                     env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: "), out.stderr
    assert words in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_submitted_spec_launches_alone_with_the_variables_read_when_it_was_submitted(tmp_path):
    submit = run_dtrain("slurm", "submit", "recipes/mnist_cnn.py", "--cpu", "--run-dir", str(tmp_path / "r"),
                        "--dry-run", "--", "--epochs", "1", env={"DTRAIN_TIMEOUT_S": "30"})
    assert submit.returncode == 0, submit.stderr
    spec_text = submit.stdout.split("\n", 1)[1].split("\n#!/bin/bash", 1)[0]
    (tmp_path / "spec.json").write_text(spec_text)
    # sbatch exports the submitting shell to the job: a variable there (changed since, or misspelt) is not read again
    out = run_dtrain("launch", "--spec", str(tmp_path / "spec.json"), "--dry-run",
                     env={"DTRAIN_TIMEOUT_S": "45", "DTRAIN_TIMOUT_S": "1"})
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.rstrip().endswith("recipes/mnist_cnn.py --epochs 1")
    assert "DTRAIN_TIMEOUT_S=30" in out.stdout and """DTRAIN_SOURCES='{"timeout": "DTRAIN_TIMEOUT_S"}'""" in out.stdout
    refused = run_dtrain("launch", "--spec", str(tmp_path / "spec.json"), "--cpu", "--dry-run")
    assert refused.returncode == 2
    assert refused.stderr.strip() == "dtrain: error: --spec FILE holds every option of the job; give no other (--cpu)."
