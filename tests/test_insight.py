"""Seeing inside a running job: the hang report after a collective times out, and `dtrain stack` on a
live job (tests/recipes/hang.py: a custom loop, so "the step" is the count of `ctx.step()` calls)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import DTRAIN, ROOT, TEST_RECIPES, metrics, run_dtrain

HANG = str(TEST_RECIPES / "hang.py")


def test_a_rank_that_hangs_is_named_with_its_step_and_line_once_the_collective_times_out(tmp_path):
    """The time-out set as a user's shell sets it (DTRAIN_TIMEOUT_S), which config.yaml records."""
    run_dir = tmp_path / "run"
    begun = time.monotonic()
    out = run_dtrain("launch", HANG, "--cpu", "--nproc", "2", "--run-dir", str(run_dir), "--wandb", "disabled",
                     "--", "--hang-at", "20", timeout=120, env={"DTRAIN_TIMEOUT_S": "15"})
    assert out.returncode == 1 and time.monotonic() - begun < 15 + 30, out.stderr
    assert "  timeout: 15  # from DTRAIN_TIMEOUT_S\n" in (run_dir / "config.yaml").read_text()
    sleep_line = next(n for n, line in enumerate(open(HANG), 1) if "time.sleep(3600)" in line)
    # The first line a user reads names the culprit; rank 0, which only waited, leaves its traceback in its record.
    dtrains = [line for line in out.stderr.splitlines() if line.startswith("dtrain: ")]
    assert dtrains[0] == ("dtrain: rank 1 hung: it never reached the collective the others waited in; at step 20 it "
                          f"was at tests/recipes/hang.py:{sleep_line} in <module>.")
    assert "Traceback" not in out.stdout + out.stderr
    report = out.stderr[out.stderr.index("dtrain: where each rank was"):].splitlines()
    assert report[1].startswith("  rank 0: step 20, waiting for the others, at ")
    assert report[2] == ("  rank 1: step 20, never reached gloo:all_reduce #30 of default_pg (its last: #29), at "
                         f"tests/recipes/hang.py:{sleep_line} in <module>")
    assert dtrains[-1].startswith("dtrain: rank 0 was the first to wait out --timeout (")
    record = json.loads((run_dir / "logs" / "errors" / "rank0.json").read_text())
    assert record["traceback"].startswith("Traceback (most recent call last):")
    for rank in (0, 1):
        state = json.loads((run_dir / "debug" / f"rank{rank}.json").read_text())
        assert state["step"] == 20
        stacks = (run_dir / "debug" / f"rank{rank}-stacks.txt").read_text()
        assert f'hang.py", line {sleep_line if rank else sleep_line + 2}' in stacks, stacks
        assert "--- step 20" in stacks and ": no step for 1" in stacks  # unasked, at 80% of the time-out: 12 s


