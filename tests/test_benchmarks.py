"""Smoke tests of the benchmark functions on a tiny model: they run and return well-formed rows.

No timing is asserted (times on a shared machine say nothing about correctness); we check the shape
of what each benchmark reports and that the report is written.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_common  # noqa: E402
from bench_common import Row  # noqa: E402


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer) -> str:
    """A tiny Qwen2-shaped model saved with a real tokenizer, loadable by ``load_model``."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    from lenssteer.models import load_model

    return load_model(tiny_folder)


def check_rows(rows: list[Row], section: str, count: int | None = None) -> None:
    assert rows, "no rows"
    if count is not None:
        assert len(rows) == count
    for row in rows:
        assert isinstance(row, Row)
        assert row.section.startswith(section)
        assert row.name and row.baseline and row.ours and row.target
        assert row.met in (True, False, None)
        if row.ratio is not None:
            assert math.isfinite(row.ratio) and row.ratio >= 0
        if row.met is not None:
            assert row.ratio is not None or "memory" in row.name


def test_alternate_rotates_order_and_drops_warmup():
    calls: list[str] = []
    ways = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench_common.alternate(ways, rounds=3, warmup=1)
    assert calls == list("abcbcacababc")
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for values in times.values() for t in values)


def test_alternate_uses_the_seconds_a_way_returns():
    times = bench_common.alternate({"x": lambda: 1.5}, rounds=2, warmup=0)
    assert times == {"x": [1.5, 1.5]}


def test_alternate_offset_shifts_the_order():
    calls: list[str] = []
    bench_common.alternate({n: (lambda n=n: calls.append(n)) for n in "ab"}, 1, warmup=0, offset=1)
    assert calls == ["b", "a"]


def test_paired_ratio_is_the_median_of_pairs():
    assert bench_common.paired_ratio([1.0, 2.0, 4.0], [1.1, 2.0, 40.0]) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        bench_common.paired_ratio([1.0], [])


def test_memory_window_is_well_formed():
    """Only the window's bookkeeping: how much a block grows depends on the allocator and the machine
    (a busy machine gave 0.0 here), so its size is checked where it is measured, in the benchmark's
    calibration row (bench_machine), never in a test."""
    import torch

    with bench_common.memory_window() as window:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        block += 1
    assert window.reset in (True, False)
    assert window.peak_mb >= 0 and window.before_mb >= 0
    assert window.growth_mb == pytest.approx(window.peak_mb - window.before_mb)


def test_machine_info_and_versions():
    info, versions = bench_common.machine_info(), bench_common.versions()
    assert info["cores"] >= 1 and len(info["load_average"]) == 3
    assert {"python", "torch", "transformers", "peft"} <= set(versions)


def test_extract_throughput_rows(loaded):
    import bench_extract

    tokenizer, model = loaded
    rows = bench_extract.throughput(model, tokenizer, n_texts=3, batch_size=2, rounds=1)
    check_rows(rows, "1.", count=3)
    assert rows[0].details["tokens"] > 0


def test_extract_memory_in_subprocesses(tiny_folder):
    import bench_extract

    rows = bench_extract.memory(tiny_folder, batch_size=2, variants=("hidden_states", "extract:1"))
    check_rows(rows, "1.", count=1)
    variants = rows[0].details["variants"]
    assert set(variants) == {"hidden_states", "extract:1"}
    assert all(v["peak_reset"] in (True, False) and v["growth_mb"] >= 0 for v in variants.values())
    # what each hands back: all layers' states + logits vs one pooled vector per text
    assert variants["hidden_states"]["returned_mb"] > variants["extract:1"]["returned_mb"]


def test_machine_limit_rows(loaded):
    import bench_machine

    tokenizer, model = loaded
    rows = bench_machine.machine_limit(
        model, tokenizer, sizes=(64,), shapes=((1, 8), (2, 8)), rounds=1, bf16_size=64
    )
    check_rows(rows, "5.", count=5)  # fp32 limit, bf16 reference, two forwards, memory probe
    assert rows[0].ratio is None and rows[1].met is None and rows[3].met is not None
    assert "memory probe" in rows[4].name and rows[4].met is None
    assert bench_machine.flop_parameters(model) < sum(p.numel() for p in model.parameters())


def test_inference_rows(loaded):
    import bench_inference

    tokenizer, model = loaded
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = bench_inference.steered_inference(
        model, tokenizer, rounds=1, decode_tokens=2, generate_tokens=2
    )
    check_rows(rows, "4.", count=4)
    assert len(rows[0].details["latency_s"]["lora"]) == 2  # rounds x decoding steps
    # the base model is left as it was: the LoRA and the merge went into copies
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all((after[n] == before[n]).all() for n in before)


