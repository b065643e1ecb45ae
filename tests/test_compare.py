"""The side-by-side comparison on tiny models: identical items for every system, report, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

from lenssteer.adapter import AdapterConfig, AdapterError, SteeringAdapter, base_model_description
from lenssteer.cli import main
from lenssteer.compare import (
    CompareConfig,
    CompareConfigError,
    SystemConfig,
    TaskConfig,
    config_from_dict,
    load_config,
    run_comparison,
    scored_item_ids,
)
from lenssteer.models import model_identity
from lenssteer.subspace import compute_subspace
from lenssteer.task_registry import TaskError, TaskLanguageError, get_task, load_task_file

QUESTIONS = {
    "q1": ("Which number is even?", "Welche Zahl ist gerade?", ["3", "4", "5", "7"], 1),
    "q2": ("Which is a colour?", "Was ist eine Farbe?", ["blue", "run", "seven", "up"], 0),
    "q3": ("Which animal barks?", "Welches Tier bellt?", ["cat", "fish", "dog", "bird"], 2),
    "q4": ("Which is a fruit?", "Was ist eine Frucht?", ["stone", "apple", "chair", "sky"], 1),
}


def make_layers_adapter(model, layer: int, scale: float = 1.3) -> SteeringAdapter:
    """A 'layers' adapter that rescales the weights of one decoder layer (no training needed)."""
    prefix = f"model.layers.{layer}."
    weights = {
        name: param.detach() * scale
        for name, param in model.named_parameters()
        if name.startswith(prefix) and param.dim() == 2
    }
    config = AdapterConfig(
        kind="layers",
        base_model=base_model_description(model),
        trained_layers=[layer],
        languages=["en", "de"],
        central_language="en",
    )
    return SteeringAdapter(config, weights)


def write_task_file(path, languages=("en", "de")) -> None:
    lines = []
    for item_id, (english, german, choices, answer) in QUESTIONS.items():
        for language in languages:
            question = english if language == "en" else german
            record = {
                "id": item_id,
                "language": language,
                "question": question,
                "choices": choices,
                "answer": answer,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    states = {
        lang: torch.randn(10, 2, 32, generator=generator)
        + 3 * torch.randn(1, 2, 32, generator=generator)
        for lang in ("en", "de", "fr")
    }
    compute_subspace(
        states,
        [2, 3],
        "en",
        diagnostics=False,
        metadata={"fingerprint": model_identity(model)["fingerprint"]},
    ).save(root / "subspace")
    make_layers_adapter(model, 3).save_pretrained(root / "adapter")
    other = make_tiny_model("llama", vocab_size=len(tokenizer), seed=5)
    make_layers_adapter(other, 3).save_pretrained(root / "other-adapter")
    write_task_file(root / "toy.jsonl")
    return root, model


def _flat(details: list[dict]) -> list[float]:
    return [value for d in details for value in d["loglikelihoods"]]


def full_config(root, out) -> CompareConfig:
    return CompareConfig(
        model="tiny",
        languages=["en", "de"],
        out=str(out),
        batch_size=3,
        bootstrap_resamples=200,
        tasks=[
            TaskConfig("toy", file=str(root / "toy.jsonl")),
            TaskConfig("mmlu-translated", limit=2),
            TaskConfig("bible-continuation", limit=2),
            TaskConfig("bible-retrieval", limit=4),
            TaskConfig("language-fidelity", limit=2, settings={"max_new_tokens": 3}),
        ],
        systems=[
            SystemConfig("base"),
            SystemConfig("lens", kind="lens", adapter=str(root / "adapter")),
            SystemConfig("xtransplant", kind="xtransplant", source_layer=2, target_layer=0),
            SystemConfig(
                "remove-specific", kind="baseline", subspace=str(root / "subspace"), layers=[3]
            ),
            SystemConfig(
                "shift",
                kind="baseline",
                subspace=str(root / "subspace"),
                mode="language-shift",
                layers=[3],
                strength=3.0,
            ),
        ],
    )


def test_every_system_on_identical_items(setup, tokenizer, tmp_path):
    root, model = setup
    probe = tokenizer(["Hello world"], return_tensors="pt")
    with torch.no_grad():
        before = model(**probe).logits
    document = run_comparison(
        full_config(root, tmp_path / "report"), progress=False, loaded=(tokenizer, model)
    )
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == sorted(
        [
            "report.json",
            "report.md",
            "toy.png",
            "mmlu-translated.png",
            "bible-continuation.png",
            "bible-retrieval.png",
            "language-fidelity.png",
        ]
    )
    outcomes = document["outcomes"]
    cells: dict[tuple, dict[str, list[str]]] = {}
    for o in outcomes:
        cells.setdefault((o["task"], o["metric"], o["language"]), {})[o["system"]] = o["item_ids"]
    for key, by_system in cells.items():
        assert len({tuple(ids) for ids in by_system.values()}) == 1, key  # identical items
        if key[0] != "bible-retrieval":
            assert set(by_system) == {"base", "lens", "xtransplant", "remove-specific", "shift"}
    # Retrieval: targets only, and XTransplant does not apply.
    retrieval = [o for o in outcomes if o["task"] == "bible-retrieval"]
    assert {o["language"] for o in retrieval} == {"de"}
    assert "xtransplant" not in {o["system"] for o in retrieval}
    # XTransplant leaves the central language unpatched: identical to base there.
    by_key = {(o["task"], o["metric"], o["system"], o["language"]): o for o in outcomes}
    for task, metric in [("toy", "acc"), ("bible-continuation", "acc")]:
        base = by_key[(task, metric, "base", "en")]["details"]
        transplanted = by_key[(task, metric, "xtransplant", "en")]["details"]
        assert _flat(base) == pytest.approx(_flat(transplanted), abs=1e-3)
    base_answers = by_key[("language-fidelity", "fidelity", "base", "en")]["details"]
    assert by_key[("language-fidelity", "fidelity", "xtransplant", "en")]["details"] == base_answers
    # The adapter and the baseline change the scores; afterwards the model is the base model again.
    base_ll = _flat(by_key[("toy", "acc", "base", "de")]["details"])
    for system in ("lens", "remove-specific", "xtransplant", "shift"):
        other = _flat(by_key[("toy", "acc", system, "de")]["details"])
        assert other != pytest.approx(base_ll, abs=1e-4), system
    with torch.no_grad():
        assert torch.allclose(model(**probe).logits, before)
    # Report content: intervals, differences and the run's settings.
    summary = document["summary"]
    assert set(summary) == {t.name for t in full_config(root, tmp_path).tasks}
    assert set(summary["mmlu-translated"]) == {"acc_letter", "acc_text", "acc_text_sum"}
    lens_avg = summary["toy"]["acc"]["lens"]["average"]
    assert {"score", "low", "high", "diff", "diff_low", "diff_high"} <= set(lens_avg)
    meta = document["metadata"]
    for key in ("model", "revision", "dtype", "batch_size", "padding_side", "seed", "packages"):
        assert key in meta
    assert meta["batch_size"] == 3 and meta["padding_side"] == "left"
    assert meta["packages"]["torch"] == torch.__version__.split("+")[0] or meta["packages"]["torch"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "difference to base" in markdown and "![toy](toy.png)" in markdown


def test_adapter_for_another_model_is_refused(setup, tokenizer, tmp_path):
    root, model = setup
    config = CompareConfig(
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        tasks=[TaskConfig("toy", file=str(root / "toy.jsonl"))],
        systems=[
            SystemConfig("base"),
            SystemConfig("lens", kind="lens", adapter=str(root / "other-adapter")),
        ],
    )
    with pytest.raises(AdapterError, match="fingerprint"):
        run_comparison(config, progress=False, loaded=(tokenizer, model))
    assert not (tmp_path / "r").exists()


def test_task_file_missing_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_task_file(path)
    lines = path.read_text().splitlines()
    record = json.loads(lines[1])
    del record["answer"]
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskError, match=r"bad\.jsonl: line 2: missing field 'answer'"):
        load_task_file(path)


def test_task_file_wrong_answer_index(tmp_path):
    path = tmp_path / "bad.json"
    items = [
        {"id": "a", "language": "en", "question": "Q?", "choices": ["x", "y"], "answer": 0},
        {
            "id": "b",
            "language": "en",
            "question": "Q?",
            "choices": ["x", "y", "z", "w"],
            "answer": 4,
        },
    ]
    path.write_text(json.dumps({"name": "mine", "items": items}))
    with pytest.raises(
        TaskError,
        match=r"bad\.json: item 2: field 'answer': index 4 is out of range for 4 choices \(0-3\)",
    ):
        load_task_file(path)


def test_language_not_available_in_task(setup, tokenizer, tmp_path):
    root, model = setup
    config = CompareConfig(
        languages=["en", "de", "fr"],
        out=str(tmp_path / "r"),
        tasks=[TaskConfig("toy", file=str(root / "toy.jsonl"))],
        systems=[SystemConfig("base")],
    )
    with pytest.raises(
        TaskLanguageError,
        match=r"task 'toy' \(.*toy\.jsonl\) has no language 'fr'; available: en, de",
    ):
        run_comparison(config, progress=False, loaded=(tokenizer, model))
    with pytest.raises(TaskLanguageError, match="'mmlu-translated' has no language 'ru'"):
        get_task("mmlu-translated").items(["en", "ru"])


def test_config_file_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        'model = "m"\nlanguages = ["en", "de"]\nout = "x"\n'
        "[tasks.mmlu-translated]\nlimit = 5\n"
        '[tasks.mine]\nfile = "mine.jsonl"\n'
        '[systems.base]\nkind = "base"\n'
        '[systems.xt]\nkind = "xtransplant"\nsource_layer = 3\ntarget_layer = 0\n'
    )
    config = load_config(path)
    assert [t.name for t in config.tasks] == ["mmlu-translated", "mine"]
    assert config.tasks[0].limit == 5 and config.tasks[1].file == "mine.jsonl"
    assert [s.kind for s in config.systems] == ["base", "xtransplant"]
    with pytest.raises(CompareConfigError, match=r"unknown key\(s\) \['adaptor'\]"):
        config_from_dict(
            {"tasks": {"mmlu-translated": {}}, "systems": {"base": {}, "l": {"adaptor": "x"}}}
        )
    with pytest.raises(CompareConfigError, match="needs 'adapter'"):
        SystemConfig("l", kind="lens")
    with pytest.raises(CompareConfigError, match="needs a pair"):
        SystemConfig("x", kind="xtransplant")
    with pytest.raises(CompareConfigError, match="reference system 'base'"):
        config_from_dict(
            {"tasks": {"a": {}}, "systems": {"lens": {"kind": "lens", "adapter": "a"}}}
        )


def test_cli_compare_end_to_end(setup, tokenizer, tmp_path, capsys):
    root, model = setup
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "report"
    code = main(
        [
            "compare",
            "--model",
            str(folder),
            "--languages",
            "en,de",
            "--tasks",
            str(root / "toy.jsonl"),
            "--transplant",
            "1,0",
            "--limit",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "toy (acc, targets): base" in printed and "xtransplant" in printed
    report = json.loads((out / "report.json").read_text())
    assert {o["system"] for o in report["outcomes"]} == {"base", "xtransplant"}
    assert all(len(o["item_ids"]) == 3 for o in report["outcomes"])
    # Bad input through the CLI: one line on stderr, exit code 2.
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "a", "language": "en", "question": "Q", "choices": ["x"], "answer": 0}\n'
    )
    code = main(
        ["compare", "--model", str(folder), "--tasks", str(bad), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "line 1: field 'choices' needs at least 2" in capsys.readouterr().err


def test_shared_lower_layers_change_nothing(setup, tokenizer, tmp_path):
    """Top-layer systems replaying the base pass's lower layers score exactly as computed in full."""
    root, model = setup
    config = full_config(root, tmp_path / "a")
    config.tasks = [config.tasks[0], TaskConfig("bible-retrieval", limit=4)]
    shared = run_comparison(config, progress=False, loaded=(tokenizer, model), write=False)
    assert shared["metadata"]["shared_lower_layers"] == "below layer 3"
    full = run_comparison(
        config, progress=False, loaded=(tokenizer, model), write=False, share_lower_layers=False
    )
    assert full["metadata"]["shared_lower_layers"] == "no"
    assert len(full["outcomes"]) == len(shared["outcomes"])
    for a, b in zip(full["outcomes"], shared["outcomes"], strict=True):
        assert (a["task"], a["metric"], a["system"], a["language"]) == (
            b["task"],
            b["metric"],
            b["system"],
            b["language"],
        )
        assert a["values"] == b["values"]
        if a["task"] == "toy":
            assert _flat(a["details"]) == pytest.approx(_flat(b["details"]), abs=1e-4)
        else:
            assert a["details"] == b["details"]  # the same nearest neighbours


