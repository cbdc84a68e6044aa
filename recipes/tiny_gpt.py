"""A tiny character-level GPT trained on the Python standard library's own source files.

The corpus needs no download: every Python installation carries it. A stack of
`TransformerEncoderLayer` blocks with a causal mask is a model where sharding (--strategy fsdp,
zero2, zero3) and --activation-checkpointing matter; its blocks are declared to dtrain. Batches
are dicts (`input_ids`, `labels`), the loss is the recipe's `compute_loss`, the learning rate warms
up and decays (cosine) every optimizer step, and evaluation reports perplexity.

    dtrain launch recipes/tiny_gpt.py --cpu --nproc 2 --strategy fsdp -- --epochs 1
    dtrain launch recipes/tiny_gpt.py --cpu --nproc 2 --activation-checkpointing -- --max-chars 200000
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from dtrain.runtime import Context, TensorDictDataset, Trainer, setup
from dtrain.runtime.schedules import warmup_cosine

VOCAB = [chr(c) for c in range(32, 127)] + ["\n", "\t"]  # printable ASCII; anything else reads as "?"
INDEX = {c: i for i, c in enumerate(VOCAB)}
UNKNOWN = INDEX["?"]


def corpus(max_chars: int) -> str:
    """The standard library's top-level modules, in name order, up to `max_chars` characters."""
    stdlib = Path(os.__file__).parent
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "".join(parts)[:max_chars]


def windows(ids: torch.Tensor, block: int, stride: int) -> TensorDictDataset:
    """Windows of `block` characters (`input_ids`) and the next character at each place (`labels`),
    starting every `stride` characters."""
    starts = torch.arange(0, len(ids) - block - 1, stride)
    index = starts[:, None] + torch.arange(block + 1)
    chunks = ids[index]
    return TensorDictDataset(input_ids=chunks[:, :-1], labels=chunks[:, 1:])


def datasets(max_chars: int, block: int, held_out: float = 0.1) -> tuple[TensorDictDataset, TensorDictDataset]:
    """Train on the first 90% of the corpus, validate on the rest (non-overlapping windows)."""
    text = corpus(max_chars)
    ids = torch.tensor([INDEX.get(c, UNKNOWN) for c in text], dtype=torch.long)
    split = int(len(ids) * (1 - held_out))
    return windows(ids[:split], block, block // 2), windows(ids[split:], block, block)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, block: int, d_model: int = 128, layers: int = 4, heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(block, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.position(torch.arange(length, device=input_ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=input_ids.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def next_char_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(batch["input_ids"])
    return next_char_loss(logits, batch["labels"]), logits


def perplexity(result: dict[str, float]) -> float:
    return math.exp(result["loss"])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--block", type=int, default=128, help="characters of context")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-3, help="the peak learning rate, after the warm-up")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--max-chars", type=int, default=1_000_000, help="size of the corpus")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch, per process")
    parser.add_argument("--log-every", type=int, default=20)
    return parser.parse_args(argv)


def export_model(args: argparse.Namespace) -> TinyGPT:
    """The model `main` trains, for `dtrain export` (docs/deploy.md); also what main builds."""
    return TinyGPT(len(VOCAB), args.block, args.d_model, args.layers, dropout=args.dropout)


def export_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(len(VOCAB), (8, args.block), generator=torch.Generator().manual_seed(0))}


def export_dims(args: argparse.Namespace) -> dict[str, dict[int, tuple[str, int, int]]]:
    """Any context up to the trained one: the position table has `block` rows."""
    return {"input_ids": {1: ("sequence", 1, args.block)}}


def main() -> None:
    args = parse_args()
    ctx: Context = setup(config=vars(args))
    train_set, val_set = datasets(args.max_chars, args.block)
    model = export_model(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    batches = args.limit_train_batches or math.ceil(len(train_set) / (args.batch_size * ctx.world_size))
    steps = args.epochs * math.ceil(batches / ctx.env.grad_accum)  # optimizer steps of the whole run
    scheduler = warmup_cosine(optimizer, min(args.warmup_steps, steps // 2), steps)
    trainer = Trainer(ctx, model, optimizer, compute_loss=compute_loss, scheduler=scheduler, scheduler_interval="step",
                      metrics={"perplexity": perplexity}, batch_size=args.batch_size, eval_batch_size=64,
                      log_every=args.log_every, blocks=[nn.TransformerEncoderLayer])
    trainer.fit(train_set, val_set, epochs=args.epochs, limit_train_batches=args.limit_train_batches)
    trainer.save_model()
    ctx.close()


if __name__ == "__main__":
    main()
