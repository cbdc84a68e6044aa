"""torchrun (`python -m torch.distributed.run`): the launcher of several nodes and of restarts, and the failure
summary it prints."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

from dtrain.core.contract import worker_env
from dtrain.core.spec import LaunchSpec
from dtrain.launch.launchers import ExitStatus, worker_failure

# Global rank in front of every line torchrun copies to the console or a log file. Given through the
# environment, which torchrun 2.11 and 2.14 both read: 2.11 has no --log-line-prefix-template flag.
LINE_PREFIX = {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]: "}


def files(spec: LaunchSpec) -> dict[str, str]:
    """torchrun reads no file of dtrain's."""
    return {}


def build_command(spec: LaunchSpec, cpus: int, base_env: Mapping[str, str],
                  python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """Every rank's stdout/stderr is written under `<run_dir>/logs/` and teed (`--tee 3`); `job.py` shows
    rank 0's output and only the other ranks' stderr. Rendezvous is c10d in every case: on one node at a
    free local port, on many at MASTER_ADDR:MASTER_PORT with node rank 0 hosting the store, each node
    advertising its address toward node 0, one node the rendezvous address (`--local-addr`: torchrun would
    publish its host name, which need not resolve, as in a network namespace). With
    `--min-nodes K` the rendezvous takes K to all nodes, and a lost node is a restart of the others: at least one
    allowed per node the job may lose. Then the workers' store is not the agents' shared one: a node that was not
    the rendezvous's rank 0 keeps the first round's address of that store, and if rank 0's node is the one lost,
    it sends its new workers to a dead address (torch 2.14's DynamicRendezvousHandler caches it); unshared, each
    round publishes its own."""
    nodes, restarts, elastic = str(spec.nodes), spec.max_restarts, {}
    if spec.min_nodes is not None:
        nodes, restarts = f"{spec.min_nodes}:{spec.nodes}", max(restarts, spec.nodes - spec.min_nodes)
        elastic = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    argv = [
        python, "-m", "torch.distributed.run",
        "--nnodes", nodes,
        "--nproc-per-node", str(spec.nproc),
        "--node-rank", str(spec.node_rank),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{spec.master_addr}:{spec.master_port}",
        "--rdzv-id", spec.name,
        "--rdzv-conf", f"is_host={1 if spec.node_rank == 0 else 0},join_timeout={spec.rdzv_timeout}",
        "--max-restarts", str(restarts),
        *(("--local-addr", spec.network["address"]) if spec.network else
          ("--local-addr", spec.master_addr) if spec.nodes == 1 else ()),
        "--log-dir", spec.log_dir,
        "--tee", "3",
        spec.recipe,
        *spec.recipe_args,
    ]
    return argv, {**worker_env(spec, cpus, base_env), **LINE_PREFIX, **elastic}


_WORKER_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: \d+")
_SUMMARY_FAILURE = re.compile(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)")


def exit_status(launcher_log: str, launcher_code: int) -> ExitStatus:
    """The failed worker's exit code (torchrun itself always exits 1), from torchrun's failure summary
    (`worker_failure`), else its last "failed (exitcode: N)" line. Before any worker: the nodes never met
    (the rendezvous, or accelerate's static store, timed out).
    """
    if "RendezvousTimeoutError" in launcher_log or "client socket has timed out" in launcher_log:
        return ExitStatus(launcher_code, rendezvous_timeout=True)
    if "RendezvousConnectionError" in launcher_log:
        return ExitStatus(launcher_code, store_lost=True)
    summary = [(int(rank), int(code)) for rank, code in _SUMMARY_FAILURE.findall(launcher_log)]
    if summary:
        return worker_failure(summary, launcher_code)
    code = next((int(code) for code in _WORKER_FAILED.findall(launcher_log)[-1:]), 0)
    return ExitStatus(128 - code if code < 0 else code or launcher_code)