@pytest.mark.slow
@pytest.mark.ci
def test_real_model_comparison(tmp_path):
    """SmolLM2 on all four task kinds: base vs XTransplant vs the shipped subspace's baseline."""
    from pathlib import Path

    from lenssteer.models import load_model

    subspace = (
        Path(__file__).resolve().parent.parent / "subspaces" / "smollm2-135m-instruct-bible-5lang"
    )
    config = CompareConfig(
        model="smollm2-135m-instruct",
        languages=["en", "de", "fr"],
        out=str(tmp_path / "report"),
        bootstrap_resamples=500,
        tasks=[
            TaskConfig("mmlu-translated", limit=3),
            TaskConfig("bible-continuation", limit=3),
            TaskConfig("bible-retrieval", limit=8),
            TaskConfig("language-fidelity", limit=2, settings={"max_new_tokens": 12}),
        ],
        systems=[
            SystemConfig("base"),
            SystemConfig("xtransplant", kind="xtransplant", source_layer=10, target_layer=0),
            SystemConfig("remove-specific", kind="baseline", subspace=str(subspace)),
        ],
    )
    document = run_comparison(config, progress=False, loaded=load_model("smollm2-135m-instruct"))
    summary = document["summary"]
    assert list(summary) == [
        "mmlu-translated",
        "bible-continuation",
        "bible-retrieval",
        "language-fidelity",
    ]
    for metrics in summary.values():
        for systems in metrics.values():
            for cells in systems.values():
                for cell in cells.values():
                    assert 0.0 <= cell["score"] <= 1.0
                    assert cell["low"] <= cell["score"] <= cell["high"]
    # SmolLM2 answers an English prompt in English.
    assert summary["language-fidelity"]["fidelity_whole_answer"]["base"]["en"]["score"] == 1.0
    assert (tmp_path / "report" / "language-fidelity.png").stat().st_size < 200_000


