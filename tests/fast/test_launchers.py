"""How each launcher's account of a failure is read, and which rank dtrain names."""

from __future__ import annotations

import json
import os

import pytest

from dtrain.core.contract import first_failure
from dtrain.core.rundir import RunDir
from dtrain.launch.launchers import ExitStatus, accelerate, deepspeed, local, torchrun

from conftest import file_size_limit

SUMMARY = """E1127 09:17:55 api.py:1002] failed (exitcode: -15) local_rank: 1 (pid: 29711) of binary: python3
Failures:
[0]:
  time      : 2026-11-27_09:17:55
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 29710)  (SIGKILL)
------------------------------------------------------------
Root Cause (first observed failure):
[1]:
  time      : 2026-11-27_09:17:54
  rank      : 1 (local_rank: 1)
  exitcode  : -15 (pid: 29711)  (SIGTERM)
"""


def test_torchrun_names_the_first_failed_workers_exit_code():
    log = "E1127 06:20:40 api.py:1002] failed (exitcode: 3) local_rank: 1 (pid: 2395) of binary: python\n"
    assert torchrun.exit_status(log, 1) == ExitStatus(3)
    assert torchrun.exit_status(log.replace("exitcode: 3", "exitcode: -9"), 1) == ExitStatus(137)
    assert torchrun.exit_status("nothing about workers", 1) == ExitStatus(1)


def test_a_killed_worker_is_the_cause_even_when_torchrun_blames_its_peer():
    """Seen in CI: rank 0 SIGKILLed; rank 1 got "connection reset", wrote its error file, was
    SIGTERMed by torchrun, and torchrun named rank 1 the root cause (its error file's time is
    rounded down to the second)."""
    assert torchrun.exit_status(SUMMARY, 1) == ExitStatus(137, signal=9, rank=0)
    assert accelerate.exit_status(SUMMARY, 1) == ExitStatus(137, signal=9, rank=0)  # torch's elastic agent too
    assert torchrun.exit_status(SUMMARY.replace("-9 (pid", "1 (pid"), 1) == ExitStatus(1)


def test_the_deepspeed_launcher_gives_the_first_failed_workers_code_but_no_rank():
    log = ("[INFO] [launch.py:351:main] Process 41 exits successfully.\n"
           "[ERROR] [launch.py:325:sigkill_handler] ['python', 'r.py'] exits with return code = 3\n")
    assert deepspeed.exit_status(log, 1) == ExitStatus(3)
    assert deepspeed.exit_status(log.replace("= 3", "= -9"), 1) == ExitStatus(137, signal=9)
    assert deepspeed.exit_status("", 2) == ExitStatus(2)


def test_dtrains_agent_gives_the_failed_workers_code_and_a_killed_one_as_the_cause():
    """The agent SIGTERMs the others once one has failed; a worker killed by another signal left no error record."""
    log = "[rank0]: Traceback ...\ndtrain agent: rank 1 failed (exitcode: 3)\n"
    assert local.exit_status(log, 1) == ExitStatus(3)
    killed = "dtrain agent: rank 0 failed (exitcode: 1)\ndtrain agent: rank 1 failed (exitcode: -9)\n"
    assert local.exit_status(killed, 1) == ExitStatus(137, signal=9, rank=1)
    assert local.exit_status("dtrain agent: rank 1 failed (exitcode: -15)\n", 1) == ExitStatus(143)
    assert local.exit_status("", 1) == ExitStatus(1)


def record(run_dir, rank, time, attempt=0, usage=False, message="ValueError: boom"):
    path = RunDir(run_dir).error_record(rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"rank": rank, "message": message, "time": time, "usage": usage, "attempt": attempt}, fh)


def test_the_first_failure_of_this_launch_and_its_newest_attempt_is_named(tmp_path):
    record(tmp_path, 0, time=100.0)  # an earlier launch of the same run directory
    assert first_failure(str(tmp_path), 2, since=200.0) is None
    record(tmp_path, 1, time=201.0)
    record(tmp_path, 0, time=202.0)
    assert first_failure(str(tmp_path), 2, since=200.0).rank == 1
    record(tmp_path, 0, time=203.0, attempt=1)  # after a restart, only the newest attempt counts
    assert first_failure(str(tmp_path), 2, since=200.0).rank == 0


def test_a_usage_error_is_the_one_shown(tmp_path):
    """A rank that stopped because a peer did may record its error first; the sentence that says what
    to do is the one to show."""
    record(tmp_path, 1, time=201.0, message="RuntimeError: Connection closed by peer")
    record(tmp_path, 0, time=201.5, usage=True, message="bad")
    failure = first_failure(str(tmp_path), 2, since=200.0)
    assert (failure.rank, failure.usage, failure.message) == (0, True, "bad")


