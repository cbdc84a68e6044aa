"""Checkpoint throughput on this machine: dtrain's save/load against plain torch.save and the disk.

    python bench/checkpoint.py [--params 250e6] [--dir /tmp/dtrain-bench] [--out bench/RESULTS.md]

A model of about 250M float32 parameters with its AdamW state (about 3 GB in all) is written
with: dd (the disk's own fsync'd write speed), torch.save + fsync, dtrain's sync save (DCP,
fsync, sha256 manifest, commit), dtrain's load (with verification), and dtrain's async save,
for which the time the training loop is blocked is what matters.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dtrain.runtime.checkpoint import Checkpointer, TrainState
from dtrain.runtime.strategies.ddp import DCPState


def build(params: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    width = 4096
    layers = max(1, round(params / (width * width + width)))
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()  # creates exp_avg and exp_avg_sq: the state is 3x the parameters
    return model, optimizer


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def dd(path: Path, size: int) -> float:
    count = max(1, size // (16 << 20))
    seconds = timed(lambda: subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"],
        check=True, capture_output=True))
    path.unlink()
    return count * (16 << 20) / seconds


def torch_save(path: Path, model, optimizer) -> float:
    def save():
        with open(path, "wb") as fh:
            torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
    return timed(save)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=250e6)
    parser.add_argument("--dir", default="/tmp/dtrain-bench")
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    model, optimizer = build(args.params)
    n_params = sum(p.numel() for p in model.parameters())
    size = state_bytes(model, optimizer)
    gb = size / 1e9

    rows = [("dd, 16 MiB blocks, conv=fsync", None, dd(work / "dd.bin", size))]
    seconds = torch_save(work / "plain.pt", model, optimizer)
    rows.append(("torch.save + fsync", seconds, size / seconds))

    run = work / "run"
    sync = Checkpointer(run, 0, 1, keep_last=None, async_save=False, strategy="ddp")
    seconds = timed(lambda: sync.save(TrainState(step=1), DCPState(model, [optimizer]), {}))
    rows.append(("dtrain save (DCP, fsync, sha256 manifest, commit)", seconds, size / seconds))

    fresh, fresh_optimizer = build(args.params)
    seconds = timed(lambda: sync.resume("auto", DCPState(fresh, [fresh_optimizer]), {}))
    rows.append(("dtrain load (verify sha256, DCP load)", seconds, size / seconds))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    background = Checkpointer(run, 0, 1, keep_last=None, async_save=True, strategy="ddp")
    blocked = timed(lambda: background.save(TrainState(step=2), DCPState(model, [optimizer]), {}))
    total = blocked + timed(background.wait)
    rows.append(("dtrain --async-checkpoint: training blocked", blocked, size / blocked))
    rows.append(("dtrain --async-checkpoint: until committed", total, size / total))

    lines = [
        f"### Checkpoint throughput ({n_params / 1e6:.0f}M float32 parameters + AdamW state = {gb:.2f} GB)",
        "",
        f"`python bench/checkpoint.py` on {os.cpu_count()} CPU cores, target `{work}`; "
        f"{time.strftime('%Y-%m-%d')}. The page cache is warm for loads.",
        "",
        "| what | seconds | GB/s |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {name} | {'-' if s is None else f'{s:.2f}'} | {rate / 1e9:.2f} |" for name, s, rate in rows]
    sync_s = rows[2][1]
    lines += ["", f"Async save blocks training for {blocked:.2f} s against {sync_s:.2f} s for a sync save "
              f"({blocked / sync_s:.0%})."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n" + text + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
