"""The one benchmark command: every comparison side by side, medians and ratios, into RESULTS.md.

    .venv/bin/python benchmarks/run.py                 # full run (~10-15 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # smoke run, tiny sizes (~2 min)
    .venv/bin/python benchmarks/run.py --sections extract,inference --output /tmp/r.md
    lenssteer bench --quick                            # the same, through the CLI

Sections: ``extract`` (pooled extraction vs a plain forward; memory), ``train`` (Lens step, fast vs
plain path; reuses bench_train.py), ``transplant`` (XTransplant grid per pair, fast vs from
scratch; reuses bench_transplant.py), ``inference`` (steered next-token latency and tokens/s),
``machine`` (matmul GFLOP/s and the forward's share of it), ``scaling`` (items and languages
double), ``bf16`` (bfloat16 vs float32: extraction, a training step, option scoring,
generation, memory; reuses bench_bf16.py), ``peers`` (nnsight and steering-vectors on the same jobs,
parity first; bench_peers.py; skipped unless the ``bench`` extra is installed). Every comparison
alternates its ways in one process over several rounds and reports the
medians and their ratio; memory is measured in fresh subprocesses.

A full run (all sections, not ``--quick``) writes ``benchmarks/RESULTS.md`` atomically; other runs
print the report unless ``--output`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Threads that wait sleep instead of spinning: on a shared, oversubscribed CPU, spinning OpenMP
# threads made a decoding step 4-8x slower and its time erratic (0.45 s vs 1.3-3.8 s measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from bench_common import Row, isolated_env, load_average, machine_info, versions  # noqa: E402

from lenssteer.io import atomic_write_json, atomic_write_text  # noqa: E402
from lenssteer.models import DEFAULT_MODEL, load_model  # noqa: E402

SECTIONS = ("extract", "train", "transplant", "inference", "machine", "scaling", "bf16", "peers")
RESULTS = HERE / "RESULTS.md"

# Sizes of each section: (full, quick).
SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "extract": (
        {"n_texts": 8, "batch_size": 8, "rounds": 3, "memory_batch": 8, "memory": True},
        {"n_texts": 2, "batch_size": 2, "rounds": 1, "memory_batch": 2, "memory": False},
    ),
    "train": (
        {
            "batch_items": 2,
            "repeats": 3,
            "languages": "en,fr,de,es,ru",
            "memory": True,
            "reference_copy": True,
        },
        {
            "batch_items": 1,
            "repeats": 1,
            "languages": "en,fr",
            "memory": False,
            "reference_copy": False,
        },
    ),
    "transplant": ({"items": 3, "slow_pairs": 2}, {"items": 1, "slow_pairs": 1}),
    "inference": (
        {"rounds": 7, "decode_tokens": 10, "generate_tokens": 8},
        {"rounds": 1, "decode_tokens": 2, "generate_tokens": 2},
    ),
    "machine": (
        {"sizes": (1024, 2048), "shapes": ((1, 128), (8, 128)), "rounds": 3},
        {"sizes": (512,), "shapes": ((1, 16), (2, 32)), "rounds": 1, "bf16_size": 512},
    ),
    "scaling": (
        {"base_items": 3, "rounds": 2, "train": True},
        {"base_items": 1, "rounds": 1, "train": False},
    ),
    "peers": ({"rounds": 3}, {"rounds": 1}),
    "bf16": (
        {"n_texts": 16, "train_items": 2, "score_items": 8, "generate_tokens": 16, "rounds": 5},
        {
            "n_texts": 4,
            "batch_size": 4,
            "train_items": 1,
            "train_languages": "en,fr",
            "score_items": 2,
            "generate_tokens": 2,
            "rounds": 1,
            "memory": False,
        },
    ),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Sections


def run_extract(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    import bench_extract

    tokenizer, model = loaded
    rows = bench_extract.throughput(
        model, tokenizer, size["n_texts"], size["batch_size"], size["rounds"]
    )
    if size["memory"]:
        rows += bench_extract.memory(model_name, batch_size=size["memory_batch"])
    return rows, ""


def _train_args(model_name: str, size: dict[str, Any]) -> argparse.Namespace:
    return argparse.Namespace(
        model=model_name,
        kind="lora",
        layers=2,
        languages=size["languages"],
        batch_items=size["batch_items"],
        repeats=size["repeats"],
        reference_copy=size["reference_copy"],
    )


def _train_memory(args: argparse.Namespace, path: str) -> dict[str, Any]:
    """bench_train.py's own memory mode, in a fresh process per path."""
    command = [
        sys.executable,
        str(HERE / "bench_train.py"),
        "--model", args.model,
        "--kind", args.kind,
        "--layers", str(args.layers),
        "--languages", args.languages,
        "--batch-items", str(args.batch_items),
        "--reference-copy",
        "--_memory-path", path,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=isolated_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_train(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    import bench_train

    args = _train_args(model_name, size)
    timing = bench_train.run_timing(args)
    reference = (
        "a frozen reference copy" if args.reference_copy else "the adapter disabled as reference"
    )
    shape = (
        f"LoRA on layers {timing['trained_layers']}, {timing['batch']}, plain path with "
        f"{reference}; {args.repeats} alternating rounds after a warm-up; one-off precompute "
        f"of the fast path {timing['precompute_s_per_item']:.2f} s per item"
    )
    rows = [
        Row(
            section="2. Lens training step",
            name="step time: fast path vs plain path (speed-up)",
            baseline=f"{timing['plain_median_s']:.3f} s",
            ours=f"{timing['fast_median_s']:.3f} s",
            ratio=timing["speedup"],
            target=">= 8x",
            met=timing["speedup"] >= 8,
            note=shape,
            details=timing,
        )
    ]
    if size["memory"]:
        memory = {path: _train_memory(args, path) for path in ("fast", "plain")}
        fast, plain = memory["fast"], memory["plain"]
        ratio = fast["peak_rss_steps_mb"] / plain["peak_rss_steps_mb"]
        growth = fast["step_growth_mb"] / plain["step_growth_mb"]
        rows.append(
            Row(
                section="2. Lens training step",
                name="peak memory during steps: fast / plain",
                baseline=f"{plain['peak_rss_steps_mb']:.0f} MB",
                ours=f"{fast['peak_rss_steps_mb']:.0f} MB",
                ratio=ratio,
                target="<= 0.6",
                met=ratio <= 0.6,
                note=f"peak RSS of the whole process during 2 steps, each path in a fresh process "
                f"(plain holds the trained model and its frozen reference copy); growth over the "
                f"RSS before the steps: fast +{fast['step_growth_mb']:.0f} MB, plain "
                f"+{plain['step_growth_mb']:.0f} MB (ratio {growth:.2f})",
                details=memory,
            )
        )
    return rows, ""


def run_transplant(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    import bench_transplant

    tokenizer, model = loaded
    result = bench_transplant.measure_pairs(
        model, tokenizer, items=size["items"], slow_pairs=size["slow_pairs"], log=log
    )
    return [
        Row(
            section="3. XTransplant grid",
            name="per (source, target) pair: fast grid vs from scratch (speed-up)",
            baseline=f"{result['slow_median_s']:.3f} s/pair",
            ours=f"{result['fast_median_s']:.4f} s/pair",
            ratio=result["speedup"],
            target=">= 10x",
            met=result["speedup"] >= 10,
            note=f"mmlu-translated en->de, ffn, target-first grid ({result['n_pairs']} pairs), "
            f"{result['items']} items alternating with {size['slow_pairs']} from-scratch pairs "
            f"each, median prompt {result['median_prompt_tokens']} tokens; the fast figure "
            "amortises the donor and prefix passes over the grid"
            + (
                f"; marginal cost of one more pair {result['marginal_median_s']:.4f} s "
                f"({result['marginal_speedup']:.0f}x)"
                if "marginal_median_s" in result
                else ""
            ),
            details=result,
        )
    ], ""


def run_inference(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    import bench_inference

    tokenizer, model = loaded
    return bench_inference.steered_inference(model, tokenizer, **size), ""


def run_machine(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    import bench_machine

    tokenizer, model = loaded
    return bench_machine.machine_limit(model, tokenizer, **size), ""


def run_scaling(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    import bench_scaling

    tokenizer, model = loaded
    points = None if size["base_items"] > 1 else [(1, 2), (2, 2)]
    rows, table = bench_scaling.scaling(
        model, tokenizer, size["base_items"], size["rounds"], points=points, train=size["train"]
    )
    lines = [
        f"Best of {size['rounds']} round(s) per point.",
        "",
        "| items x languages | texts | real tokens | extraction s | kept MB | precompute s | "
        "train epoch s | kept MB (training data) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in table:
        lines.append(
            f"| {entry['items']} x {entry['languages']} | {entry['texts']} | {entry['tokens']} | "
            f"{_num(entry['extract_best_s'])} | {entry['extract_bytes'] / 2**20:.3f} | "
            f"{_num(entry['precompute_best_s'])} | {_num(entry['train_best_s'])} | "
            f"{entry.get('train_bytes', 0) / 2**20:.2f} |"
        )
    return rows, "\n".join(lines)


def run_bf16(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    import bench_bf16

    tokenizer, model = loaded
    memory = model_name if size.get("memory", True) else None
    size = {k: v for k, v in size.items() if k != "memory"}
    return bench_bf16.bf16_rows(model, tokenizer, model_name=memory, **size), ""


def run_peers(model_name: str, loaded, size: dict[str, Any]) -> tuple[list[Row], str]:
    """nnsight and steering-vectors (the optional ``bench`` extra); skipped if not installed."""
    import importlib.util

    missing = [m for m in ("nnsight", "steering_vectors") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"  peers skipped: {', '.join(missing)} not installed (pip install -e '.[bench]')")
        return [], ""
    import bench_peers

    tokenizer, model = loaded
    return bench_peers.peer_rows(model, tokenizer, **size), ""


RUNNERS: dict[str, Callable[[str, Any, dict[str, Any]], tuple[list[Row], str]]] = {
    "extract": run_extract,
    "train": run_train,
    "transplant": run_transplant,
    "inference": run_inference,
    "machine": run_machine,
    "scaling": run_scaling,
    "bf16": run_bf16,
    "peers": run_peers,
}


# --------------------------------------------------------------------------------------------------
# Report


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "-"}[met]


def summary_table(rows: list[Row]) -> str:
    lines = [
        "| # | comparison | plain way | ours | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.section.split('.')[0]} | {row.name} | {row.baseline} | {row.ours} | "
            f"{_num(row.ratio)} | {row.target} | {_met(row.met)} |"
        )
    return "\n".join(lines)


def render(
    rows: list[Row],
    extras: dict[str, str],
    context: dict[str, Any],
    analysis: str,
) -> str:
    """The Markdown report."""
    info, started, ended = context["machine"], context["load_start"], context["load_end"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{context['command']}` ({'quick smoke run' if context['quick'] else 'full run'}, "
        f"sections: {', '.join(context['sections'])}), {context['date']}, "
        f"{context['elapsed_s'] / 60:.1f} min.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, "
        f"{info['memory_gb']} GB RAM, {info['platform']}. Load average (1/5/15 min) at the start "
        f"{' / '.join(map(str, started))}, at the end {' / '.join(map(str, ended))}: other "
        "processes shared the CPU, so absolute times are inflated and noisy; the ratios come from "
        "ways alternated in the same process and are the numbers to read.",
        "",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in context["versions"].items())
        + f". Model: `{context['model']}` (fp32, CPU). Environment: "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}.",
        "",
        "Ratios are oriented like their target: speed-ups are plain / ours, latency and "
        "slowdowns are steered / base, throughput and memory are ours / plain. Each is the ratio "
        "of the two medians, except in section 4, where it is the median of paired ratios (see "
        "its details).",
        "",
        summary_table(rows),
        "",
        "## Details per row",
        "",
    ]
    for row in rows:
        lines.append(f"- **{row.section}, {row.name}**: {row.note}")
    for name, text in extras.items():
        if text:
            lines += ["", f"### {name}", "", text]
    if analysis:
        lines += ["", analysis.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (~2 min)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--skip", default="", help="comma list of sections to leave out")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--output", help="write the Markdown report here (atomically)")
    parser.add_argument("--json", help="also write every row and raw time here")
    args = parser.parse_args(argv)

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = sorted((set(sections) | skip) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    sections = [s for s in SECTIONS if s in sections and s not in skip]
    if args.threads:
        torch.set_num_threads(args.threads)
    full = not args.quick and sections == list(SECTIONS)
    output = Path(args.output) if args.output else (RESULTS if full else None)

    started = time.perf_counter()
    context: dict[str, Any] = {
        "command": " ".join(["python benchmarks/run.py", *map(shlex.quote, sys.argv[1:])])
        if argv is None
        else " ".join(["run.main", *argv]),
        "quick": args.quick,
        "sections": sections,
        "model": args.model,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "versions": versions(),
        "load_start": [round(x, 2) for x in load_average()],
    }
    log(f"load average {context['load_start']}; loading {args.model}")
    loaded = load_model(args.model)
    rows: list[Row] = []
    extras: dict[str, str] = {}
    for section in sections:
        log(f"section {section}")
        size = SIZES[section][1 if args.quick else 0]
        section_rows, extra = RUNNERS[section](args.model, loaded, size)
        for row in section_rows:
            log(
                f"  {row.name}: {row.baseline} -> {row.ours}, ratio {_num(row.ratio)} "
                f"(target {row.target}, met {_met(row.met)})"
            )
        rows += section_rows
        if extra:
            extras[f"Scaling table ({section})"] = extra
    context["load_end"] = [round(x, 2) for x in load_average()]
    context["elapsed_s"] = time.perf_counter() - started
    from bench_analysis import analysis

    report = render(rows, extras, context, analysis(rows, context))
    if output is not None:
        atomic_write_text(output, report)
        log(f"wrote {output}")
    else:
        print(report)
    if args.json:
        atomic_write_json(args.json, {"context": context, "rows": [r.to_dict() for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
