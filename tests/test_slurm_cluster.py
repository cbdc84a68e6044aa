"""`dtrain slurm` against a real SLURM: slurmctld and three slurmd (logical nodes n1, n2 and n3) on
this machine, started by `.ci/run` or by the `slurm_env` fixture (cluster/local/start.sh).

Two accelerations, both of SLURM's clock and not of dtrain: the pre-timeout signal is sent
with `scancel -s USR2` (SLURM delivers --signal up to a minute late or early), and a requeued
job, which SLURM holds back for two minutes, is made eligible with `scontrol update StartTime=now`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import DTRAIN, ROOT, TEST_RECIPES, job_fields, metrics, run_dtrain, slurm_cmd, submit, wait_for


def read_metrics(run_dir: Path, of_kind: str | None = None) -> list[dict]:
    return metrics(run_dir, of_kind) if (run_dir / "metrics.jsonl").exists() else []


@pytest.mark.slow
def test_two_node_mnist_job_trains_to_98_percent_across_n1_and_n2(slurm_env, data_dir, tmp_path):
    job_id = submit(slurm_env, tmp_path, str(ROOT / "recipes" / "mnist_cnn.py"), "--nodes", "2", "--cpu",
                    "--nproc", "1", "--name", "mnist2", "--", "--epochs", "1", "--data-dir", data_dir)
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    run_dir = tmp_path / "runs" / "mnist2"
    output = (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()
    assert fields["JobState"] == "COMPLETED", output
    assert fields["NodeList"] == "n[1-2]"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["world_size"] == 2 and sorted(config["rank_nodes"]) == ["n1", "n2"]
    assert config["cluster_job"] == {"engine": "slurm", "id": job_id, "requeues": 0}
    final = read_metrics(run_dir, "epoch")[-1]
    print(output, final)
    assert final["eval/accuracy"] >= 0.98, output
    assert "Epoch 1/1" in output and (run_dir / "model.pth").is_file()
    assert (run_dir / "slurm" / "job.sbatch").read_text().startswith("#!/bin/bash")


def test_preempted_job_checkpoints_requeues_itself_and_resumes(slurm_env, data_dir, tmp_path):
    job_id = submit(slurm_env, tmp_path, str(ROOT / "recipes" / "mnist_cnn.py"), "--nodes", "2", "--cpu",
                    "--nproc", "1", "--name", "preempt", "--max-requeues", "2", "--",
                    "--epochs", "1", "--limit-train-batches", "150", "--limit-eval-batches", "4", "--log-every", "10",
                    "--data-dir", data_dir)
    run_dir = tmp_path / "runs" / "preempt"
    deadline = time.monotonic() + 300
    while max((m["step"] for m in read_metrics(run_dir)), default=0) < 30:
        assert time.monotonic() < deadline, "training did not reach step 30"
        time.sleep(0.2)
    slurm_cmd(slurm_env, "scancel", "-s", "USR2", job_id)
    wait_for(slurm_env, job_id, ("PENDING",), timeout=120)
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300, release=True)
    output = (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", output

    stopped = [line for line in output.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1 and f"requeueing slurm job {job_id} (requeue 1 of 2)" in stopped[0], output
    saved_step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert saved_step >= 30
    assert f"resuming from {run_dir}/checkpoints/step_{saved_step:07d} (step {saved_step}," in output
    assert f"dtrain: job {job_id} on n[1-2], requeue 1 of 2" in output

    steps = [m["step"] for m in read_metrics(run_dir, "train")]
    assert steps == sorted(set(steps)), "a step was trained (and logged) twice"
    assert steps[0] == 10 and steps[-1] == 150 and saved_step + 10 in steps  # continued, not from zero
    assert len(steps) == 15
    assert read_metrics(run_dir)[-1]["epoch"] == 1 and (run_dir / "model.pth").is_file()
    status = run_dtrain("slurm", "status", job_id, env=slurm_env)
    assert "requeues  1" in status.stdout and "COMPLETED" in status.stdout


NASTY = ["two words", "it's", 'say "hi"', "$(touch {m}/dollar)", "; touch {m}/semicolon", "`touch {m}/tick`",
         "$HOME", "back\\slash", "--flag=a b", "*", "line1\nline2", "&& touch {m}/and", ""]


def test_recipe_arguments_reach_the_recipe_byte_for_byte_and_run_nothing(slurm_env, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    args = [a.replace("{m}", str(markers)) for a in NASTY]
    recipe = str(TEST_RECIPES / "record_args.py")
    dry = run_dtrain("slurm", "submit", recipe, "--cpu", "--name", "quoted", "--dry-run", "--", *args,
                     cwd=tmp_path, env=slurm_env)
    assert dry.returncode == 0 and not (tmp_path / "runs").exists()

    job_id = submit(slurm_env, tmp_path, recipe, "--cpu", "--name", "quoted", "--", *args)
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    run_dir = tmp_path / "runs" / "quoted"
    assert fields["JobState"] == "COMPLETED", (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()
    assert json.loads((run_dir / "args.json").read_text()) == args
    assert list(markers.iterdir()) == []
    spec, script = ((run_dir / "slurm" / name).read_text() for name in ("spec.json", "job.sbatch"))
    assert dry.stdout == f"# runs/quoted/slurm/spec.json\n{spec}\n{script}"  # the dry run showed what ran


def test_status_logs_and_cancel_a_running_job(slurm_env, tmp_path):
    from conftest import processes_with_env
    job_id = submit(slurm_env, tmp_path, str(TEST_RECIPES / "wait_forever.py"), "--cpu", "--nodes", "2",
                    "--name", "waiting")
    wait_for(slurm_env, job_id, ("RUNNING",))
    status = run_dtrain("slurm", "status", job_id, env=slurm_env)
    assert status.returncode == 0 and f"job {job_id} (waiting): RUNNING" in status.stdout
    assert "on n[1-2]" in status.stdout and str(tmp_path / "runs" / "waiting") in status.stdout
    logs = run_dtrain("slurm", "logs", job_id, env=slurm_env)
    assert logs.returncode == 0 and f"dtrain: job {job_id} on n[1-2]" in logs.stdout

    cancel = run_dtrain("slurm", "cancel", job_id, env=slurm_env)
    assert cancel.returncode == 0 and cancel.stdout.strip() == f"cancelled job {job_id}"
    wait_for(slurm_env, job_id, ("CANCELLED",), timeout=60)
    deadline = time.monotonic() + 30
    while processes_with_env("SLURM_JOB_ID", job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_env("SLURM_JOB_ID", job_id) == []

    unknown = run_dtrain("slurm", "status", "999999", env=slurm_env)
    assert unknown.returncode == 2 and "SLURM does not know job 999999" in unknown.stderr


def test_dtrain_launch_in_a_hand_written_batch_script_spreads_over_the_nodes(slurm_env, tmp_path):
    """A user's own sbatch file that calls `dtrain launch` without srun still gets one launcher per node."""
    out = tmp_path / "out.txt"
    job_id = slurm_cmd(slurm_env, "sbatch", "--parsable", "--nodes=2", f"--output={out}", f"--chdir={tmp_path}",
                       "--wrap", f"{DTRAIN} launch {TEST_RECIPES / 'report_process.py'} --cpu --name wrapped").strip()
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    assert fields["JobState"] == "COMPLETED", out.read_text()
    # One launcher per node, each with one process: the two local-rank-0 logs hold global ranks 0 and 1.
    logs = sorted(p.read_text() for p in (tmp_path / "runs" / "wrapped" / "logs").glob("*/attempt_0/0/stdout.log"))
    assert len(logs) == 2 and "rank=0 world=2" in "".join(logs) and "rank=1 world=2" in "".join(logs)


