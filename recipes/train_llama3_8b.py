"""Lens with the paper's settings on Llama-3-8B-Instruct (for users with a GPU and the Hugging Face Hub).

**This recipe cannot run on the machines this project is built on** (2 CPU cores, no hub access, no
GPU): it checks for both and exits with a message if either is missing. It is here so that users
with the hardware can reproduce the paper's setting with the same code the quickstart runs.

Settings (Lens, arXiv 2410.04407, and its released script): the top 2 decoder layers train in full
(``kind="layers"``), learning rate 1e-5 with a cosine schedule, warm-up 5% of the steps, weight
decay 0.1, an effective batch of 8 parallel prompts, one epoch over 200 parallel prompts, the
chat template's user turn and the last prompt token's state. Pull, push and retain weights 1 and
``alpha`` 1. The subspace is probed on the same model with the same template and pooling.

Text: public-domain Bible verses in English and five other languages by default (the paper used
Aya prompts in en, zh, ja, ar, ko, bn, sw; pass ``--corpus my_prompts.jsonl --languages ...`` to use
your own parallel prompts).

Run on one GPU (about 40 GB for bf16 weights, gradients and optimizer state of two layers):

    python recipes/train_llama3_8b.py --out checkpoints/llama3-8b-lens

or on several, unchanged:

    accelerate launch --num_processes 4 recipes/train_llama3_8b.py --out checkpoints/llama3-8b-lens
"""

from __future__ import annotations

import argparse
import os
import sys

from lenssteer.threads import prefer_passive_waiting

prefer_passive_waiting()  # OMP_WAIT_POLICY=PASSIVE unless set, before torch loads

MODEL_ID = "meta-llama/Meta-Llama-3-8B-Instruct"
EFFECTIVE_BATCH = 8


def cannot_run_here() -> str | None:
    """Why this recipe cannot run on this machine, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is available (this recipe needs one with about 40 GB of memory)"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return f"HF_HUB_OFFLINE=1: the recipe downloads {MODEL_ID} from the Hugging Face Hub"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL_ID)
    parser.add_argument("--out", default="checkpoints/llama3-8b-instruct-lens")
    parser.add_argument("--subspace-out", default="subspaces/llama3-8b-instruct-lens")
    parser.add_argument("--corpus", default="bible")
    parser.add_argument("--languages", default="en,fr,de,es,ru,ar")
    parser.add_argument("--items", type=int, default=200, help="parallel prompts (paper: 200)")
    args = parser.parse_args()

    reason = cannot_run_here()
    if reason:
        print(f"recipes/train_llama3_8b.py cannot run here: {reason}.", file=sys.stderr)
        print("Use recipes/quickstart.py for the CPU-sized version of the same pipeline.")
        return 2

    import torch

    from lenssteer.data import load_corpus
    from lenssteer.models import load_model
    from lenssteer.quickstart import probe_from_data
    from lenssteer.train import TrainConfig, train_lens
    from lenssteer.training_data import prepare_training_data

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    tokenizer, model = load_model(args.model, dtype=torch.bfloat16, device=f"cuda:{local_rank}")
    corpus = load_corpus(args.corpus, args.languages.split(","), limit=args.items, seed=0)
    config = TrainConfig(
        kind="layers",
        n_layers=2,
        learning_rate=1e-5,
        lr_scheduler_type="cosine",
        warmup_ratio=0.05,
        weight_decay=0.1,
        batch_size=1,
        gradient_accumulation_steps=max(1, EFFECTIVE_BATCH // world_size),
        num_epochs=1.0,
        pull_weight=1.0,
        push_weight=1.0,
        retain_weight=1.0,
        alpha=1.0,
        save_steps=50,
    )
    n_layers = len(model.model.layers)
    trained = list(range(n_layers - config.n_layers, n_layers))
    # One frozen pass: it gives the training inputs and the states the subspace is probed on.
    data = prepare_training_data(
        model, tokenizer, corpus, trained[0], trained, pooling="last", chat_template=True
    )
    subspace = probe_from_data(model, tokenizer, corpus, data)
    if local_rank == 0:
        subspace.save(args.subspace_out)
    adapter = train_lens(
        model,
        tokenizer,
        subspace,
        corpus,
        args.out,
        config,
        data=data,
        resume=True,
        subspace_path=args.subspace_out,
    )
    if local_rank == 0:
        print(f"adapter written to {args.out}: {adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