def test_cli_adapter_flag_replaces_the_configs_adapter(setup, tokenizer, tmp_path):
    root, model = setup
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = tmp_path / "c.toml"
    config.write_text(
        f'model = "{folder}"\nlanguages = ["en", "de"]\n'
        f'[tasks.toy]\nfile = "{root / "toy.jsonl"}"\nlimit = 2\n'
        '[systems.base]\nkind = "base"\n'
        '[systems.lens]\nkind = "lens"\nadapter = "checkpoints/not-made-yet"\n'
    )
    out = tmp_path / "report"
    argv = ["compare", "--config", str(config), "--out", str(out), "--no-progress"]
    assert main([*argv, "--adapter", str(root / "adapter")]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["systems"]["lens"]["adapter"] == str(root / "adapter")
    assert {o["system"] for o in report["outcomes"]} == {"base", "lens"}
    assert main(argv) == 2  # without the flag, the config's missing adapter is a clear error


def test_xtransplant_pairs_from_file_and_from_dev_selection(setup, tokenizer, tmp_path):
    from lenssteer.transplant_pairs import save_selected_pairs

    root, model = setup
    pairs = tmp_path / "selected_pairs.json"
    save_selected_pairs(pairs, {"de": {"ffn": {"source_layer": 2, "target_layer": 1}}})
    config = CompareConfig(
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        tasks=[TaskConfig("mmlu-translated", limit=2)],
        systems=[
            SystemConfig("base"),
            SystemConfig("from-file", kind="xtransplant", pairs_file=str(pairs)),
            SystemConfig("from-dev", kind="xtransplant", select_on_dev=3),
        ],
    )
    document = run_comparison(config, progress=False, loaded=(tokenizer, model), write=False)
    systems = document["metadata"]["systems"]
    assert systems["from-file"]["pairs"] == {"de": [2, 1]}
    chosen = systems["from-dev"]["pairs"]["de"]
    assert 0 <= chosen[0] < 4 and chosen[1] == 0  # target-first grid
    selection = systems["from-dev"]["selection"]
    assert selection["disjoint_from_scored_items"] is True and len(selection["dev_item_ids"]) == 3
    scored_ids = {i for o in document["outcomes"] for i in o["item_ids"]}
    assert not scored_ids & set(selection["dev_item_ids"])
    scored = {o["system"] for o in document["outcomes"]}
    assert scored == {"base", "from-file", "from-dev"}


def make_lora_adapter(model, layer: int) -> SteeringAdapter:
    """A LoRA adapter on one decoder layer's attention projections, with non-zero weights."""
    import copy

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[layer])
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    generator = torch.Generator().manual_seed(1)
    weights = {
        name: torch.randn(tensor.shape, generator=generator) * 0.5
        for name, tensor in get_peft_model_state_dict(peft_model).items()
    }
    config = AdapterConfig(
        kind="lora",
        base_model=base_model_description(model),
        trained_layers=[layer],
        languages=["en", "de"],
        central_language="en",
    )
    return SteeringAdapter(config, weights, lora.to_dict())