def test_the_doctors_preflight_in_a_batch_script_runs_on_every_node(slurm_env, tmp_path):
    out = tmp_path / "out.txt"
    job_id = slurm_cmd(slurm_env, "sbatch", "--parsable", "--nodes=2", f"--output={out}", f"--chdir={tmp_path}",
                       "--wrap", f"{DTRAIN} doctor --nproc 1 --runs {tmp_path / 'runs'}").strip()
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    report = out.read_text()
    assert fields["JobState"] == "COMPLETED", report
    assert f"; in job {job_id} (2 node(s), this one n1)" in report
    assert "preflight: 2 process(es) on cpu" in report and "  rank 1 (" in report
    assert report.strip().splitlines()[-1] == "dtrain: no rank is slower than the others by more than 50%."
    assert list((tmp_path / "runs").iterdir()) == []  # its run directory is gone


def test_submit_to_a_controller_that_does_not_answer(slurm_env, tmp_path):
    conf = Path(slurm_env["SLURM_CONF"]).read_text()
    dead = tmp_path / "dead.conf"
    dead.write_text("\n".join("SlurmctldPort=9" if line.startswith("SlurmctldPort=") else line
                              for line in conf.splitlines()))
    (tmp_path / "r.py").write_text("")
    result = run_dtrain("slurm", "submit", "r.py", "--cpu", "--name", "x", cwd=tmp_path,
                        env={**slurm_env, "SLURM_CONF": str(dead)})
    assert result.returncode == 2
    assert result.stderr.startswith("dtrain: error: the SLURM controller is not answering")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead.conf", "r.py"]


