"""One process on one node runs without a launcher (`direct`): the same run directory, logs, exit codes,
failure reports and Ctrl-C as under torchrun's agent, which `--launcher torchrun` still picks, and as under
dtrain's own agent (`local`, the default for more processes on one node)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DTRAIN, ROOT, TEST_RECIPES, processes_with_env, run_dtrain

LAUNCHERS = {"direct": (), "torchrun": ("--launcher", "torchrun"), "local": ("--launcher", "local")}
AGENTS = ("torch.distributed.run", "dtrain.launch.agent")


def tree(run_dir: Path) -> set[str]:
    """The run directory's files, with the launcher's log folder named alike (torchrun adds a random id)."""
    names = set()
    for path in run_dir.rglob("*"):
        if path.is_file():
            parts = list(path.relative_to(run_dir).parts)
            if len(parts) > 2 and parts[0] == "logs" and parts[2].startswith("attempt_"):
                parts[1] = "<name>_<id>"
            names.add("/".join(parts))
    return names


def rank0_log(run_dir: Path, stream: str) -> str:
    return "".join(p.read_text() for p in (run_dir / "logs").glob(f"*/attempt_0/0/{stream}.log"))


def test_the_run_directory_console_and_logs_are_the_agents(tmp_path, data_dir):
    runs = {}
    for name, launcher in LAUNCHERS.items():
        out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--wandb", "disabled", "--run-dir",
                         str(tmp_path / name), "--checkpoint-every", "10", *launcher, "--", "--epochs", "1",
                         "--limit-train-batches", "20", "--limit-eval-batches", "4", "--log-every", "10",
                         "--data-dir", data_dir)
        assert out.returncode == 0, out.stderr
        runs[name] = out
    direct = tmp_path / "direct"
    assert "logs/<name>_<id>/attempt_0/0/stdout.log" in tree(direct)
    assert "Epoch 1/1" in rank0_log(direct, "stdout")
    epoch_line = [line for line in runs["direct"].stdout.splitlines() if line.startswith("Epoch 1/1")]
    for agent in (tmp_path / "torchrun", tmp_path / "local"):
        assert tree(direct) == tree(agent)
        for stream in ("stdout", "stderr"):
            lines = [line.split(" | ")[0] for line in rank0_log(direct, stream).splitlines()]
            assert lines == [line.split(" | ")[0] for line in rank0_log(agent, stream).splitlines()], stream
        assert epoch_line == [line for line in runs[agent.name].stdout.splitlines() if line.startswith("Epoch 1/1")]
    assert (direct / "logs" / "launcher.log").read_text() == ""  # no launcher, no launcher lines
    assert (tmp_path / "local" / "logs" / "launcher.log").read_text() == ""  # dtrain's agent is silent


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_exit_codes_and_failures_are_reported_alike(tmp_path, launcher):
    args = LAUNCHERS[launcher]
    code = run_dtrain("launch", str(TEST_RECIPES / "report_process.py"), "--cpu", "--run-dir", str(tmp_path / "code"),
                      *args, env={"EXIT_CODE": "3"})
    assert code.returncode == 3, code.stderr
    assert "rank=0 world=1" in code.stdout
    raised = run_dtrain("launch", str(TEST_RECIPES / "fail_on_rank1.py"), "--cpu", "--run-dir", str(tmp_path / "raise"),
                        *args, env={"FAIL_RANK": "0"})
    assert raised.returncode == 1
    assert "dtrain: rank 0 failed first (ValueError: rank 0 exploded on purpose)" in raised.stderr, raised.stderr
    assert (raised.stdout + raised.stderr).count("Traceback (most recent call last)") == 1


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, 137)], ids=["ctrl-c", "worker-killed"])
def test_ctrl_c_and_a_killed_worker_end_the_job_alike(tmp_path, launcher, sig, code):
    run_dir = tmp_path / "wait"
    proc = subprocess.Popen([DTRAIN, "launch", str(TEST_RECIPES / "wait_forever.py"), "--cpu", "--run-dir",
                             str(run_dir), *LAUNCHERS[launcher]], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().startswith("ready rank 0")
        workers = processes_with_env("DTRAIN_RUN_DIR", str(run_dir))
        assert len(workers) == (1 if launcher == "direct" else 2)  # the worker (and the agent)
        if sig == signal.SIGKILL:
            worker = [p for p in workers if not any(a in Path(f"/proc/{p}/cmdline").read_text() for a in AGENTS)]
            assert len(worker) == 1
            os.kill(worker[0], signal.SIGKILL)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    if sig == signal.SIGKILL:
        assert "was killed by SIGKILL; the job stopped with exit code 137" in err, err
    deadline = time.time() + 10
    while processes_with_env("DTRAIN_RUN_DIR", str(run_dir)) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_with_env("DTRAIN_RUN_DIR", str(run_dir)) == []
