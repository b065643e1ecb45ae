"""The command line end to end on a tiny model folder and a small corpus file, and its errors."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_model

from lenssteer.cli import main
from lenssteer.subspace import Subspace

LANGS = ["en", "fr", "de"]
ROWS = [
    {
        "en": f"Verse number {i} speaks of the sea.",
        "fr": f"Le verset {i} parle de la mer.",
        "de": f"Vers {i} spricht vom Meer.",
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "parallel.jsonl"
    path.write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS), encoding="utf-8"
    )
    return str(path)


def probe_args(model, corpus, *extra):
    return [
        "probe",
        "--model",
        model,
        "--corpus",
        corpus,
        "--languages",
        ",".join(LANGS),
        "--limit",
        "12",
        *extra,
    ]


def test_probe_writes_subspace_and_prints_diagnostics(tiny_folder, corpus_file, tmp_path, capsys):
    out = tmp_path / "sub"
    assert main(probe_args(tiny_folder, corpus_file, "--layers=-1,-2", "--out", str(out))) == 0
    printed = capsys.readouterr().out
    assert "lang-ID acc" in printed and "en->fr" in printed
    subspace = Subspace.load(out)
    assert subspace.layers == [2, 3] and subspace.languages == LANGS and subspace.rank == 2
    assert subspace.metadata["pooling"] == "last" and subspace.metadata["template"].startswith(
        "chat:"
    )
    assert subspace.metadata["n_items"] == 12 and len(subspace.metadata["data_hash"]) == 16


def _error_of(args, capsys) -> str:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_unknown_model_name(capsys, corpus_file):
    assert "unknown model 'no-such-model'" in _error_of(
        probe_args("no-such-model", corpus_file), capsys
    )


def test_layer_out_of_range(tiny_folder, corpus_file, capsys):
    err = _error_of(probe_args(tiny_folder, corpus_file, "--layers", "7"), capsys)
    assert "layer index 7 is out of range" in err and "4 decoder layers" in err


def test_rank_not_below_number_of_languages(tiny_folder, corpus_file, capsys):
    err = _error_of(probe_args(tiny_folder, corpus_file, "--rank", "3"), capsys)
    assert "rank 3 is invalid for 3 languages" in err


def test_unknown_language_code(tiny_folder, corpus_file, capsys):
    args = probe_args(tiny_folder, corpus_file)
    args[args.index("--languages") + 1] = "en,fr,xx"
    assert "xx" in _error_of(args, capsys)


def test_misaligned_corpus_rows(tiny_folder, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    rows = [dict(row) for row in ROWS]
    del rows[4]["de"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    err = _error_of(probe_args(tiny_folder, str(path)), capsys)
    assert "bad.jsonl" in err and "de" in err


def test_empty_corpus_item(tiny_folder, tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    rows = [dict(row) for row in ROWS]
    rows[6]["fr"] = "   "
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    err = _error_of(probe_args(tiny_folder, str(path)), capsys)
    assert "empty.jsonl" in err and "fr" in err and "7" in err  # row 7 as a user counts


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", "--help"])
    assert exit_info.value.code == 0
    assert "language-ID accuracy" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("preset", ["lens", "quickstart", "scale-free"])
def test_train_presets_and_overrides(tiny_folder, corpus_file, tmp_path, capsys, preset):
    from lenssteer.adapter import SteeringAdapter
    from lenssteer.train import QUICKSTART_CONFIG, SCALE_FREE_CONFIG, TrainConfig

    subspace = tmp_path / "sub"
    assert main(probe_args(tiny_folder, corpus_file, "--layers=top:2", "--out", str(subspace))) == 0
    out = tmp_path / "adapter"
    args = [
        "train",
        "--model",
        tiny_folder,
        "--subspace",
        str(subspace),
        "--corpus",
        corpus_file,
        "--limit",
        "12",
        "--out",
        str(out),
        "--preset",
        preset,
        "--max-steps",
        "1",
        "--alpha",
        "0.5",
    ]
    assert main(args) == 0
    assert "1 steps" in capsys.readouterr().out
    hyper = SteeringAdapter.from_pretrained(out).config.hyperparameters
    presets = {"quickstart": QUICKSTART_CONFIG, "scale-free": SCALE_FREE_CONFIG}
    expected = presets.get(preset, TrainConfig())
    assert hyper["alpha"] == 0.5  # the flag overrides the preset
    for name in ("pull_weight", "retain_weight", "learning_rate", "pull_space", "normalization"):
        assert hyper[name] == getattr(expected, name), name


def test_probe_and_train_at_the_final_norm(tiny_folder, corpus_file, tmp_path, capsys):
    from lenssteer.adapter import SteeringAdapter

    err = _error_of(
        probe_args(tiny_folder, corpus_file, "--layers=top:2", "--representation", "final_norm"),
        capsys,
    )
    assert "only at the last decoder layer (3)" in err
    subspace = tmp_path / "sub"
    args = probe_args(tiny_folder, corpus_file, "--layers=-1", "--representation", "final_norm")
    assert main([*args, "--out", str(subspace)]) == 0
    assert Subspace.load(subspace).metadata["representation"] == "final_norm"
    train = ["train", "--model", tiny_folder, "--subspace", str(subspace), "--corpus", corpus_file]
    train += ["--limit", "12", "--out", str(tmp_path / "adapter"), "--max-steps", "1"]
    err = _error_of([*train, "--representation", "residual"], capsys)
    assert "probed at representation 'final_norm'" in err
    assert main(train) == 0  # the default is the subspace's representation
    config = SteeringAdapter.from_pretrained(tmp_path / "adapter").config
    assert config.representation["point"] == "final_norm" and config.loss_layers == [3]
    # compare builds both systems at that point: the baseline edits the final norm's output
    task = tmp_path / "toy.jsonl"
    records = [
        {"id": f"q{i}", "language": lang, "question": row[lang], "choices": ["a", "b"], "answer": 0}
        for i, row in enumerate(ROWS[:3])
        for lang in ("en", "fr")
    ]
    task.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    compare = ["compare", "--model", tiny_folder, "--languages", "en,fr", "--tasks", str(task)]
    compare += ["--adapter", str(tmp_path / "adapter"), "--subspace", str(subspace)]
    assert main([*compare, "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    systems = report["metadata"]["systems"]
    assert systems["lens"]["representation"] == "final_norm"
    assert systems["remove-specific"]["representation"] == "final_norm"
    assert systems["remove-specific"]["layers"] == "-1"  # the only layer of such a subspace
