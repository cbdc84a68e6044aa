"""What dtrain's Trainer costs per step on a GPT, against the hand-written loop it replaces: the same model,
data, optimizer and precision, paired and alternated in one process.

    python bench/lm.py [--size cpu|gpu] [--pairs 8] [--steps 6] [--settle 2] [--budget 600] [--out bench/RESULTS.md]

tiny_gpt's model (`recipes/tiny_gpt.py`) on its standard-library corpus; `--size cpu`: 10.8M parameters,
`--size gpu`: 352M (see SIZES). One process holds ONE model, optimizer and data set, and trains them in
alternating blocks (ABBA): through `Trainer.train_epoch` in a world of one (as `dtrain launch` runs a
recipe: its logging, FLOP count, system rows and samples/s, W&B and checkpoints off), and through a loop
written as nanoGPT writes one (random windows sliced from a tensor, autocast, backward, step, zero_grad).
Each block first trains `--settle` steps untimed, then times `--steps`; a GPU is synchronised at the
block's edges. Precision: bf16 where the device computes it natively (`--precision auto`'s rule), else
fp32. Reports the Trainer's cost per step (median and quartiles of the per-pair differences), tokens/s and
MFU against the roof of this machine, measured in the same run (`bench/roofline.py`). `--budget` caps the
seconds of the pairs (`bench/gpu_check.sh` gives it 60 on a lent GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))
import roofline  # noqa: E402

from dtrain.core import hardware, spec  # noqa: E402

from compare import publish  # noqa: E402

VOCAB = 97  # tiny_gpt's characters


@dataclasses.dataclass(frozen=True)
class Size:
    d_model: int
    layers: int
    heads: int
    block: int  # characters of context
    batch: int

    def parameters(self, vocab: int = VOCAB) -> int:
        """tiny_gpt's parameter count: embeddings, per layer attention (4 d^2 + 4 d), feed-forward (8 d^2 + 5 d)
        and two LayerNorms (4 d), the final LayerNorm and the head."""
        d = self.d_model
        return (vocab + self.block) * d + self.layers * (12 * d * d + 13 * d) + 2 * d + d * vocab + vocab


SIZES = {"cpu": Size(d_model=384, layers=6, heads=6, block=128, batch=8),
         "gpu": Size(d_model=1024, layers=28, heads=16, block=1024, batch=8)}


def cost_percent(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """The Trainer's extra seconds per step in % of the hand-written loop's: median and quartiles over
    (trainer, hand-written) pairs of seconds per step."""
    differences = sorted(100 * (trainer - hand) / hand for trainer, hand in pairs)
    if len(differences) < 2:
        return differences[0], differences[0], differences[0]
    q1, _, q3 = statistics.quantiles(differences, n=4)
    return statistics.median(differences), q1, q3


def tokens_per_s(seconds_per_step: float, size: Size) -> float:
    return size.batch * size.block / seconds_per_step


def mfu(tokens_per_second: float, flops_per_token: float, roof_flops_per_s: float) -> float:
    """Model FLOPs utilisation: the model's FLOP/s as a fraction of the roof's."""
    return roofline.fraction(tokens_per_second * flops_per_token, roof_flops_per_s)


def render(size_name: str, size: Size, precision: str, roof: roofline.Roof, flops_per_token: float,
           pairs: list[tuple[float, float]], command: str) -> str:
    trainer = statistics.median(p[0] for p in pairs)
    hand = statistics.median(p[1] for p in pairs)
    median, q1, q3 = cost_percent(pairs)
    rows = []
    for label, seconds in (("hand-written loop", hand), ("dtrain Trainer", trainer)):
        rate = tokens_per_s(seconds, size)
        rows.append(f"| {label} | {1000 * seconds:,.1f} | {rate:,.0f} | "
                    f"{mfu(rate, flops_per_token, roof.of(precision)):.1%} |")
    return "\n".join([
        f"### A GPT through the Trainer and through a hand-written loop ({size_name} size, {roof.device}), "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        f"`{command}`: tiny_gpt's model, {size.parameters() / 1e6:.1f}M parameters (d_model {size.d_model}, "
        f"{size.layers} layers, {size.heads} heads), batch {size.batch} x {size.block} characters, AdamW, {precision}; "
        f"{len(pairs)} pairs of alternated blocks. FLOPs per token {flops_per_token / 1e6:,.1f}M "
        f"(torch.utils.flop_counter, forward and backward). Roof: {roof.describe()}.",
        "",
        "| loop | ms per step (median) | tokens/s | MFU of the roof |",
        "| --- | ---: | ---: | ---: |",
        *rows,
        "",
        f"The Trainer's cost per step: median {median:+.2f}% (quartiles {q1:+.2f}%, {q3:+.2f}%).",
    ]) + "\n"


class Bench:
    """One model, optimizer and data set, trained by a Trainer and by a hand-written loop in turn."""

    def __init__(self, size: Size, device: str, precision: str, max_chars: int):
        import torch

        from dtrain.runtime import Trainer, setup

        import tiny_gpt

        os.environ.update({"DTRAIN_RUN_DIR": tempfile.mkdtemp(prefix="dtrain-bench-lm-"), "DTRAIN_WANDB": "disabled",
                           "DTRAIN_DEVICE": device, "DTRAIN_PRECISION": precision,
                           "DTRAIN_CHECKPOINT_EVERY": "never"})
        self.torch, self.size, self.precision = torch, size, precision
        self.ctx = setup()
        self.device = self.ctx.device
        train_set, _ = tiny_gpt.datasets(max_chars, size.block)
        self.inputs, self.labels = (t.to(self.device) for t in (train_set.tensors["input_ids"],
                                                                  train_set.tensors["labels"]))
        model = tiny_gpt.TinyGPT(VOCAB, size.block, size.d_model, size.layers, size.heads)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
        self.trainer = Trainer(self.ctx, model, optimizer, compute_loss=tiny_gpt.compute_loss, batch_size=size.batch,
                               log_every=20, blocks=[torch.nn.TransformerEncoderLayer])
        self.trainer.epochs = 1
        self.model, self.optimizer, self.compute_loss = self.trainer.model, optimizer, tiny_gpt.compute_loss
        self.loader = self.ctx.loader(train_set, size.batch)
        self.generator = torch.Generator(device="cpu").manual_seed(0)
        self.block_number = 0

    def flops_per_token(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self.hand_written(1)
        return counter.get_total_flops() / (self.size.batch * self.size.block)

    def hand_written(self, steps: int) -> None:
        """nanoGPT's loop: random windows, forward under autocast, backward, step, zero_grad."""
        torch = self.torch
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        self.model.train()
        for _ in range(steps):
            index = torch.randint(len(self.inputs), (self.size.batch,), generator=self.generator).to(self.device)
            with amp:
                loss, _ = self.compute_loss(self.model, {"input_ids": self.inputs[index], "labels": self.labels[index]})
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def through_trainer(self, steps: int) -> None:
        self.loader.set_epoch(self.block_number)
        self.block_number += 1
        self.trainer.train_epoch(self.loader, 0, limit_batches=steps)

    def seconds_per_step(self, loop: str, steps: int, settle: int) -> float:
        run = self.through_trainer if loop == "trainer" else self.hand_written
        if settle:
            run(settle)
        self.sync()
        start = time.perf_counter()
        run(steps)
        self.sync()
        return (time.perf_counter() - start) / steps

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--pairs", type=int, default=8, help="pairs of blocks, at most")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per block")
    parser.add_argument("--settle", type=int, default=2, help="untimed steps at the start of each block")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds for the pairs; none starts past it")
    parser.add_argument("--max-chars", type=int, default=1_000_000, help="size of the corpus")
    parser.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = parser.parse_args()

    gpu = hardware.visible_gpus() > 0
    device = "cuda" if gpu else "cpu"
    precision = spec.auto_precision(device, hardware.cpu_flags(), hardware.min_compute_capability() if gpu else None)
    size = SIZES[args.size]
    roof = roofline.measure(seconds=0.5)
    bench = Bench(size, device, precision, args.max_chars)
    flops = bench.flops_per_token()
    deadline = time.monotonic() + args.budget
    pairs: list[tuple[float, float]] = []
    while len(pairs) < args.pairs and (not pairs or time.monotonic() < deadline):
        order = ("trainer", "hand") if len(pairs) % 2 == 0 else ("hand", "trainer")
        seconds = {loop: bench.seconds_per_step(loop, args.steps, args.settle) for loop in order}
        pairs.append((seconds["trainer"], seconds["hand"]))
        print(f"[lm] pair {len(pairs)}: Trainer {1000 * seconds['trainer']:.1f} ms/step, hand-written "
              f"{1000 * seconds['hand']:.1f}", flush=True)
    bench.ctx.close()
    command = "python bench/lm.py " + " ".join(sys.argv[1:])
    publish(render(args.size, size, precision, roof, flops, pairs, command.strip()), args.out)


if __name__ == "__main__":
    main()