def test_dtrain_stack_prints_every_ranks_stacks_and_a_second_launch_is_refused_while_the_job_goes_on(tmp_path):
    run_dir = tmp_path / "run"
    job = subprocess.Popen([DTRAIN, "launch", HANG, "--cpu", "--nproc", "2", "--run-dir", str(run_dir), "--wandb",
                            "disabled"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "metrics.jsonl").exists() and len(list(run_dir.glob("debug/rank*-stacks.txt"))) < 2:
            assert time.monotonic() < deadline and job.poll() is None, "the job did not start"
            time.sleep(0.2)
        time.sleep(2)  # in the loop
        out = run_dtrain("stack", str(run_dir), timeout=60)
        assert out.returncode == 0, out.stderr
        for rank in (0, 1):
            printed = out.stdout.split(f"=== rank {rank}\n", 1)[1].split("=== rank", 1)[0]
            assert 'hang.py", line' in printed  # its main thread, in the recipe's loop
        files = sorted(p for p in run_dir.rglob("*") if p.is_file())
        second = run_dtrain("launch", HANG, "--cpu", "--nproc", "2", "--run-dir", str(run_dir), "--wandb", "disabled",
                            timeout=60)
        assert (second.returncode, second.stdout) == (2, "")
        assert second.stderr.startswith(f"dtrain: error: {run_dir} is in use by another dtrain launch of this run (pid "
                                        f"{job.pid} on "), second.stderr
        assert sorted(p for p in run_dir.rglob("*") if p.is_file()) == files  # it wrote nothing
        (run_dir / "stop").touch()
        _, stderr = job.communicate(timeout=60)
        assert job.returncode == 0, stderr
    finally:
        job.kill()
        job.wait()


def test_dtrain_stack_on_a_folder_without_ranks_says_so(tmp_path):
    out = run_dtrain("stack", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"dtrain: error: no rank has announced itself in {tmp_path}/debug; give the run "
                                  "directory of a job that dtrain started (runs/NAME).")


def test_the_rank_slowed_on_purpose_is_named_the_slowest_at_every_interval(tmp_path):
    run_dir = tmp_path / "run"
    out = run_dtrain("launch", HANG, "--cpu", "--nproc", "2", "--run-dir", str(run_dir), "--wandb", "disabled", "--",
                     "--slow-ms", "50", "--steps", "30", "--log-every", "10", timeout=120)
    assert out.returncode == 0, out.stderr
    rows = metrics(run_dir, "system")
    assert [r["step"] for r in rows] == [10, 20, 30]  # a custom loop: the count of ctx.step() calls
    assert [r["slowest_rank"] for r in rows] == [1, 1, 1]
    # Both ranks' wall-clock steps are the same; rank 0 spends rank 1's extra 50 ms waiting in the all-reduce.
    assert all(r["comm_wait_s/max"] > r["comm_wait_s/min"] for r in rows)


def mnist_cnn_flops_per_sample() -> int:
    """FLOPs of one training sample of recipes/mnist_cnn.py's model, by hand: a multiply-add is 2 FLOPs;
    backward computes each layer's weight gradient and input gradient, each as costly as its forward,
    except the first layer's input gradient (the images need none)."""
    conv1 = 2 * (32 * 28 * 28) * (1 * 3 * 3)
    conv2 = 2 * (64 * 14 * 14) * (32 * 3 * 3)
    fc1, fc2 = 2 * 3136 * 128, 2 * 128 * 10
    forward = conv1 + conv2 + fc1 + fc2
    return forward + 2 * forward - conv1


def test_flops_memory_and_a_trace_per_rank(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir), "--wandb",
                     "disabled", "--checkpoint-every", "never", "--max-steps", "6", "--trace", "1,1,2", "--trace-ranks",
                     "0,1", "--", "--epochs", "1", "--log-every", "3", "--limit-eval-batches", "4", "--data-dir", data_dir, timeout=300)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["flops_per_sample"] == mnist_cnn_flops_per_sample()
    assert mnist_cnn_flops_per_sample() == 24_995_328
    rows = metrics(run_dir, "system")
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["tflops"] > 0 and r["memory/rss_gb"] > 0.1 and "mfu" not in r for r in rows)  # no peak on CPU
    for rank in (0, 1):
        pid = int((run_dir / "debug" / f"rank{rank}-stacks.txt").read_text().split()[3])
        trace = json.loads((run_dir / "traces" / f"rank{rank}.json").read_text())
        assert trace["distributedInfo"]["rank"] == rank
        ops = [e for e in trace["traceEvents"] if e.get("cat") == "cpu_op"]
        assert ops and {e["pid"] for e in ops} == {pid}  # this rank's own process
        assert any(e["name"] == "aten::convolution" for e in ops)
    report = run_dtrain("report", str(run_dir))
    assert report.returncode == 0 and (run_dir / "report" / "system.png").is_file()
    assert "TFLOP/s per device" in report.stdout


def cpu_limited_cgroup(tag: str) -> Path | None:
    """A cgroup whose processes get 20% of one CPU (cgroup v1's cpu controller, or v2's cpu.max), or None."""
    v1 = Path("/sys/fs/cgroup/cpu")
    v2 = Path("/sys/fs/cgroup")
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            group = v1 / tag
            group.mkdir()
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("20000")
            return group
        if "cpu" in (v2 / "cgroup.subtree_control").read_text().split():
            group = v2 / tag
            group.mkdir()
            (group / "cpu.max").write_text("20000 100000")
            return group
    except OSError:
        return None
    return None


def joined_rank(rank: int, recipe: str) -> int | None:
    """The PID of `recipe`'s rank once it has joined the job: rank 0 writes config.yaml after a collective."""
    for entry in Path("/proc").iterdir():
        try:
            environ = b"\0" + (entry / "environ").read_bytes()
            if entry.name.isdigit() and recipe.encode() in (entry / "cmdline").read_bytes() \
                    and f"\0RANK={rank}\0".encode() in environ:
                run_dir = environ.split(b"\0DTRAIN_RUN_DIR=", 1)[1].split(b"\0", 1)[0].decode()
                return int(entry.name) if (Path(run_dir) / "config.yaml").exists() else None
        except OSError:
            continue
    return None


def test_the_doctors_preflight_names_a_rank_limited_to_a_fifth_of_a_cpu_and_none_otherwise():
    if os.geteuid() != 0:
        pytest.skip("needs root to make a cgroup")
    tag = f"dtrain-test-{uuid.uuid4().hex[:6]}"
    group = cpu_limited_cgroup(tag)
    if group is None:
        pytest.skip("no cgroup cpu controller to limit a process with")
    try:
        doctor = subprocess.Popen([DTRAIN, "doctor", "--nproc", "2"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while (pid := joined_rank(1, "preflight.py")) is None:  # its imports at full speed: the preflight is slowed
            assert time.monotonic() < deadline and doctor.poll() is None, doctor.communicate()
            time.sleep(0.02)
        (group / "cgroup.procs").write_text(str(pid))
        stdout, stderr = doctor.communicate(timeout=120)
        assert doctor.returncode == 1, stdout + stderr
        assert f"dtrain: rank 1 on {socket.gethostname()} is slower than the others" in stdout
        assert "rank 0 on" not in stdout
    finally:
        doctor.kill()
        doctor.wait()
        group.rmdir()
    out = run_dtrain("doctor", "--nproc", "2", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == "dtrain: no rank is slower than the others by more than 50%."
    assert out.stdout.startswith("python ") and "\ntorch " in out.stdout and "\ndisk " in out.stdout
