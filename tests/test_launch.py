"""`dtrain launch` and `dtrain debug` with real torchrun processes (gloo, CPU) and real MNIST."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dtrain.core import hardware

from conftest import DTRAIN, ROOT, TEST_RECIPES, metrics, processes_with_env, run_dtrain

sys.path.insert(0, str(ROOT / "recipes"))
from torchvision import datasets

from mnist_cnn import MNISTCNN, to_tensors


def rank_logs(run_dir: Path, rank: int, stream: str = "stdout") -> str:
    return "".join(p.read_text() for p in (run_dir / "logs").glob(f"*/attempt_*/{rank}/{stream}.log"))


def wait_until_gone(run_dir: Path, seconds: float = 10) -> list[int]:
    deadline = time.time() + seconds
    while (left := processes_with_env("DTRAIN_RUN_DIR", str(run_dir))) and time.time() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_two_cpu_processes_train_mnist_to_98_percent(tmp_path, data_dir):
    """Under FSDP (DDP's full epoch: the SLURM job's test, tests/test_slurm_cluster.py): the model sharded, the
    accuracy, and model.pth gathered whole."""
    run_dir = tmp_path / "mnist"
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--strategy", "fsdp", "--run-dir",
                     str(run_dir), "--", "--epochs", "1", "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("Epoch 1/1 | Train Loss: ") and " | Test Acc: " in line and " | Eval Loss: " in line
    final = metrics(run_dir, "epoch")[-1]
    assert final["eval/accuracy"] >= 0.98
    assert f"Test Acc: {100 * final['eval/accuracy']:.2f}%" in line

    # Each rank trained on its own half: ceil(60000 / 2 / 64) = 469 steps, not 938.
    assert final["step"] == 469
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["world_size"] == 2
    assert "Epoch 1/1" in rank_logs(run_dir, 0) and rank_logs(run_dir, 1) == ""

    # The saved weights are a plain state_dict for MNISTCNN on one process, with the same accuracy.
    state = torch.load(run_dir / "model.pth", weights_only=True)
    assert not any(key.startswith("module.") for key in state)
    model = MNISTCNN()
    model.load_state_dict(state)
    model.eval()
    test = datasets.MNIST(data_dir, train=False)
    images, labels = to_tensors(test).tensors
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    assert abs(correct / len(labels) - final["eval/accuracy"]) <= 2 / len(labels)


def test_two_nodes_started_separately_form_one_job(tmp_path, data_dir):
    run_dir = tmp_path / "two-nodes"
    port = hardware.free_port()
    common = ["launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "1", "--nodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(port), "--run-dir", str(run_dir), "--name", "two-nodes"]
    recipe = ["--", "--epochs", "1", "--limit-train-batches", "30", "--limit-eval-batches", "4", "--data-dir", data_dir]
    nodes = [subprocess.Popen([DTRAIN, *common, "--node-rank", str(rank), *recipe], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["world_size"] == 2
    # c10d assigns global ranks at rendezvous: whichever node got rank 0 printed the epoch line.
    assert sum("Epoch 1/1" in stdout for stdout, _ in outputs) == 1
    assert metrics(run_dir)[-1]["step"] == 30
    assert (run_dir / "model.pth").exists()


@pytest.mark.parametrize("launcher, account", [("local", "dtrain agent: rank 1 failed (exitcode: 1)"),
                                               ("torchrun", "ChildFailedError")])
def test_a_rank_that_raises_stops_the_job_and_its_traceback_is_shown_once(tmp_path, launcher, account):
    run_dir = tmp_path / "fail"
    out = run_dtrain("launch", str(TEST_RECIPES / "fail_on_rank1.py"), "--cpu", "--nproc", "2", "--launcher", launcher,
                     "--run-dir", str(run_dir), timeout=120)
    console = out.stdout + out.stderr
    print(console)
    assert out.returncode == 1
    assert console.count("Traceback (most recent call last)") == 1
    assert console.count("[rank1]: ValueError: rank 1 exploded on purpose") == 1
    assert "dtrain: rank 1 failed first (ValueError: rank 1 exploded on purpose)" in out.stderr
    assert account not in console, "the agent's own account belongs in launcher.log"
    assert account in (run_dir / "logs" / "launcher.log").read_text()
    assert wait_until_gone(run_dir) == []


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_dtrain_tears_every_rank_down(tmp_path, sig, code):
    run_dir = tmp_path / "wait"
    proc = subprocess.Popen([DTRAIN, "launch", str(TEST_RECIPES / "wait_forever.py"), "--cpu", "--nproc", "2",
                             "--run-dir", str(run_dir)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().startswith("ready rank 0")
        assert len(processes_with_env("DTRAIN_RUN_DIR", str(run_dir))) == 3  # the agent + 2 workers
        proc.send_signal(sig)
        proc.wait(timeout=40)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert wait_until_gone(run_dir) == []


def test_workers_exit_code_is_the_jobs_exit_code(tmp_path):
    out = run_dtrain("launch", str(TEST_RECIPES / "report_process.py"), "--cpu", "--nproc", "1",
                     "--run-dir", str(tmp_path / "code"), env={"EXIT_CODE": "3"})
    assert out.returncode == 3, out.stderr


def test_debug_runs_the_recipe_inside_the_dtrain_process(tmp_path):
    proc = subprocess.Popen([DTRAIN, "debug", str(TEST_RECIPES / "report_process.py"), "--cpu",
                             "--run-dir", str(tmp_path / "dbg"), "--", "--flag", "a b"],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert stdout.strip() == f"pid={proc.pid} rank=0 world=1 cli_loaded=True args=['--flag', 'a b']"


def test_debug_smoke_run_of_mnist(tmp_path, data_dir):
    run_dir = tmp_path / "debug"
    out = run_dtrain("debug", "recipes/mnist_cnn.py", "--run-dir", str(run_dir), "--",
                     "--epochs", "1", "--limit-train-batches", "20", "--limit-eval-batches", "4", "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    assert "Epoch 1/1" in out.stdout
    assert metrics(run_dir)[-1]["step"] == 20
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["world_size"] == 1

    out = run_dtrain("debug", "recipes/mnist_cnn.py", "--max-steps", "5", "--run-dir", str(tmp_path / "steps"),
                     "--", "--epochs", "3", "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Epoch ") == 1 and metrics(tmp_path / "steps")[-1]["step"] == 5


def test_custom_loop_recipe_with_scheduler_and_clipping(tmp_path, data_dir):
    run_dir = tmp_path / "mlp"
    out = run_dtrain("launch", "recipes/mnist_mlp.py", "--cpu", "--nproc", "2", "--run-dir", str(run_dir), "--",
                     "--epochs", "2", "--limit-train-batches", "100", "--log-every", "10", "--clip", "0.5",
                     "--data-dir", data_dir)
    assert out.returncode == 0, out.stderr
    records = metrics(run_dir)
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["lr"] for r in epochs] == [5e-4, 2.5e-4]  # StepLR halves it every epoch
    assert epochs[-1]["eval/accuracy"] > 0.90
    grad_norms = [r["grad_norm"] for r in records if "grad_norm" in r]
    assert len(grad_norms) == 20 and all(g > 0 for g in grad_norms)
    assert out.stdout.count("Epoch ") == 2


@pytest.mark.parametrize("where", ["all", "1"], ids=["every-rank", "rank-1-only"])
def test_a_recipe_authors_mistake_is_one_sentence_once(tmp_path, where):
    out = run_dtrain("launch", str(TEST_RECIPES / "call_order_mistake.py"), "--cpu", "--nproc", "2",
                     "--run-dir", str(tmp_path / "run"), "--", where, timeout=120)
    assert out.returncode == 1
    console = out.stdout + out.stderr
    sentence = ("dtrain: error: dtrain needs exactly one model prepared with ctx.prepare(model, optimizer) before this "
                "call, and found 0; prepare one model, first.")
    assert console.count(sentence) == 1, console
    assert "Traceback" not in console and "rank 1 failed first" not in console
    assert wait_until_gone(tmp_path / "run") == []