def test_lora_adapter_unit_by_unit(setup, tokenizer, tmp_path):
    """A LoRA adapter is applied and removed for every unit; it steers, and replay stays exact."""
    root, model = setup
    make_lora_adapter(model, 3).save_pretrained(tmp_path / "lora")
    config = CompareConfig(
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        tasks=[
            TaskConfig("toy", file=str(root / "toy.jsonl")),
            TaskConfig("bible-retrieval", limit=3),
        ],
        systems=[
            SystemConfig("base"),
            SystemConfig("lens", kind="lens", adapter=str(tmp_path / "lora")),
        ],
    )
    kwargs = dict(progress=False, loaded=(tokenizer, model), write=False)
    shared = run_comparison(config, **kwargs)
    full = run_comparison(config, share_lower_layers=False, **kwargs)
    by_key = {(o["task"], o["system"], o["language"]): o for o in shared["outcomes"]}
    for o in full["outcomes"]:
        if o["task"] == "toy":
            assert _flat(o["details"]) == pytest.approx(
                _flat(by_key[("toy", o["system"], o["language"])]["details"]), abs=1e-4
            )
    assert _flat(by_key[("toy", "lens", "de")]["details"]) != pytest.approx(
        _flat(by_key[("toy", "base", "de")]["details"]), abs=1e-4
    )
    assert not hasattr(model, "_lenssteer_applied") and not hasattr(model, "peft_config")