ARRAY_RUNS = ["000_lr=1e-3_batch-size=32", "001_lr=1e-3_batch-size=64", "002_lr=3e-3_batch-size=32",
              "003_lr=3e-3_batch-size=64"]


def test_a_sweep_as_a_job_array_requeues_only_the_preempted_task(slurm_env, data_dir, tmp_path):
    """A 2x2 grid as one array, 2 tasks at once; USR2 to task 0 requeues task 0 (its own job id, not the
    array) and it resumes its own run; the other tasks run once. The signal goes to task 0's step: while
    an array has pending tasks, `scancel -s SIG` of a task that then requeues itself retries for minutes
    (SLURM 22.05, "Job is in transitional state"); SLURM's own --signal does not go through scancel."""
    sweep_dir = tmp_path / "grid"
    out = run_dtrain("slurm", "submit", str(ROOT / "recipes" / "mnist_mlp.py"), "--cpu", "--run-dir", str(sweep_dir),
                     "--grid", "lr=1e-3,3e-3", "--grid", "batch-size=32,64", "--parallel", "2",
                     "--checkpoint-every", "never", "--", "--epochs", "1", "--log-every", "10",
                     "--data-dir", data_dir, cwd=tmp_path, env=slurm_env)
    assert out.returncode == 0 and out.stdout.startswith("submitted job array "), out.stdout + out.stderr
    array = out.stdout.split()[3].rstrip(":")
    assert "#SBATCH --array=0-3%2" in (sweep_dir / "slurm" / "job.sbatch").read_text()

    first = sweep_dir / ARRAY_RUNS[0]
    deadline = time.monotonic() + 300
    while not read_metrics(first, "train"):  # 1875 steps of 32: seconds of training left after the first row
        assert time.monotonic() < deadline, "task 0 did not start training"
        time.sleep(0.02)
    task_job = job_fields(slurm_env, f"{array}_0")["JobId"]
    slurm_cmd(slurm_env, "scancel", "-s", "USR2", f"{task_job}.0")
    tasks = [wait_for(slurm_env, f"{array}_{i}", ("COMPLETED", "FAILED", "CANCELLED"), timeout=300, release=True)
             for i in range(4)]
    outputs = [(sweep_dir / "slurm" / f"slurm-{array}_{i}.out").read_text() for i in range(4)]
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 4, outputs
    assert [t["Restarts"] for t in tasks] == ["1", "0", "0", "0"], outputs
    assert f"requeueing slurm job {tasks[0]['JobId']} (requeue 1 of 3)" in outputs[0]
    assert "resuming from" in outputs[0] and all("resuming from" not in o for o in outputs[1:])
    for name, task in zip(ARRAY_RUNS, tasks):
        config = yaml.safe_load((sweep_dir / name / "config.yaml").read_text())
        assert config["cluster_job"]["id"] == task["JobId"] and config["launch"]["wandb_group"] == "grid"
        assert config["recipe_args"][:4] == ["--lr", name.split("_")[1][3:], "--batch-size", name.split("=")[-1]]
        epoch = read_metrics(sweep_dir / name, "epoch")
        assert len(epoch) == 1 and epoch[0]["eval/accuracy"] > 0.85
        steps = [m["step"] for m in read_metrics(sweep_dir / name, "train")]
        assert steps == sorted(set(steps))  # the preempted task's steps logged once
    assert all(t["ArrayJobId"] == array for t in tasks)

    status = run_dtrain("slurm", "status", array, env=slurm_env)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "job array " + array + " (grid): 4 tasks"
    assert all(any(name in line and "COMPLETED" in line for line in lines) for name in ARRAY_RUNS), status.stdout
    again = run_dtrain("slurm", "submit", str(ROOT / "recipes" / "mnist_mlp.py"), "--cpu", "--run-dir",
                       str(sweep_dir), "--grid", "lr=1e-3,3e-3", "--grid", "batch-size=32,64", "--parallel", "2",
                       "--checkpoint-every", "never", "--", "--epochs", "1", "--log-every", "10",
                       "--data-dir", data_dir, cwd=tmp_path, env=slurm_env)
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr


