"""A cluster engine from another package: installed (a distribution on the path with a `dtrain.engines` entry
point), never registered by editing dtrain. One engine submits (its options, its files, its commands); the other
only places (a cloud launcher that starts `dtrain launch` on every machine with the placement in the environment)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import dtrain

from conftest import ROOT, run_dtrain

ENGINE_MODULE = '''
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dtrain.core.contract import Job
from dtrain.core.options import SUBMIT, Option
from dtrain.core.spec import dtrain_argv, resolve
from dtrain.engines import Allocation, Submission


@dataclasses.dataclass(frozen=True)
class Fake:
    name: str = "fakesched"
    requeues: bool = False
    description: str = "Submit to the fake scheduler."
    options: tuple = (Option("queue", str, "The fake scheduler's queue.", "engine", commands=frozenset({SUBMIT})),)

    def job(self, environ):
        return Job(self.name, environ["FAKE_JOB"]) if environ.get("FAKE_JOB") else None

    def allocation(self, environ):
        return None

    def requeue(self, job_id):
        raise NotImplementedError

    def fan_out(self, where, argv, elastic=False):
        return list(argv)

    def requeue_without(self, job_id, nodes, needed, announce):
        raise NotImplementedError

    def render(self, given, sources, sweep, workdir, python):
        spec = resolve({**given, "name": "faked", "run_dir": str(Path(workdir) / "runs" / "faked")}, 0, 29500,
                       cpu_flags=None, sources=sources)
        folder = Path(spec.run_dir) / self.name
        job = json.dumps({"queue": given["queue"], "nodes": spec.nodes,
                          "command": dtrain_argv(python) + ["launch", "--spec", str(folder / "spec.json")]})
        return Submission({str(folder / "spec.json"): spec.to_json(), str(folder / "job.json"): job},
                          str(folder / "job.json"), ("submitted {job_id}",))

    def submit(self, submission):
        return "1"

    def status(self, job_id, sweep_status):
        return "fine"

    def cancel(self, job_id):
        pass

    def logs(self, job_id, node, follow, echo):
        echo(f"node {node} of {job_id}\\n")

    def doctor_facts(self, environ):
        return [("fakesched", "here")]


@dataclasses.dataclass(frozen=True)
class Placed:
    """Only the worker face: the placement every machine's environment holds."""

    name: str = "placed"
    requeues: bool = False

    def job(self, environ):
        return Job(self.name, environ["PLACED_JOB"]) if environ.get("PLACED_JOB") else None

    def allocation(self, environ):
        if not environ.get("PLACED_JOB"):
            return None
        return Allocation(self.name, environ["PLACED_JOB"], nodes=int(environ["PLACED_NODES"]),
                          node_rank=int(environ["PLACED_RANK"]), first_host=environ["PLACED_HEAD"], master_port=23456)

    def requeue(self, job_id):
        raise NotImplementedError


FAKE, PLACED = Fake(), Placed()
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The engines' package, installed as pip would leave it: the module, and its dist-info with the entry points."""
    site = tmp_path_factory.mktemp("site")
    (site / "dtrain_fake_engines.py").write_text(ENGINE_MODULE)
    info = site / "dtrain_fake_engines-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dtrain-fake-engines\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [dtrain.engines]
        fakesched = dtrain_fake_engines:FAKE
        placed = dtrain_fake_engines:PLACED
        """))
    return {"PYTHONPATH": str(site)}


def test_no_dtrain_module_names_the_engines():
    sources = " ".join(path.read_text() for path in Path(dtrain.__file__).parent.rglob("*.py"))
    assert "fakesched" not in sources and "dtrain_fake_engines" not in sources


def test_an_installed_engine_gets_its_command_its_options_and_renders_its_files(installed, tmp_path):
    listing = run_dtrain("--help", env=installed)
    assert listing.returncode == 0 and "fakesched" in listing.stdout and "Submit to the fake scheduler." in listing.stdout
    assert "placed" not in listing.stdout  # it submits nothing: no command
    usage = run_dtrain("fakesched", "submit", "--help", env=installed)
    assert usage.returncode == 0, usage.stderr
    assert "--queue TEXT" in usage.stdout and "The fake scheduler's queue." in usage.stdout
    assert "--nodes" in usage.stdout and "--partition" not in usage.stdout  # the table's rows, not SLURM's

    out = run_dtrain("fakesched", "submit", str(ROOT / "recipes" / "mnist_cnn.py"), "--cpu", "--nproc", "2", "--nodes", "2",
                     "--queue", "gold", "--dry-run", "--", "--epochs", "1", cwd=tmp_path, env=installed)
    assert out.returncode == 0, out.stderr
    spec_header, job = "# runs/faked/fakesched/spec.json", out.stdout.strip().splitlines()[-1]
    assert spec_header in out.stdout and '"nproc": 2' in out.stdout and '"--epochs"' in out.stdout
    assert '"queue": "gold"' in job and '"nodes": 2' in job and '"launch", "--spec"' in job
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_a_placement_only_engine_places_dtrain_launch(installed):
    placed = {**installed, "PLACED_JOB": "77", "PLACED_NODES": "2", "PLACED_RANK": "1", "PLACED_HEAD": "10.1.2.3"}
    out = run_dtrain("launch", "recipes/mnist_cnn.py", "--cpu", "--nproc", "2", "--dry-run", env=placed)
    assert out.returncode == 0, out.stderr
    for expected in ("--nnodes 2", "--node-rank 1", "--rdzv-endpoint 10.1.2.3:23456", "--rdzv-id mnist_cnn-77",
                     "DTRAIN_RUN_DIR=runs/mnist_cnn-77"):
        assert expected in out.stdout, out.stdout


def test_an_engine_that_cannot_load_is_one_sentence(tmp_path):
    (tmp_path / "dtrain_broken_engine.py").write_text("raise RuntimeError('its own bug')\n")
    info = tmp_path / "dtrain_broken_engine-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dtrain-broken-engine\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dtrain.engines]\nbroken = dtrain_broken_engine:ENGINE\n")
    out = run_dtrain("--help", env={"PYTHONPATH": str(tmp_path)})
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == ("dtrain: error: engine broken (dtrain_broken_engine:ENGINE) cannot be loaded (RuntimeError: "
                          "its own bug); reinstall the package that provides it, or uninstall it.\n")