def test_pairs_chosen_on_scored_items_are_refused(setup, tokenizer, tmp_path):
    from lenssteer.sampling import OverlapError
    from lenssteer.task_registry import get_task
    from lenssteer.transplant_pairs import save_selected_pairs

    root, model = setup
    scored = get_task("mmlu-translated").items(["en", "de"], 2, 0)["en"]
    pairs = tmp_path / "selected_pairs.json"
    save_selected_pairs(
        pairs,
        {
            "de": {"ffn": {"source_layer": 2, "target_layer": 1}},
            "dev_item_ids": [scored[0].id, "some/other"],
        },
    )
    config = CompareConfig(
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        tasks=[TaskConfig("mmlu-translated", limit=2)],
        systems=[
            SystemConfig("base"),
            SystemConfig("from-file", kind="xtransplant", pairs_file=str(pairs)),
        ],
    )
    with pytest.raises(OverlapError, match=f"also scored: {scored[0].id}"):
        run_comparison(config, progress=False, loaded=(tokenizer, model), write=False)


def test_new_tasks_run_on_a_tiny_model(setup, tokenizer, tmp_path):
    from lenssteer.user_prompts import PROMPT_KINDS

    root, model = setup
    tasks = [
        TaskConfig("mmlu-translated", limit=2),
        TaskConfig("bible-likelihood", limit=3),
        TaskConfig("mmlu-open", limit=2, settings={"max_new_tokens": 3}),
        TaskConfig(
            "language-fidelity", limit=6, settings={"max_new_tokens": 3, "kinds": PROMPT_KINDS}
        ),
    ]
    from lenssteer.multiemo import archive_folder

    if (archive_folder() / "bigbench-1.0.0.tar.gz").is_file():
        tasks.append(TaskConfig("multiemo", limit=2))
    config = CompareConfig(
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        bootstrap_resamples=100,
        tasks=tasks,
        systems=[
            SystemConfig("base"),
            SystemConfig("lens", kind="lens", adapter=str(root / "adapter")),
            SystemConfig("xtransplant", kind="xtransplant", source_layer=2, target_layer=0),
        ],
    )
    document = run_comparison(config, progress=False, loaded=(tokenizer, model))
    summary = document["summary"]
    likelihood = summary["bible-likelihood"]["loglik_per_byte"]
    assert likelihood["base"]["de"]["interval"] == "bootstrap"  # continuous: own unit
    assert likelihood["base"]["de"]["score"] < 0  # a log-likelihood per byte
    assert "mde" in likelihood["lens"]["de"] and likelihood["lens"]["de"]["underpowered"] is False
    assert set(summary["mmlu-open"]) == {"fidelity", "fidelity_whole_answer", "correct"}
    kinds = {
        d["kind"]
        for o in document["outcomes"]
        if o["task"] == "language-fidelity" and o["metric"] == "fidelity"
        for d in o["details"]
    }
    assert kinds <= set(PROMPT_KINDS) and len(kinds) >= 2
    report = (tmp_path / "r" / "report.md").read_text()
    assert "loglik_per_byte**: mean per item, own unit" in report
    if "multiemo" in summary:
        assert document["metadata"]["tasks"]["multiemo"]["provenance"]["label_mismatch"] == 0


def test_language_shift_system_chosen_on_dev_verses(setup, tokenizer, tmp_path):
    root, model = setup
    config = CompareConfig(
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        bootstrap_resamples=100,
        tasks=[TaskConfig("bible-likelihood", limit=3), TaskConfig("bible-continuation", limit=2)],
        systems=[
            SystemConfig("base"),
            SystemConfig(
                "shift",
                kind="language-shift",
                layers=[1, 2],
                strengths=[0.5, 4.0],
                direction_items=4,
                select_on_dev=3,
                criterion="likelihood",
            ),
        ],
    )
    document = run_comparison(config, progress=False, loaded=(tokenizer, model))
    described = document["metadata"]["systems"]["shift"]
    selection = described["selection"]
    assert len(selection["grid"]) == 1 + 2 * 2  # strength 0 once, then every (layer, strength)
    # The report names the criterion this run chose by (it once always said "likelihood").
    assert selection["criterion"].startswith("mean dev log-likelihood")
    assert f"(criterion: {selection['criterion']})" in (tmp_path / "r" / "report.md").read_text()
    best = max(row["dev_loglik_per_byte"] for row in selection["grid"])
    chosen = next(
        row
        for row in selection["grid"]
        if (row["layer"], row["strength"]) == (described["layer"], described["strength"])
    )
    assert chosen["dev_loglik_per_byte"] == best
    dev = set(selection["dev_item_ids"]) | set(selection["direction_item_ids"])
    assert len(dev) == 3 + 4
    scored = {i for o in document["outcomes"] for i in o["item_ids"]}
    assert not dev & scored
    # The central language is never shifted: its rows equal the base model's.
    rows = {
        (o["system"], o["task"], o["language"]): o["values"]
        for o in document["outcomes"]
        if o["metric"] == "loglik_per_byte"
    }
    assert rows[("shift", "bible-likelihood", "en")] == rows[("base", "bible-likelihood", "en")]