def test_a_sweep_larger_than_max_array_size_is_refused_and_nothing_submitted(slurm_env, tmp_path):
    limit = int(slurm_cmd(slurm_env, "scontrol", "show", "config").split("MaxArraySize")[1].split("=")[1].split()[0])
    values = ",".join(str(v) for v in range(limit + 1))
    out = run_dtrain("slurm", "submit", str(ROOT / "recipes" / "mnist_mlp.py"), "--cpu", "--run-dir",
                     str(tmp_path / "big"), "--grid", f"lr={values}", cwd=tmp_path, env=slurm_env)
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.strip() == (f"dtrain: error: this sweep needs array tasks up to index {limit}, and this "
                                  f"cluster's MaxArraySize is {limit}; split the sweep (fewer --grid values or "
                                  "--draws) or ask the cluster's admins for a larger MaxArraySize.")
    assert not (tmp_path / "big").exists()


def test_a_job_that_a_node_makes_fail_is_requeued_without_it_and_resumes(slurm_env, tmp_path):
    """The rank on n2 hangs in the job's first run: the batch script's dtrain (not a rank: that one hangs) requeues
    the job without n2; it runs on the other nodes and resumes from its checkpoint."""
    job_id = submit(slurm_env, tmp_path, str(TEST_RECIPES / "hang_on_node.py"), "--nodes", "2", "--cpu", "--nproc",
                    "1", "--name", "badnode", "--timeout", "20", "--checkpoint-every", "10", "--max-steps", "40",
                    "--max-requeues", "1", "--", "--hang-node", "n2", "--hang-at", "25")
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=400, release=True)
    run_dir = tmp_path / "runs" / "badnode"
    output = (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", output
    assert fields["ExcNodeList"] == "n2" and fields["NodeList"] == "n[1,3]", fields
    assert f"dtrain: job {job_id} on n[1-2], requeue 0 of 1" in output
    assert "dtrain: node n2: rank 1 never reached " in output or "dtrain: node n2: rank 0 never reached " in output
    assert f"dtrain: requeueing slurm job {job_id} without node n2 (requeue 1 of 1)" in output, output
    assert f"dtrain: job {job_id} on n[1,3], requeue 1 of 1" in output
    assert f"resuming from {run_dir}/checkpoints/step_0000020 (step 20," in output
    assert [m["step"] for m in read_metrics(run_dir, "train")][-1] == 40 and (run_dir / "model.pth").is_file()


def test_a_recipes_exception_on_every_rank_excludes_no_node(slurm_env, tmp_path):
    job_id = submit(slurm_env, tmp_path, str(TEST_RECIPES / "hang_on_node.py"), "--nodes", "2", "--cpu", "--nproc",
                    "1", "--name", "bug", "--max-requeues", "1", "--", "--fail-at", "5")
    fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    output = (tmp_path / "runs" / "bug" / "slurm" / f"slurm-{job_id}.out").read_text()
    assert (fields["JobState"], fields["Restarts"], fields["ExcNodeList"]) == ("FAILED", "0", "(null)"), output
    assert "fails at step 5, as the recipe says" in output and "requeueing" not in output


def test_a_job_that_may_shrink_loses_a_node_and_finishes_on_the_others(slurm_env, tmp_path):
    """--min-nodes 2 of 3: a node's dtrain, torchrun and worker are killed after a checkpoint; the job goes on with the
    other two, ends COMPLETED, and logs the restart. The node lost is the one whose worker is rank 0 (the rendezvous
    ranks nodes as they arrive), unless that is n1, which holds the rendezvous; then n3."""
    from conftest import environ_of, processes_with_env

    job_id = submit(slurm_env, tmp_path, str(TEST_RECIPES / "hang_on_node.py"), "--nodes", "3", "--cpu", "--nproc",
                    "1", "--name", "shrink", "--min-nodes", "2", "--checkpoint-every", "10", "--max-steps", "60")
    run_dir = tmp_path / "runs" / "shrink"
    assert "#SBATCH --no-kill" in (run_dir / "slurm" / "job.sbatch").read_text()
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step_0000020" / "COMMITTED").exists():
        assert time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.05)
    of_job = set(processes_with_env("SLURM_JOB_ID", job_id))
    rank_0_on = {node for pid in of_job & set(processes_with_env("RANK", "0")) for node in environ_of(pid, "SLURMD_NODENAME")}
    lost = next(iter(rank_0_on - {"n1"}), "n3")
    on_lost = of_job & set(processes_with_env("SLURMD_NODENAME", lost))
    killed = {pid: proc_text(pid, "cmdline")[:120] for pid in on_lost}
    for pid in on_lost:
        os.kill(pid, signal.SIGKILL)
    try:
        fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    finally:  # what a failure needs to be understood, and no job left holding the nodes
        output = (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()
        steps = slurm_cmd(slurm_env, "scontrol", "show", "steps", job_id, check=False)
        left = {pid: proc_text(pid, "wchan") + " " + proc_text(pid, "cmdline")[:100]
                for pid in processes_with_env("SLURM_JOB_ID", job_id)}
        logs = {str(f.relative_to(run_dir)): f.read_text()[-1500:] for f in sorted(run_dir.glob("logs/**/*")) if f.is_file()}
        print(f"killed on {lost}: {killed}\n{output[-3000:]}\n{steps}\nleft: {left}\nlogs: {logs}")
        slurm_cmd(slurm_env, "scancel", job_id, check=False)
    assert on_lost and fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", output
    node = {"n2": 1, "n3": 2}[lost]
    assert re.search(rf"dtrain: node {node} lost; restarting on 2 nodes from step \d+ \(each rank's batch kept", output)
    assert "dtrain: the job lost a node on the way and finished on the others (--min-nodes 2)." in output
    restart = read_metrics(run_dir, "restart")
    assert len(restart) == 1 and (restart[0]["world_size"], restart[0]["previous_world_size"]) == (2, 3)
    assert [m["step"] for m in read_metrics(run_dir, "train")][-1] == 60 and (run_dir / "model.pth").is_file()


def proc_text(pid: int, name: str) -> str:
    """/proc/PID/NAME as text (NULs as spaces), or "" once the process has gone: a failure's account must not fail."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def throttle(job_id: str, node: str, script: str, stop: threading.Event) -> None:
    """Make `node`'s worker of `job_id` that runs `script` slow, for real: stopped 2/3 of the time, until `stop`."""
    from conftest import processes_with_env

    while not stop.is_set():
        workers = [pid for pid in set(processes_with_env("SLURM_JOB_ID", job_id))
                   & set(processes_with_env("SLURMD_NODENAME", node))
                   if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:3] == [b"-u", script.encode()]]
        for signum, seconds in ((signal.SIGSTOP, 0.08), (signal.SIGCONT, 0.04)):
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            time.sleep(seconds)


