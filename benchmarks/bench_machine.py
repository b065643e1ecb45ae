"""The machine's limit: fp32 matmul GFLOP/s of this CPU, and how much of it a batched forward gets.

* **matmul**: ``torch.mm`` of two random fp32 ``n x n`` matrices, ``2 n^3`` FLOP each; the best
  median over the sizes tried is the machine's practical limit.
* **forward**: ``model(**batch)`` under ``no_grad`` on a full (unpadded) batch of ``B x S`` tokens.
  FLOP estimate: ``2 * N * B * S`` with ``N`` the parameters that multiply every token (all
  parameters except the input embedding table, whose lookup is free; the LM head counts). It leaves
  out attention scores (``4 * layers * S * hidden`` per token, about 1% at S = 128 here) and the
  element-wise work, so the achieved fraction it gives is slightly understated (a lower bound).

Matmuls and forwards alternate in one process; the fraction is forward GFLOP/s over matmul GFLOP/s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import Row, alternate, median, memory_window  # noqa: E402

from lenssteer.models import DEFAULT_MODEL, load_model  # noqa: E402


def flop_parameters(model) -> int:
    """Parameters that multiply each token: all but the input embedding table."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding) + (
        embedding.numel() if model.get_output_embeddings().weight is embedding else 0
    )


def machine_limit(
    model,
    tokenizer,
    sizes: Sequence[int] = (1024, 2048),
    shapes: Sequence[tuple[int, int]] = ((1, 128), (8, 128)),
    rounds: int = 3,
    bf16_size: int | None = 2048,
) -> list[Row]:
    """Rows: matmul GFLOP/s (the limit) and each batch shape's forward GFLOP/s as a fraction of it.

    ``bf16_size``: also report a bf16 matmul of that size (for reference; the model runs in fp32).
    """
    generator = torch.Generator().manual_seed(0)
    matrices = {n: (torch.randn(n, n, generator=generator), torch.randn(n, n)) for n in sizes}
    vocab = model.get_input_embeddings().weight.shape[0]
    batches = {
        shape: torch.randint(100, min(vocab, 30000), shape, generator=generator) for shape in shapes
    }
    n_params = flop_parameters(model)

    def matmul(n: int):
        a, b = matrices[n]

        def run() -> None:
            torch.mm(a, b)

        return run

    def forward(shape: tuple[int, int]):
        ids = batches[shape]

        @torch.no_grad()
        def run() -> None:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

        return run

    ways = {f"matmul {n}": matmul(n) for n in sizes}
    if bf16_size:
        a16, b16 = (torch.randn(bf16_size, bf16_size, dtype=torch.bfloat16) for _ in range(2))

        def matmul_bf16() -> None:
            torch.mm(a16, b16)

        ways[f"matmul bf16 {bf16_size}"] = matmul_bf16
    ways |= {f"forward {b}x{s}": forward((b, s)) for b, s in shapes}
    times = alternate(ways, rounds, warmup=1)
    gflops = {f"matmul {n}": [2 * n**3 / t / 1e9 for t in times[f"matmul {n}"]] for n in sizes}
    for b, s in shapes:
        name = f"forward {b}x{s}"
        gflops[name] = [2 * n_params * b * s / t / 1e9 for t in times[name]]
    best = max(sizes, key=lambda n: median(gflops[f"matmul {n}"]))
    limit = median(gflops[f"matmul {best}"])
    if bf16_size:
        name = f"matmul bf16 {bf16_size}"
        gflops[name] = [2 * bf16_size**3 / t / 1e9 for t in times[name]]
    details = {"gflops": gflops, "seconds": times, "flop_parameters": n_params}
    rows = [
        Row(
            section="5. machine limit",
            name=f"fp32 matmul GFLOP/s (torch.mm, n = {', '.join(map(str, sizes))}; best n={best})",
            baseline="-",
            ours=f"{limit:.1f} GFLOP/s",
            ratio=None,
            target="report",
            met=None,
            note=", ".join(f"n={n}: {median(gflops[f'matmul {n}']):.1f}" for n in sizes),
            details=details,
        )
    ]
    if bf16_size:
        bf16 = median(gflops[f"matmul bf16 {bf16_size}"])
        rows.append(
            Row(
                section="5. machine limit",
                name=f"bf16 matmul GFLOP/s (n={bf16_size}), for reference",
                baseline=f"{limit:.1f} GFLOP/s fp32",
                ours=f"{bf16:.1f} GFLOP/s",
                ratio=bf16 / limit,
                target="report",
                met=None,
                note="the same product in bfloat16 (AMX/AVX-512-BF16 where the CPU has them); "
                "the ratio is bf16 over the fp32 limit",
                details=details,
            )
        )
    largest = max(shapes, key=lambda shape: shape[0] * shape[1])
    for b, s in shapes:
        achieved = median(gflops[f"forward {b}x{s}"])
        fraction = achieved / limit
        large = (b, s) == largest
        rows.append(
            Row(
                section="5. machine limit",
                name=f"forward {b}x{s} tokens, fraction of the matmul limit",
                baseline=f"{limit:.1f} GFLOP/s",
                ours=f"{achieved:.1f} GFLOP/s",
                ratio=fraction,
                target=">= 0.5" if large else "report",
                met=fraction >= 0.5 if large else None,
                note=f"FLOP = 2 x {n_params / 1e6:.0f}M params x {b * s} tokens",
                details=details,
            )
        )
    rows.append(memory_calibration())
    return rows


def memory_calibration(block_mb: int = 64) -> Row:
    """How much a ``block_mb`` block, allocated and touched, grows the measured peak: a check of the
    memory figures' mechanism on this machine (kept out of the unit tests, where a busy machine's
    allocator state made it flaky)."""
    with memory_window() as window:
        block = torch.ones(block_mb * 2**20 // 4)
        block += 1
    del block
    ratio = window.growth_mb / block_mb
    return Row(
        section="5. machine limit",
        name=f"memory probe calibration ({block_mb} MB block, touched)",
        baseline=f"{block_mb} MB",
        ours=f"{window.growth_mb:.1f} MB",
        ratio=ratio,
        target="report (about 1.0)",
        met=None,
        note="peak counter reset" if window.reset else "peak counter could not be reset",
        details={"growth_mb": window.growth_mb, "reset": window.reset},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tokenizer, model = load_model(args.model)
    for row in machine_limit(model, tokenizer, rounds=args.rounds):
        print(f"{row.name}: {row.ours} (ratio {row.ratio}) {row.note}")


if __name__ == "__main__":
    main()
