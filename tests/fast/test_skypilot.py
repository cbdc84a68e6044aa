"""SkyPilot's engine has the worker face only: on every VM of a task, `dtrain launch` takes the VM's place from
SkyPilot's variables, never 127.0.0.1 for a job of several VMs."""

from __future__ import annotations

from dtrain.engines import skypilot

from conftest import ROOT, run_dtrain

VM = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.9\n", "SKYPILOT_NUM_NODES": "2",
      "SKYPILOT_NUM_GPUS_PER_NODE": "0", "SKYPILOT_TASK_ID": "sky-2026-12-07_train_1"}


def test_a_vms_place_comes_from_skypilots_variables():
    where = skypilot.allocation(VM)
    assert where is not None
    assert (where.engine, where.job_id, where.nodes, where.node_rank, where.first_host, where.master_port) == (
        "skypilot", "sky-2026-12-07_train_1", 2, 1, "10.0.0.7", 29500)
    assert skypilot.allocation({}) is None and skypilot.ENGINE.job({}) is None
    assert skypilot.ENGINE.job(VM).job_id == "sky-2026-12-07_train_1"


def test_dtrain_launch_on_a_vm_takes_its_place_and_skypilot_has_no_command():
    out = run_dtrain("launch", str(ROOT / "recipes" / "mnist_cnn.py"), "--cpu", "--nproc", "2", "--dry-run", env=VM)
    assert out.returncode == 0, out.stderr
    for expected in ("--nnodes 2", "--node-rank 1", "--rdzv-endpoint 10.0.0.7:29500",
                     "--rdzv-id mnist_cnn-sky-2026-12-07_train_1"):
        assert expected in out.stdout, out.stdout
    assert "skypilot" not in run_dtrain("--help").stdout