def job_with_a_slow_node(slurm_env, tmp_path, nodes: int) -> tuple[dict, str, Path]:
    """A --preflight job of `nodes` nodes whose preflight worker on n2 is slowed for real (SIGSTOP/SIGCONT): its
    fields once it ended, its output, its run directory."""
    from dtrain.launch.doctor import PREFLIGHT

    job_id = submit(slurm_env, tmp_path, str(ROOT / "recipes" / "mnist_cnn.py"), "--nodes", str(nodes), "--cpu",
                    "--nproc", "1", "--name", "slow", "--preflight", "--max-steps", "10", "--checkpoint-every",
                    "never", "--max-requeues", "1", "--", "--epochs", "1", "--log-every", "5",
                    "--limit-eval-batches", "2")
    stop = threading.Event()
    slowing = threading.Thread(target=throttle, args=(job_id, "n2", str(PREFLIGHT), stop), daemon=True)
    slowing.start()
    try:
        fields = wait_for(slurm_env, job_id, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300, release=True)
    finally:
        stop.set()
        slowing.join()
    run_dir = tmp_path / "runs" / "slow"
    output = (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()
    assert re.search(r"dtrain: node n2: the preflight's matmul took \d+\.\dx the other ranks' median there\.", output)
    assert fields["JobState"] == "COMPLETED" and [m["step"] for m in read_metrics(run_dir, "train")][-1] == 10, output
    return fields, output, run_dir


def test_a_node_the_preflight_finds_slow_is_left_out_before_the_job_trains(slurm_env, tmp_path):
    """--preflight: the batch script's dtrain names n2 and requeues the job without it before training; the job then
    trains on n1 and n3."""
    fields, output, run_dir = job_with_a_slow_node(slurm_env, tmp_path, nodes=2)
    job_id = fields["JobId"]
    assert (fields["Restarts"], fields["ExcNodeList"]) == ("1", "n2"), output
    assert f"dtrain: requeueing slurm job {job_id} without node n2 (requeue 1 of 1)" in output
    assert "Epoch 1/1" not in output[:output.index("requeueing")]  # left out before it trained
    assert f"dtrain: job {job_id} on n[1,3], requeue 1 of 1" in output
    assert json.loads((run_dir / "preflight.json").read_text())["world_size"] == 2  # the requeued job's preflight


def test_a_slow_node_the_job_cannot_do_without_is_named_and_the_job_trains_on_it(slurm_env, tmp_path):
    """Three nodes of three: without n2 too few are left, which one sentence says; the job trains where it is."""
    fields, output, _ = job_with_a_slow_node(slurm_env, tmp_path, nodes=3)
    assert (fields["Restarts"], fields["ExcNodeList"]) == ("0", "(null)"), output
    assert "dtrain: without n2 partition debug has 2 node(s) and the job needs 3, so it is not requeued; repair or " \
           "drain those nodes, then submit it again." in output
    assert "dtrain: the job trains on the nodes it has, slow or not." in output and "requeueing" not in output