def test_language_shift_chosen_by_dev_fidelity_within_the_likelihood_limit(setup, tokenizer):
    """The fidelity criterion: each candidate's dev answers are judged like the fidelity tasks';
    the best fidelity among settings whose dev likelihood stays within the limit is chosen."""
    from lenssteer.language_shift import LanguageShift, answer_fidelity, choose_layer_and_strength
    from lenssteer.task_registry import FIDELITY_INSTRUCTIONS, bible_verse_pairs

    _, model = setup
    items = bible_verse_pairs(["en", "de"], {"bible:1.1.2", "bible:1.1.3"})
    prompts = {
        lang: [f"{FIDELITY_INSTRUCTIONS[lang]}\n\n{item.choices[0]}" for item in rows]
        for lang, rows in items.items()
    }
    hidden = model.config.hidden_size
    means = {"en": torch.zeros(2, hidden), "de": torch.ones(2, hidden)}
    kwargs = dict(dev_prompts=prompts, max_new_tokens=3, criterion="fidelity")
    shift = choose_layer_and_strength(
        model, tokenizer, means, [1, 2], [0.5, 8.0], items, "en", max_likelihood_drop=0.0, **kwargs
    )
    grid = shift.selection["grid"]
    assert len(grid) == 1 + 2 * 2 and all("dev_fidelity" in row for row in grid)
    unshifted = grid[0]["dev_loglik_per_byte"]
    allowed = [row for row in grid if row["dev_loglik_per_byte"] >= unshifted]
    chosen = next(r for r in grid if (r["layer"], r["strength"]) == (shift.layer, shift.strength))
    assert chosen in allowed
    assert chosen["dev_fidelity"] == max(row["dev_fidelity"] for row in allowed)
    # a row's fidelity is what answer_fidelity says for that setting
    again = answer_fidelity(
        model,
        tokenizer,
        LanguageShift(shift.layer, shift.strength, shift.directions),
        "de",
        prompts["de"],
        max_new_tokens=3,
    )
    assert again == chosen["dev_fidelity"]
    # answered one prompt at a time instead of in one batch: the same grid (left padding is exact)
    one_by_one = choose_layer_and_strength(
        model,
        tokenizer,
        means,
        [1, 2],
        [0.5, 8.0],
        items,
        "en",
        max_likelihood_drop=0.0,
        generation_batch_size=1,
        **kwargs,
    )
    assert [row["dev_fidelity"] for row in one_by_one.selection["grid"]] == [
        row["dev_fidelity"] for row in grid
    ]
    with pytest.raises(ValueError, match="needs dev prompts"):
        choose_layer_and_strength(
            model, tokenizer, means, [1], [0.5], items, "en", criterion="fidelity"
        )
    with pytest.raises(ValueError, match="unknown criterion 'best'"):
        choose_layer_and_strength(
            model, tokenizer, means, [1], [0.5], items, "en", criterion="best"
        )


def test_language_shift_changes_target_language_scores(setup, tokenizer):
    from lenssteer.evaluate import ScoringRequest, loglikelihoods
    from lenssteer.language_shift import LanguageShift

    _, model = setup
    shift = LanguageShift(1, 3.0, {"de": torch.ones(32)}, "en")
    request = [ScoringRequest("Im Anfang war", " das Wort", True)]
    before = loglikelihoods(model, tokenizer, request)[0][0]
    with shift.steer(model, "de"):
        steered = loglikelihoods(model, tokenizer, request)[0][0]
    with shift.steer(model, "en"):
        central = loglikelihoods(model, tokenizer, request)[0][0]
    assert steered != pytest.approx(before) and central == pytest.approx(before)
    assert loglikelihoods(model, tokenizer, request)[0][0] == pytest.approx(before)  # removed


