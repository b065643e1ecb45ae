"""Steered inference: next-token latency and generation throughput, steered against the base model.

Three ways in one process, each its own copy of the model:

* **base**: the model as loaded;
* **LoRA (unmerged)**: ``SteeringAdapter.apply`` on a copy (PEFT LoRA modules on the trained
  layers);
* **merged**: ``SteeringAdapter.merge`` into a copy (the LoRA folded into the weights).

*Next-token latency*: single-token greedy decoding steps on a KV cache (batch 1, after a prefill
of a chat-formatted prompt); the three ways take turns step by step, the order rotated at every
step, so a change of machine load hits them alike; the median step per way. *Tokens/s*:
``model.generate`` of a fixed number of new tokens (greedy, batch 1, prefill included), one call
per way and round, alternated. The targets are within a few per cent, closer than the load noise
of a shared machine, so each ratio is the median of the paired ratios (steered / base of the same
step, or of the same round) rather than the ratio of the two medians; both medians are shown.

The adapter is the one shipped under ``checkpoints/`` for this model when there is one; otherwise a
LoRA adapter on the top 2 layers (rank 8, every linear module, PEFT's initialisation of A and random
non-zero B, so the LoRA path really computes) built with ``lenssteer.train.trainable_top_layers``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import Row, alternate, median, paired_ratio  # noqa: E402

from lenssteer.adapter import AdapterConfig, SteeringAdapter, base_model_description  # noqa: E402
from lenssteer.extract import format_texts  # noqa: E402
from lenssteer.forward import cache_keyword, cache_of_output  # noqa: E402
from lenssteer.models import DEFAULT_MODEL, load_model, model_identity, num_decoder_layers  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
PROMPT = "Translate into French: In the beginning God created the heavens and the earth."


def shipped_adapter(model, root: Path = CHECKPOINTS) -> tuple[SteeringAdapter, str] | None:
    """A shipped LoRA adapter made for this model (same id and fingerprint), with its folder."""
    identity = model_identity(model)
    for config_path in sorted(root.glob("*/adapter_config.json")):
        try:
            section = json.loads(config_path.read_text()).get("lenssteer", {})
        except (OSError, json.JSONDecodeError):
            continue
        base = section.get("base_model", {})
        if section.get("kind") == "lora" and base.get("fingerprint") == identity["fingerprint"]:
            return SteeringAdapter.from_pretrained(config_path.parent), str(config_path.parent)
    return None


def random_lora_adapter(model, n_layers: int = 2, rank: int = 8, seed: int = 0) -> SteeringAdapter:
    """A LoRA adapter on the top ``n_layers`` with random non-zero B (A as PEFT initialises it)."""
    from lenssteer.train import TrainConfig, trainable_top_layers

    total = num_decoder_layers(model)
    trained = list(range(total - n_layers, total))
    config = TrainConfig(kind="lora", n_layers=n_layers, lora_rank=rank)
    torch.manual_seed(seed)
    with trainable_top_layers(model, trained, config) as trainable:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in trainable.parameters().items():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        weights, lora_dict = trainable.adapter_weights()
    adapter_config = AdapterConfig(
        kind="lora",
        base_model=base_model_description(model),
        trained_layers=trained,
        languages=["en", "fr"],
        central_language="en",
        hyperparameters=config.to_dict(),
    )
    return SteeringAdapter(adapter_config, weights, lora_dict)


class Decoder:
    """Greedy decoding one token at a time on a KV cache, restartable from the prompt."""

    def __init__(self, model, input_ids: torch.Tensor) -> None:
        self.model, self.input_ids = model, input_ids
        self.restart()

    @torch.no_grad()
    def restart(self) -> None:
        output = self.model(input_ids=self.input_ids, use_cache=True)
        self.cache = cache_of_output(output)
        self.token = output.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def step(self) -> float:
        """Seconds of one decoding step."""
        started = time.perf_counter()
        output = self.model(
            input_ids=self.token, use_cache=True, **{cache_keyword(self.model): self.cache}
        )
        elapsed = time.perf_counter() - started
        self.cache = cache_of_output(output)
        self.token = output.logits[:, -1].argmax(-1, keepdim=True)
        return elapsed


@torch.no_grad()
def generation_seconds(model, input_ids: torch.Tensor, new_tokens: int, pad_id: int) -> float:
    """Seconds of ``model.generate`` for exactly ``new_tokens`` greedy tokens (batch 1)."""
    started = time.perf_counter()
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return time.perf_counter() - started


def steered_inference(
    model,
    tokenizer,
    rounds: int = 5,
    decode_tokens: int = 8,
    generate_tokens: int = 16,
) -> list[Row]:
    """Rows: latency and tokens/s of the unmerged LoRA and of the merged model against the base."""
    found = shipped_adapter(model)
    if found is not None:
        adapter, source = found
    else:
        adapter = random_lora_adapter(model)
        source = "built here: LoRA r=8 on the top 2 layers, random non-zero B (no shipped adapter)"
    chat = bool(getattr(tokenizer, "chat_template", None))
    text = format_texts(tokenizer, [PROMPT], chat)[0]
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "base": model,
            "lora": adapter.apply(copy.deepcopy(model)).model,
            "merged": adapter.merge(copy.deepcopy(model)),
        }
    # Latency: the three ways take turns step by step (order rotated), so load changes hit all.
    decoders = {name: Decoder(m, input_ids) for name, m in models.items()}
    latency: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(rounds + 1):  # the first round warms up
        for decoder in decoders.values():
            decoder.restart()
        for step in range(decode_tokens):
            ways = {n: d.step for n, d in decoders.items()}
            times = alternate(ways, 1, warmup=0, offset=step)
            if round_index:
                for name, values in times.items():
                    latency[name] += values
    # Tokens/s: one generate() call per way and round, alternated.
    generate = alternate(
        {
            name: (lambda m=m: generation_seconds(m, input_ids, generate_tokens, pad_id))
            for name, m in models.items()
        },
        rounds,
        warmup=1,
    )
    shape = (
        f"prompt {input_ids.shape[1]} tokens, batch 1; latency: median of {rounds} x "
        f"{decode_tokens} decoding steps per way, the ways taking turns step by step; tokens/s: "
        f"generate({generate_tokens} new tokens, prefill included), {rounds} alternated rounds"
    )
    details = {"latency_s": latency, "generate_s": generate, "adapter": source, "setup": shape}
    rows = []
    for way, label, target in (
        ("lora", "LoRA applied (unmerged)", 1.10),
        ("merged", "merged", 1.02),
    ):
        ratio = paired_ratio(latency["base"], latency[way])
        rows.append(
            Row(
                section="4. steered inference",
                name=f"next-token latency: {label} vs base",
                baseline=f"{1000 * median(latency['base']):.1f} ms",
                ours=f"{1000 * median(latency[way]):.1f} ms",
                ratio=ratio,
                target=f"<= {target:.2f}x",
                met=ratio <= target,
                note=shape,
                details=details,
            )
        )
        base_rate = generate_tokens / median(generate["base"])
        way_rate = generate_tokens / median(generate[way])
        ratio = paired_ratio(generate["base"], generate[way])
        rows.append(
            Row(
                section="4. steered inference",
                name=f"generation tokens/s: {label} vs base (slowdown)",
                baseline=f"{base_rate:.2f} tok/s",
                ours=f"{way_rate:.2f} tok/s",
                ratio=ratio,
                target=f"<= {target:.2f}x",
                met=ratio <= target,
                note=f"{shape}; adapter: {source}",
                details=details,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tokenizer, model = load_model(args.model)
    for row in steered_inference(model, tokenizer, args.rounds):
        print(f"{row.name}: {row.baseline} -> {row.ours}, ratio {row.ratio:.3f} ({row.target})")


if __name__ == "__main__":
    main()
