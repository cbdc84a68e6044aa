"""Seeing inside a running job: the hang report after a collective times out, and `dtrain stack` on a
live job (tests/recipes/hang.py: a custom loop, so "the step" is the count of `ctx.step()` calls)."""

from __future__ import annotations

import json
import subprocess
import time

from conftest import DTRAIN, ROOT, TEST_RECIPES, run_dtrain

HANG = str(TEST_RECIPES / "hang.py")


def test_a_rank_that_hangs_is_named_with_its_step_and_line_once_the_collective_times_out(tmp_path):
    run_dir = tmp_path / "run"
    begun = time.monotonic()
    out = run_dtrain("launch", HANG, "--cpu", "--nproc", "2", "--timeout", "30", "--run-dir", str(run_dir),
                     "--wandb", "disabled", "--", "--hang-at", "20", timeout=120)
    assert out.returncode == 1 and time.monotonic() - begun < 30 + 30, out.stderr
    sleep_line = next(n for n, line in enumerate(open(HANG), 1) if "time.sleep(3600)" in line)
    report = out.stderr[out.stderr.index("dtrain: where each rank was"):].splitlines()
    assert report[1].startswith("  rank 0: step 20, waiting for the others, at ")
    assert report[2] == ("  rank 1: step 20, never reached gloo:all_reduce #30 of default_pg (its last: #29), at "
                         f"tests/recipes/hang.py:{sleep_line} in <module>")
    assert report[3] == ("dtrain: rank 1 hung: it never reached the collective the others waited in; at step 20 it "
                         f"was at tests/recipes/hang.py:{sleep_line} in <module>.")
    for rank in (0, 1):
        state = json.loads((run_dir / "debug" / f"rank{rank}.json").read_text())
        assert state["step"] == 20
        stacks = (run_dir / "debug" / f"rank{rank}-stacks.txt").read_text()
        assert f'hang.py", line {sleep_line if rank else sleep_line + 2}' in stacks, stacks


def test_dtrain_stack_prints_every_ranks_stacks_and_the_job_goes_on(tmp_path):
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