def test_an_adapters_training_and_selection_items_are_never_scored(setup, tokenizer, tmp_path):
    """Items a Lens adapter was trained on or had its settings chosen on (corpus ids, e.g.
    ``mmlu:<id>``, ``verse:bible:<id>``), and a config's ``exclude_items``, are dropped from every
    task for every system, and the report says how many."""
    root, model = setup
    tasks = [TaskConfig("mmlu-translated", limit=4), TaskConfig("bible-retrieval", limit=4)]

    def config_for(adapter: str, out: str, **settings) -> CompareConfig:
        return CompareConfig(
            languages=["en", "de"],
            out=str(tmp_path / out),
            bootstrap_resamples=50,
            tasks=tasks,
            systems=[SystemConfig("base"), SystemConfig("lens", kind="lens", adapter=adapter)],
            **settings,
        )

    def run(adapter: str, out: str, **settings) -> dict:
        config = config_for(adapter, out, **settings)
        return run_comparison(config, progress=False, loaded=(tokenizer, model))

    def scored(document: dict, task: str) -> set[str]:
        return {
            item_id for o in document["outcomes"] if o["task"] == task for item_id in o["item_ids"]
        }

    before = run(str(root / "adapter"), "before")
    mmlu_id, verse_id = (
        sorted(scored(before, "mmlu-translated"))[0],
        sorted(scored(before, "bible-retrieval"))[0],
    )
    adapter = make_layers_adapter(model, 3)
    adapter.config.training_items = [f"mmlu:{mmlu_id}", f"verse:{verse_id}", "mmlu:unrelated/0"]
    adapter.save_pretrained(tmp_path / "trained-on-some")
    after = run(str(tmp_path / "trained-on-some"), "after")
    assert scored(after, "mmlu-translated") == scored(before, "mmlu-translated") - {mmlu_id}
    assert scored(after, "bible-retrieval") == scored(before, "bible-retrieval") - {verse_id}
    for o in after["outcomes"]:  # base and lens alike
        assert mmlu_id not in o["item_ids"] and verse_id not in o["item_ids"]
    lens = after["metadata"]["systems"]["lens"]
    assert lens["training_items"] == 3
    assert lens["training_items_not_scored"] == {"mmlu-translated": 1, "bible-retrieval": 1}

    # scored_item_ids (no model) names what a run scores; what settings were chosen on is dropped
    expected = scored_item_ids(config_for(str(root / "adapter"), "unused"))
    assert expected == {
        "mmlu-translated": scored(before, "mmlu-translated"),
        "bible-retrieval": scored(before, "bible-retrieval"),
    }
    adapter.config.training_items = []
    adapter.config.selection_items = [f"mmlu:{mmlu_id}"]
    adapter.save_pretrained(tmp_path / "chosen-on-some")
    chosen = run(str(tmp_path / "chosen-on-some"), "chosen", exclude_items=[verse_id])
    assert scored(chosen, "mmlu-translated") == scored(before, "mmlu-translated") - {mmlu_id}
    assert scored(chosen, "bible-retrieval") == scored(before, "bible-retrieval") - {verse_id}
    systems = chosen["metadata"]["systems"]
    assert systems["lens"]["selection_items_not_scored"] == {"mmlu-translated": 1}
    for name in ("base", "lens"):
        assert systems[name]["excluded_items_not_scored"] == {"bible-retrieval": 1}
    with pytest.raises(CompareConfigError, match="exclude_items"):
        config_for(str(root / "adapter"), "bad", exclude_items="bible:1.1.1").validate()


def test_language_shift_at_strength_zero_reuses_the_base_rows(setup, tokenizer, tmp_path):
    root, model = setup
    config = CompareConfig(
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        bootstrap_resamples=100,
        tasks=[TaskConfig("bible-likelihood", limit=2)],
        systems=[
            SystemConfig("base"),
            SystemConfig(
                "shift", kind="language-shift", layers=[1], strengths=[0.0], direction_items=2
            ),
        ],
    )
    document = run_comparison(config, progress=False, loaded=(tokenizer, model), write=False)
    assert document["metadata"]["systems"]["shift"]["strength"] == 0.0
    rows = {(o["system"], o["language"]): o["values"] for o in document["outcomes"]}
    assert rows[("shift", "de")] == rows[("base", "de")]
    assert document["summary"]["bible-likelihood"]["loglik_per_byte"]["shift"]["de"]["identical"]


