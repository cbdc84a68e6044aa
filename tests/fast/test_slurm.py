"""SLURM decisions that need no cluster: time and signal parsing, hostlists, what `dtrain launch`
reads from a job step, the rendered script (against a checked-in file), and bad input.

Hostnames such as gpu003 and GPU counts such as 8 per node cannot exist on this machine: they
are inputs to pure functions here. The real cluster is exercised in test_slurm_cluster.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dtrain import engines
from dtrain.core import spec
from dtrain.engines import slurm
from dtrain.errors import UsageError

from conftest import DTRAIN, ROOT, run_dtrain

EXPECTED = ROOT / "tests" / "data" / "mnist_4x8_gpu.sbatch"


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("30:15", 1815), ("02:00:00", 7200), ("1-12", 129600), ("1-00:30", 88200),
    ("2-01:02:03", 176523), ("UNLIMITED", None), ("infinite", None),
])
def test_parse_time_takes_every_sbatch_form(text, seconds):
    assert slurm.parse_time(text) == seconds


@pytest.mark.parametrize("text", ["2h", "1:2:3:4", "-5", "0", "", "01:00:00 ; rm", "1.5"])
def test_parse_time_refuses_what_sbatch_would(text):
    with pytest.raises(UsageError, match="is not a SLURM time"):
        slurm.parse_time(text)


@pytest.mark.parametrize("text, parsed", [
    ("USR2@90", (False, "USR2", 90)), ("B:USR1@30", (True, "USR1", 30)), ("SIGTERM", (False, "TERM", 60)),
    ("12@120", (False, "USR2", 120)), ("usr2@5", (False, "USR2", 5)),
])
def test_parse_signal(text, parsed):
    assert slurm.parse_signal(text) == parsed


@pytest.mark.parametrize("text", ["KILL@60", "USR3@60", "USR2@soon", "", "B:"])
def test_parse_signal_refuses_signals_a_job_cannot_catch(text):
    with pytest.raises(UsageError, match="--signal"):
        slurm.parse_signal(text)


@pytest.mark.parametrize("nodelist, first", [
    ("n[1-2]", "n1"), ("gpu[003-004,010],login1", "gpu003"), ("node7", "node7"), ("a1,b[2-3]", "a1"),
    ("rack[2-3]-gpu[08-15]", "rack2-gpu08"), ("c[5,7-9]", "c5"),
])
def test_first_host_of_a_hostlist(nodelist, first):
    assert slurm.first_host(nodelist) == first


STEP_ENV = {  # what srun gives task 1 of a 2-node step (as seen on the local cluster)
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NODEID": "1", "SLURM_STEP_NUM_NODES": "2",
    "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_STEP_NODELIST": "gpu[003-004]",
    "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_PROCID": "1",
}


def test_a_job_step_gives_nodes_node_rank_and_the_rendezvous_host():
    where = slurm.allocation(STEP_ENV)
    assert where == engines.Allocation(engine="slurm", job_id="4242", nodes=2, per_node=True, node_rank=1,
                                       first_host="gpu003", master_port=10000 + 4242)
    assert engines.launch_defaults(where, "recipes/mnist_cnn.py") == {
        "nodes": 2, "node_rank": 1, "master_addr": "gpu003", "master_port": 10000 + 4242, "name": "mnist_cnn-4242",
        "wandb_group": "slurm-4242"}
    assert slurm.allocation({}) is None


def test_several_launchers_per_node_are_refused():
    with pytest.raises(UsageError, match="one per node"):
        slurm.allocation({**STEP_ENV, "SLURM_STEP_TASKS_PER_NODE": "8(x2)"})


def test_launch_in_a_job_step_reads_slurm_variables():
    result = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--dry-run", env=STEP_ENV)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for expected in ("--nnodes 2", "--node-rank 1", "--rdzv-endpoint gpu003:14242", "--rdzv-id mnist_cnn-4242",
                     "is_host=0", "DTRAIN_RUN_DIR=runs/mnist_cnn-4242"):
        assert expected in text


def test_launch_in_an_allocation_outside_a_step_runs_itself_under_srun():
    env = {k: v for k, v in STEP_ENV.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_NODES",
                                                           "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")}
    result = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--dry-run", "--", "--epochs", "1", env=env)
    assert result.returncode == 0, result.stderr
    srun, python, rest = result.stdout.strip().partition(" /")[0], *result.stdout.strip().split(" /", 1)[1].split(" ", 1)
    assert srun == "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1"
    assert Path("/" + python).resolve() == Path(sys.executable).resolve()
    assert rest == "-m dtrain.cli launch recipes/mnist_cnn.py --cpu --dry-run -- --epochs 1"


def test_requeued_job_resumes_from_its_own_latest_checkpoint():
    from dtrain.core.contract import read_env
    assert read_env({"DTRAIN_RESUME": "never"}).resume == "never"
    requeued = {"DTRAIN_RESUME": "never", "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
    assert read_env(requeued, slurm.job(requeued)).resume == "auto"


def submitted_4x8() -> spec.LaunchSpec:
    return spec.resolve({"recipe": "recipes/mnist_cnn.py", "recipe_args": ["--epochs", "3", "--data-dir", "/data/mnist"],
                         "gpus": 8, "nodes": 4, "name": "mnist-4x8", "run_dir": "/scratch/alice/dtrain/runs/mnist-4x8",
                         "precision": "bf16", "preempt_signal": "USR2", "max_requeues": 5},
                        gpus_available=8, free_port=0)


def test_each_node_launches_the_submitted_spec_with_its_own_placement(monkeypatch):
    monkeypatch.chdir(ROOT)
    submitted = submitted_4x8()
    where = engines.Allocation(engine="slurm", job_id="4242", nodes=4, node_rank=3, first_host="gpu003",
                               master_port=10000 + 4242)
    placed = engines.place(submitted, where)
    assert (placed.node_rank, placed.master_addr, placed.master_port) == (3, "gpu003", 10000 + 4242)
    assert placed.wandb_group == "mnist-4x8"  # a multi-node run's group: its name, as submitted
    assert placed.replace(node_rank=0, master_addr="127.0.0.1", master_port=29500) == submitted
    with pytest.raises(UsageError, match="runs this step on 2 node"):
        engines.place(submitted, engines.Allocation(engine="slurm", job_id="1", nodes=2, node_rank=0, first_host="a",
                                                    master_port=10001))


def render_4x8(monkeypatch) -> str:
    monkeypatch.chdir(ROOT)
    profile = slurm.load_cluster_profile("cluster/example_gpu.yaml")
    job = slurm.resolve_job({"nodes": 4, "gpus_per_node": 8, "time": "02:00:00"}, profile, "cluster/example_gpu.yaml")
    template = slurm.read_template(None)
    return slurm.render_script(template, job, submitted_4x8(), python="/opt/venv/bin/python",
                               workdir="/scratch/alice/dtrain")


def test_gpu_job_script_is_exactly_the_reviewed_file(monkeypatch):
    """4 nodes x 8 GPUs with cluster/example_gpu.yaml: what users will run, byte for byte.

    After an intended change, rewrite the file with DTRAIN_WRITE_EXPECTED=1 and review the diff.
    """
    rendered = render_4x8(monkeypatch)
    if os.environ.get("DTRAIN_WRITE_EXPECTED"):
        EXPECTED.write_text(rendered)
    assert rendered == EXPECTED.read_text()


def test_profile_and_command_line_meet_in_the_script(monkeypatch):
    script = render_4x8(monkeypatch)
    assert "#SBATCH --time=02:00:00" in script  # the command line wins over the profile's 04:00:00
    assert "#SBATCH --signal=USR2@120" in script and "At most 5 requeues" in script  # from the profile
    assert "module load cuda/12.4\nmodule load nccl/2.21\n" in script
    assert script.index("export NCCL_SOCKET_IFNAME=ib0") < script.index("exec /opt/venv/bin/python -m dtrain.cli")


def bad(*args, env=None):
    result = run_dtrain("slurm", "submit", *args, env=env)
    return result.returncode, result.stderr.strip()


@pytest.mark.parametrize("args, words", [
    (["--nodes", "0", "--cpu"], "--nodes must be at least 1"),
    (["--cpu", "--time", "2h"], "--time '2h' is not a SLURM time"),
    (["--cpu", "--time", "00:01:00", "--signal", "USR2@90"], "would fire 90 s before the end"),
    (["--nodes", "2", "--gpus-per-node", "16", "--cluster-profile", str(ROOT / "cluster" / "example_gpu.yaml")],
     "more than the 8 GPUs per node that cluster profile"),
    (["--nodes", "2"], "--gpus-per-node G"),
    (["--cpu", "--gpus-per-node", "2"], "contradict"),
    (["--cpu", "--signal", "KILL@60"], "is not a signal SLURM can send"),
    (["--cpu", "--signal", "USR1@60", "--preempt-signal", "USR2"], "sends SIGUSR1, but --preempt-signal is USR2"),
    (["--cpu", "--partition", "gpu; rm -rf ~"], "holds a space, quote or shell character"),
    (["--cpu", "--cluster-profile", "cluster/nope.yaml"], "does not exist"),
])
def test_bad_submit_options_get_one_sentence_and_write_nothing(tmp_path, args, words):
    (tmp_path / "r.py").write_text("")
    result = run_dtrain("slurm", "submit", "r.py", "--name", "x", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "r.py"]


def test_submit_without_sbatch_on_path_says_so_and_leaves_nothing(tmp_path):
    (tmp_path / "r.py").write_text("")
    result = run_dtrain("slurm", "submit", "r.py", "--cpu", "--name", "x", cwd=tmp_path,
                        env={"PATH": str(Path(DTRAIN).parent)})
    assert result.returncode == 2
    assert result.stderr.startswith("dtrain: error: sbatch is not on PATH") and "--dry-run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


NO_CONFIG = """scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host
scontrol: error: fetch_config: DNS SRV lookup failed
scontrol: error: _establish_config_source: failed to fetch config
scontrol: fatal: Could not establish a configuration source
"""  # scontrol 22.05 without SLURM_CONF or /etc/slurm/slurm.conf


@pytest.mark.parametrize("command, stderr, sentence", [
    ("scontrol", NO_CONFIG, "SLURM has no configuration on this machine (scontrol: fatal: Could not establish a "
     "configuration source); set SLURM_CONF to the cluster's slurm.conf, or run this on a login node of the cluster."),
    ("sbatch", "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n",
     "the SLURM controller is not answering (sbatch: error: Batch job submission failed: Unable to contact slurm "
     "controller (connect failure)); check it with `scontrol ping`, or start the local one with cluster/local/start.sh."),
    ("scancel", "scancel: error: Invalid job id 99\n", "scancel failed: scancel: error: Invalid job id 99"),
    ("sbatch", "", "sbatch failed: exit code 1"),
])
def test_a_failed_slurm_command_is_one_sentence_that_says_what_to_do(command, stderr, sentence):
    assert slurm.failure(command, stderr, 1) == sentence


def test_a_job_arrays_tasks_as_sbatch_takes_them_and_back():
    assert slurm.array_spec([0, 1, 2, 3], 2) == "0-3%2"
    assert slurm.array_spec([5, 0, 1, 7, 8], 1) == "0-1,5,7-8%1"
    assert slurm.array_indices("0-1,5,7-8%1") == [0, 1, 5, 7, 8]
    assert slurm.array_indices("3") == [3]


def test_max_array_size_is_checked_against_the_highest_index():
    assert slurm.parse_max_array_size("MaxArraySize            = 1001\nMaxJobCount = 10000\n") == 1001
    assert slurm.parse_max_array_size("MaxJobCount = 10000\n") == 1001  # SLURM's default
    slurm.check_array_size(1000, 1001)
    with pytest.raises(UsageError, match="up to index 1001, and this cluster's MaxArraySize is 1001"):
        slurm.check_array_size(1001, 1001)


def test_an_array_task_launches_its_own_runs_spec_and_writes_its_own_output(tmp_path):
    sweep_dir = tmp_path / "it's a sweep"
    out = run_dtrain("slurm", "submit", "recipes/mnist_mlp.py", "--cpu", "--run-dir", str(sweep_dir), "--grid",
                     "lr=1e-3,3e-4", "--parallel", "1", "--dry-run", "--", "--epochs", "1")
    assert out.returncode == 2 and "holds a space, quote or shell character" in out.stderr  # #SBATCH --output
    sweep_dir = tmp_path / "sweep"
    out = run_dtrain("slurm", "submit", "recipes/mnist_mlp.py", "--cpu", "--run-dir", str(sweep_dir), "--grid",
                     "lr=1e-3,3e-4", "--dry-run", "--", "--epochs", "1")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-1%1\n" in out.stdout and f"#SBATCH --output={sweep_dir}/slurm/slurm-%A_%a.out" in out.stdout
    assert out.stdout.rstrip().endswith(f'--spec {sweep_dir}/slurm/task-"${{SLURM_ARRAY_TASK_ID}}".json')
    assert f"# {sweep_dir}/slurm/task-1.json" in out.stdout and not sweep_dir.exists()
    task = out.stdout.split("# ")[2].split("\n", 1)[1].split("\n#!/bin/bash")[0]
    launched = spec.LaunchSpec.from_json(task, "task-1.json")
    assert launched.run_dir == f"{sweep_dir}/001_lr=3e-4" and launched.recipe_args == ("--lr", "3e-4", "--epochs", "1")
    assert launched.wandb_group == "sweep"


def test_a_job_arrays_status_has_a_line_per_run():
    records = [{"JobId": "20", "ArrayJobId": "20", "ArrayTaskId": "2-3%2", "JobState": "PENDING",
                "Reason": "JobArrayTaskLimit", "Restarts": "0"},
               {"JobId": "22", "ArrayJobId": "20", "ArrayTaskId": "1", "JobState": "PENDING", "Reason": "BeginTime",
                "Restarts": "1"}]
    tasks = slurm.array_tasks(records)
    assert sorted(tasks) == [1, 2, 3]
    runs = [(0, "000_lr=1", "finished"), (1, "001_lr=2", "interrupted"), (2, "002_lr=3", "not run"),
            (3, "003_lr=4", "not run")]
    assert slurm.describe_array("20", "grid", runs, tasks).splitlines() == [
        "job array 20 (grid): 4 tasks",
        "  task  job   state                        requeues  run",
        "  0     -     (finished)                   -         000_lr=1",
        "  1     22    PENDING (BeginTime)          1         001_lr=2",
        "  2     20_2  PENDING (JobArrayTaskLimit)  0         002_lr=3",
        "  3     20_3  PENDING (JobArrayTaskLimit)  0         003_lr=4"]


def test_a_job_that_may_shrink_outlives_a_node_and_its_task():
    job = slurm.resolve_job({"nodes": 3, "cpu": True, "min_nodes": 2}, {}, None)
    assert "#SBATCH --no-kill" in "\n".join(slurm.directives(job, "x", "runs/x", "/w", elastic=True))
    assert "--no-kill" not in "\n".join(slurm.directives(job, "x", "runs/x", "/w"))
    assert slurm.srun_command(3, ["dtrain"], elastic=True) == [
        "srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--no-kill", "dtrain"]


@pytest.mark.parametrize("nodelist, hosts", [
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("gpu[009-011],login1", ["gpu009", "gpu010", "gpu011", "login1"]),
    ("n2", ["n2"]),
    ("", []),
])
def test_a_hostlist_expands_as_scontrol_show_hostnames_does(nodelist, hosts):
    assert slurm.hostnames(nodelist) == hosts


def test_the_batch_scripts_fan_out_gives_srun_the_cpus_sbatch_was_given(monkeypatch):
    where = engines.Allocation(engine="slurm", job_id="7", nodes=3, node_rank=0, first_host="n1", master_port=1,
                               per_node=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert slurm.ENGINE.fan_out(where, ["dtrain", "launch"]) == [
        "srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=4", "dtrain", "launch"]