def test_random_lora_adapter_changes_the_output(loaded):
    import bench_inference
    import torch

    tokenizer, model = loaded
    adapter = bench_inference.random_lora_adapter(model)
    assert any(
        "lora_B" in name and tensor.abs().sum() > 0 for name, tensor in adapter.weights.items()
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with adapter.apply(model) as steered:
            changed = steered(input_ids=ids).logits
    assert not torch.allclose(base, changed)


def test_transplant_rows(loaded):
    import bench_transplant

    tokenizer, model = loaded
    result = bench_transplant.measure_pairs(model, tokenizer, items=1, slow_pairs=1)
    assert result["n_pairs"] == 4  # target-first grid of a 4-layer model
    assert len(result["slow_s"]) == 1 and len(result["fast_s"]) == 1
    assert result["speedup"] > 0


def test_scaling_rows(loaded):
    import bench_scaling

    tokenizer, model = loaded
    rows, table = bench_scaling.scaling(model, tokenizer, points=[(1, 2), (2, 2)])
    check_rows(rows, "6.", count=3)  # extraction, precompute, training epoch
    assert [(e["items"], e["languages"]) for e in table] == [(1, 2), (2, 2)]
    assert table[1]["extract_bytes"] == 2 * table[0]["extract_bytes"]


def test_bf16_rows(loaded):
    import bench_analysis
    import bench_bf16

    tokenizer, model = loaded
    rows = bench_bf16.bf16_rows(
        model,
        tokenizer,
        n_texts=4,
        batch_size=4,
        train_items=1,
        train_languages="en,fr",
        score_items=2,
        generate_tokens=2,
        rounds=1,
    )
    check_rows(rows, "8.", count=5)  # extraction, training step, scoring, generation, memory
    assert rows[-1].ratio == pytest.approx(0.5, abs=0.01)  # parameters: bf16 / fp32 bytes
    assert "autocast_speedup" in rows[1].details
    assert model.dtype == torch.float32  # the float32 model is left as it was
    assert "### 8. bfloat16" in "\n".join(bench_analysis._bf16(rows))


def test_peer_rows_and_their_parity(loaded):
    """The peers (optional 'bench' extra) reproduce our vectors and steered logits."""
    pytest.importorskip("nnsight")
    pytest.importorskip("steering_vectors")
    import bench_peers

    tokenizer, model = loaded
    rows = bench_peers.pooled_activation_rows(model, tokenizer, n_texts=2, batch_size=2, rounds=1)
    rows += bench_peers.language_shift_rows(model, tokenizer, generate_tokens=2, rounds=1)
    rows += bench_peers.xtransplant_rows(model, tokenizer, items=1, pairs_per_item=1)
    check_rows(rows, "9.", count=5)
    assert rows[0].details["parity"] < 1e-4 and rows[1].details["parity"] < 1e-4
    assert rows[2].details["parity"] < 1e-4 < rows[2].details["moved"]
    assert rows[3].details["parity"] < 1e-4  # nnsight's patched log-likelihoods are ours


def test_run_writes_a_report(tiny_folder, tmp_path):
    import run

    output, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    code = run.main(
        [
            "--quick",
            "--model",
            tiny_folder,
            "--sections",
            "extract,train,machine",
            "--output",
            str(output),
            "--json",
            str(raw),
        ]
    )
    assert code == 0
    text = output.read_text()
    assert "| # | comparison |" in text and "Load average" in text
    for section in ("1 |", "2 |", "5 |"):
        assert section in text
    assert "torch" in text and "transformers" in text and "peft" in text
    assert raw.is_file()


def test_run_rejects_unknown_sections():
    import run

    with pytest.raises(SystemExit):
        run.main(["--sections", "extract,nope"])


def test_cli_bench_runs_the_benchmark_script(tiny_folder, tmp_path):
    from lenssteer.cli import main

    output = tmp_path / "bench.md"
    argv = ["bench", "--quick", "--sections", "machine", "--model", tiny_folder]
    assert main([*argv, "--output", str(output)]) == 0
    assert "| 5 | fp32 matmul" in output.read_text()


def test_head_rows_agree_both_ways(loaded):
    import bench_head

    tokenizer, model = loaded
    model.requires_grad_(False)
    try:
        row = bench_head.head_rows(model, tokenizer, limit=2, rounds=1, batch_size=3)
    finally:
        model.requires_grad_(True)
    assert row["requests"] == 2 * 2 * 4  # 2 languages x 2 items x 4 letters
    assert row["max_abs_difference"] < 1e-4
    assert row["speedup"] > 0 and row["plain_s_per_request"] > 0
