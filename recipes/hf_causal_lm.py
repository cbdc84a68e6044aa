"""A Hugging Face causal language model (GPT-2) trained through dtrain's Trainer, as a user brings one.

By default it is built from a small `GPT2Config` (no download) and reads the Python standard
library's source as characters (tiny_gpt's corpus); `--pretrained NAME` loads a model and its
tokenizer from the Hub instead, where the network allows. Batches are Hugging Face's dicts
(`input_ids`, `labels`: the model shifts the labels itself), the loss is the model's own, gradients
are clipped, the learning rate warms up and decays every step, and the epoch line shows perplexity.
No block class is named: FSDP and --activation-checkpointing take the model's `_no_split_modules`.

    pip install 'dtrain[hf]'
    dtrain launch recipes/hf_causal_lm.py --cpu --nproc 2 --strategy fsdp --activation-checkpointing -- --epochs 1
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers

from dtrain.runtime import TensorDictDataset, Trainer, setup
from dtrain.runtime.schedules import warmup_cosine

from tiny_gpt import INDEX, UNKNOWN, VOCAB, corpus


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--block", type=int, default=64, help="tokens of context")
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="the peak learning rate, after the warm-up")
    parser.add_argument("--warmup-steps", type=int, default=30)
    parser.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    parser.add_argument("--max-chars", type=int, default=300_000, help="size of the corpus")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch, per process")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--pretrained", default=None, help="a model name on the Hugging Face Hub (needs the network)")
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[transformers.PreTrainedModel, list[int]]:
    """The model, and the corpus as its token ids."""
    text = corpus(args.max_chars)
    if args.pretrained:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.pretrained)
        return transformers.AutoModelForCausalLM.from_pretrained(args.pretrained), tokenizer(text)["input_ids"]
    return export_model(args), [INDEX.get(c, UNKNOWN) for c in text]


# --- what `dtrain export` builds and checks (docs/deploy.md) ----------------------------------------------------

def export_model(args: argparse.Namespace) -> transformers.PreTrainedModel:
    """GPT-2 from its config, its output embedding tied to its input embedding (GPT-2's `tie_word_embeddings`)."""
    if args.pretrained:
        return transformers.AutoModelForCausalLM.from_pretrained(args.pretrained)
    config = transformers.GPT2Config(vocab_size=len(VOCAB), n_positions=args.block, n_embd=args.n_embd,
                                     n_layer=args.n_layer, n_head=args.n_head, bos_token_id=None, eos_token_id=None,
                                     use_cache=False)
    return transformers.GPT2LMHeadModel(config)


def export_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Ids of the character vocabulary, which any pretrained tokenizer's vocabulary is larger than."""
    return {"input_ids": torch.randint(len(VOCAB), (4, args.block), generator=torch.Generator().manual_seed(0))}


def windows(ids: torch.Tensor, block: int) -> TensorDictDataset:
    chunks = ids[: len(ids) // block * block].view(-1, block)
    return TensorDictDataset(input_ids=chunks, labels=chunks)


def compute_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    output = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return output.loss, output.logits


def main() -> None:
    args = parse_args()
    transformers.logging.set_verbosity_error()  # one process per rank: the config's notes once is enough
    ctx = setup(config=vars(args))
    model, ids = build(args)
    ids = torch.tensor(ids, dtype=torch.long)
    split = int(len(ids) * 0.9)
    train_set, val_set = windows(ids[:split], args.block), windows(ids[split:], args.block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    batches = args.limit_train_batches or math.ceil(len(train_set) / (args.batch_size * ctx.world_size))
    steps = args.epochs * math.ceil(batches / ctx.env.grad_accum)
    scheduler = warmup_cosine(optimizer, min(args.warmup_steps, steps // 2), steps)
    trainer = Trainer(ctx, model, optimizer, compute_loss=compute_loss, scheduler=scheduler, scheduler_interval="step",
                      clip_grad_norm=args.clip, metrics={"perplexity": lambda result: math.exp(result["loss"])},
                      batch_size=args.batch_size, log_every=args.log_every)
    trainer.fit(train_set, val_set, epochs=args.epochs, limit_train_batches=args.limit_train_batches)
    trainer.save_model()
    ctx.close()


if __name__ == "__main__":
    main()