def test_an_interrupted_comparison_continues_from_its_journal(
    setup, tokenizer, tmp_path, monkeypatch
):
    """Killed after two units, the same comparison run again scores only the units left, and its
    report equals an uninterrupted run's; a changed setting starts afresh."""
    from lenssteer import compare

    root, model = setup
    config = full_config(root, tmp_path / "report")
    config.tasks = [config.tasks[0], TaskConfig("bible-continuation", limit=2)]
    config.systems = config.systems[:2] + config.systems[3:4]  # base, lens, remove-specific
    reference = run_comparison(config, progress=False, loaded=(tokenizer, model), write=False)
    real_add = compare._Journal.add
    added: list[str] = []

    def add_then_stop(self, unit, outcomes, seconds):
        real_add(self, unit, outcomes, seconds)
        added.append(unit)
        if len(added) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(compare._Journal, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(config, progress=False, loaded=(tokenizer, model))
    journal = tmp_path / ".report.partial.jsonl"
    assert journal.exists() and not (tmp_path / "report").exists()
    with journal.open("a") as handle:
        handle.write('{"unit": "torn')  # killed while writing a line
    first = list(added)

    monkeypatch.setattr(
        compare._Journal, "add", lambda self, *a: added.append(a[0]) or real_add(self, *a)
    )
    document = run_comparison(config, progress=False, loaded=(tokenizer, model))
    resumed = added[2:]
    assert resumed and not set(resumed) & set(first)  # only the units left were scored
    assert document["metadata"]["resumed"].startswith("2 units")
    assert not journal.exists()  # removed with the report written
    assert [
        (o["task"], o["metric"], o["system"], o["language"], o["item_ids"], o["values"])
        for o in document["outcomes"]
    ] == [
        (o["task"], o["metric"], o["system"], o["language"], o["item_ids"], o["values"])
        for o in reference["outcomes"]
    ]

    added.clear()
    monkeypatch.setattr(compare._Journal, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_comparison(config, progress=False, loaded=(tokenizer, model))
    config.batch_size = 2  # another comparison: the journal is not reused
    monkeypatch.setattr(
        compare._Journal, "add", lambda self, *a: added.append(a[0]) or real_add(self, *a)
    )
    document = run_comparison(config, progress=False, loaded=(tokenizer, model))
    assert "resumed" not in document["metadata"]
    assert len(added) - 2 == len(first) + len(resumed)


def test_xtransplant_records_each_donor_once_and_matches_the_definition(
    setup, tokenizer, monkeypatch
):
    """Every target language borrows from the same English prompts: the scorer records them once,
    at every source layer its pairs use, and scores exactly what the patch from scratch gives."""
    import lenssteer.transplant as transplant
    from lenssteer.compare import TransplantScorer

    _, model = setup
    donors = ["Which number is even?", "Which is a colour?", "Which animal barks at night?"]
    recipients = {
        "de": ["Welche Zahl ist gerade?", "Was ist eine Farbe?", "Welches Tier bellt nachts?"],
        "fr": ["Quel nombre est pair ?", "Quelle est une couleur ?", "Quel animal aboie ?"],
    }
    options = [[" 3", " 4 or five"], [" blue", " run"], [" dog", " cat", " a bird"]]
    pairs = {"de": (2, 0), "fr": (1, 1)}
    expected = {}  # the patch from scratch: one donor pass per call
    for language, prompts in recipients.items():
        source, target = pairs[language]
        scores = transplant.transplant_loglikelihoods(
            model, tokenizer, donors, prompts, options, source, target, "ffn", 2, True
        )
        answers = transplant.transplant_generate(
            model, tokenizer, donors, prompts, source, target, "ffn", 4, 2, True, True
        )
        expected[language] = scores, [a.strip() for a in answers]
    recorded: list[str] = []
    real = transplant.record_donor_activations

    def counting(model, tokenizer, prompts, *args, **kwargs):
        recorded.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(transplant, "record_donor_activations", counting)
    config = CompareConfig(languages=["en", "de", "fr"], batch_size=2)
    scorer = TransplantScorer(pairs, "ffn", {}, model, tokenizer, config, False)
    for language, prompts in recipients.items():
        scores, answers = expected[language]
        cached = scorer.score_options(prompts, options, donors, True, language, "test")
        for row, item_options in enumerate(options):
            assert cached[row] == pytest.approx(scores[row, : len(item_options)].tolist())
        assert scorer.generate(prompts, donors, True, language, 4, "test") == answers
    # Two languages, scoring and generation: each donor prompt ran once, at both source layers.
    assert sorted(recorded) == sorted(donors)
    assert set(scorer.donor_cache) == {(d, True) for d in donors}
    assert all(v.shape[0] == 2 for v in scorer.donor_cache.values())  # source layers 1 and 2


def test_task_data_that_cannot_be_read_fails_before_the_model_loads(tmp_path, monkeypatch):
    """multiemo without BIG-bench's archive: the error names the fetch command, and comes before
    any model work (the model named here does not exist, and its error never shows)."""
    from lenssteer.mmlu import TaskDataError

    monkeypatch.setenv("LENSSTEER_CACHE", str(tmp_path / "empty-cache"))
    config = CompareConfig(
        model="no-such-org/no-such-model",
        languages=["en", "de"],
        out=str(tmp_path / "r"),
        tasks=[TaskConfig("multiemo", limit=3)],
        systems=[SystemConfig("base")],
    )
    with pytest.raises(TaskDataError, match="lenssteer.multiemo fetch"):
        run_comparison(config, progress=False)