def test_the_launchers_own_log_goes_on_in_memory_when_its_disk_refuses(capsys):
    """/dev/full refuses every write with ENOSPC, as a full disk does."""
    from dtrain.launch.job import LauncherLog

    log = LauncherLog("/dev/full")
    for line in ("rank : 1 (local_rank: 1)\n", "exitcode : -9 (pid: 7)\n", "third\n"):
        log.write(line)
    log.close()
    assert log.text() == "rank : 1 (local_rank: 1)\nexitcode : -9 (pid: 7)\nthird\n"
    err = capsys.readouterr().err
    assert err == "dtrain: cannot write /dev/full (No space left on device); going on without it.\n"


def test_a_record_that_cannot_be_written_whole_leaves_the_old_one_and_no_partial_file(tmp_path):
    """RLIMIT_FSIZE cuts the write short (EFBIG), as a disk that fills up in the middle of it does."""
    from dtrain.core.rundir import write_json_atomically

    path = tmp_path / "rank1.json"
    assert write_json_atomically(path, {"rank": 1})
    with file_size_limit(64):
        written = write_json_atomically(path, {"rank": 1, "message": "x" * 100})
    assert not written and json.loads(path.read_text()) == {"rank": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["rank1.json"]


def test_after_a_collective_time_out_the_nodes_that_do_not_answer_are_named(tmp_path):
    from dtrain.core import spec
    from dtrain.launch.job import arrived_nodes, silent_nodes

    two_nodes = spec.resolve({"recipe": "recipes/mnist_cnn.py", "cpu": True, "nodes": 3, "node_rank": 0,
                              "master_addr": "198.18.0.1", "run_dir": str(tmp_path), "rdzv_timeout": 60},
                             gpus_available=0, free_port=1, route=lambda host: ("198.18.0.1", "veth0"))
    nodes = tmp_path / "logs" / "nodes"
    nodes.mkdir(parents=True)
    for node_rank, address, when in ((1, "198.18.0.2", 1000.0), (2, "198.18.0.3", 500.0)):  # node 2: an older launch
        (nodes / f"node{node_rank}.json").write_text(json.dumps({"node_rank": node_rank, "time": when,
                                                                 "address": address}))
    assert arrived_nodes(two_nodes, started=1010.0) == [0, 1]
    assert silent_nodes(two_nodes, 1010.0, answers=lambda address: address != "198.18.0.2") == [(1, "198.18.0.2")]
    assert silent_nodes(two_nodes, 1010.0, answers=lambda address: True) == []


def test_a_host_that_is_there_answers_though_nothing_listens():
    from dtrain.core.hardware import answers

    assert answers("127.0.0.1")  # the discard port is closed: refused at once (a host gone: tests/test_network.py)


def test_a_second_launch_of_the_same_node_of_a_run_is_refused_while_the_first_holds_it(tmp_path):
    """flock is per open file: a second open in this process stands for a second `dtrain launch`."""
    from dtrain.core import spec
    from dtrain.errors import UsageError
    from dtrain.launch.job import run_dir_lock

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    node0 = spec.resolve({"recipe": "recipes/mnist_cnn.py", "cpu": True, "run_dir": str(run_dir)}, gpus_available=0,
                         free_port=1)
    node1 = node0.replace(node_rank=1)
    with run_dir_lock(node0), run_dir_lock(node1):  # another node of the same run: its own lock
        with pytest.raises(UsageError) as refused, run_dir_lock(node0):
            pass
        holder = f"pid {os.getpid()} on {os.uname().nodename}, since "
        assert str(refused.value).startswith(f"{run_dir} is in use by another dtrain launch of this run ({holder}")
        assert str(refused.value).endswith("); wait for it to end or stop it, or pass another --name.")
    assert sorted(p.name for p in run_dir.iterdir()) == ["launch-node1.lock", "launch.lock"]
    with run_dir_lock(node0):  # released with its holder
        pass


def test_a_job_that_may_shrink_ends_when_node_0_did_though_its_step_waits_on(tmp_path, monkeypatch, capsys):
    """srun may wait on a lost node's task after the others finished: once node 0's launch has ended, the batch
    script's dtrain gives the step STEP_GRACE_S and then stops it."""
    import subprocess
    import time

    from dtrain.launch import job

    monkeypatch.setattr(job, "STEP_GRACE_S", 0)
    step = subprocess.Popen(["sleep", "600"])
    started = time.time()
    assert job._until_node_0_ends(subprocess.Popen(["true"]), str(tmp_path), started) == 0  # a step that ends
    job.record_end(str(tmp_path), 0)
    assert job._until_node_0_ends(step, str(tmp_path), started) == -15
    assert "node 0's launch ended 0 s ago and the step that ran it on every node has not; stopping it." in \
        capsys.readouterr().err
