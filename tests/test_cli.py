"""The command line end to end on a tiny model folder and a small corpus file, and its errors."""

from __future__ import annotations

import json
import shlex

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
    from lenssteer.train import PRESETS

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
        "--language-alpha",
        "de=0.1",
    ]
    assert main(args) == 0
    assert "1 steps" in capsys.readouterr().out
    hyper = SteeringAdapter.from_pretrained(out).config.hyperparameters
    expected = PRESETS[preset]
    assert hyper["alpha"] == 0.5  # the flag overrides the preset
    assert hyper["language_alpha"] == {"de": 0.1}
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


# --------------------------------------------------------------------------------------------------
# One vocabulary: layer specs, --central/--languages, --no-progress, recorded command lines


def _argparse_error(args, capsys) -> str:
    """An argparse refusal: exit code 2 before any work, one ``error:`` line naming the flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _parsed(args) -> dict:
    from lenssteer.cli import build_parser

    namespace = vars(build_parser().parse_args(args))
    namespace.pop("handler")
    return namespace


@pytest.mark.parametrize(
    "args, named",
    [
        (["probe", "--layers", "top:x"], ["--layers", "top:x", "positive integer K"]),
        (["probe", "--layers", "top:0"], ["--layers", "top:0"]),
        (["probe", "--layers", "1,b"], ["--layers", "'b' is not an integer"]),
        (["transplant-grid", "--out", "g", "--sources", "top:"], ["--sources", "top:"]),
        (["transplant-grid", "--out", "g", "--targets", "x"], ["--targets", "'x'"]),
        (["train", "--subspace", "s", "--out", "a", "--layers", "0,1"], ["--layers", "top:K"]),
        (["train", "--subspace", "s", "--out", "a", "--layers", "all"], ["--layers", "'all'"]),
        (
            ["train", "--subspace", "s", "--out", "a", "--language-alpha", "de=0.1,fr"],
            ["--language-alpha", "'fr' is not LANGUAGE=NUMBER"],
        ),
        (
            ["train", "--subspace", "s", "--out", "a", "--language-alpha", "de=inf"],
            ["--language-alpha", "'de=inf'"],
        ),
        (["train", "--subspace", "s", "--out", "a", "--layers", "top:y"], ["--layers", "top:y"]),
        (
            ["train", "--subspace", "s", "--out", "a", "--layers", "top:2", "--top-layers", "3"],
            ["--top-layers", "not allowed with argument --layers"],
        ),
        (
            [
                "transplant",
                "--source",
                "0",
                "--target",
                "0",
                "--central",
                "en",
                "--donor-lang",
                "fr",
            ],
            ["--donor-lang", "not allowed with argument --central"],
        ),
        (
            ["transplant-grid", "--out", "g", "--languages", "de", "--recipient-lang", "fr"],
            ["--recipient-lang", "not allowed with argument --languages"],
        ),
    ],
)
def test_bad_flags_are_one_line_errors_naming_them(args, named, capsys):
    line = _argparse_error(args, capsys)
    assert line.startswith(f"lenssteer {args[0]}: error: argument ")
    for text in named:
        assert text in line, (text, line)


def test_old_spellings_parse_to_the_same_namespace():
    pair = ["--source", "0", "--target", "1"]
    assert _parsed(["transplant", *pair, "--donor-lang", "fr", "--recipient-lang", "de"]) == (
        _parsed(["transplant", *pair, "--central", "fr", "--languages", "de"])
    )
    grid = ["transplant-grid", "--out", "g"]
    assert _parsed([*grid, "--donor-lang", "en", "--recipient-lang", "de,fr"]) == _parsed(
        [*grid, "--central", "en", "--languages", "de,fr"]
    )
    assert _parsed([*grid, "--central", "en"]) == _parsed([*grid, "--donor-lang", "en"])
    train = ["train", "--subspace", "s", "--out", "a"]
    assert _parsed([*train, "--top-layers", "3"]) == _parsed([*train, "--layers", "top:3"])
    assert _parsed(train)["top_layers"] is None  # the default, top:2
    for command in (["probe"], grid, train, ["compare"], ["transplant", *pair]):
        assert _parsed(command)["progress"] is True
        assert _parsed([*command, "--no-progress"])["progress"] is False


def test_layer_specs_are_checked_before_work_and_resolved_against_the_model():
    # the syntax of models.resolve_layers, kept as text until the model is loaded
    assert _parsed(["probe", "--layers=-1,-2"])["layers"] == "-1,-2"
    assert _parsed(["transplant-grid", "--out", "g", "--sources", "top:2"])["sources"] == "top:2"
    from lenssteer.transplant_pairs import grid_pairs

    assert grid_pairs("explicit", 4, "top:2", "-4") == [(2, 0), (3, 0)]
    assert grid_pairs("overall", 3, "all", [0]) == [(0, 0), (1, 0), (2, 0)]
    assert grid_pairs("target-first", 4, "0,-1") == [(0, 0), (3, 0)]


def test_probe_no_progress_and_recorded_command(tiny_folder, corpus_file, tmp_path, capsys):
    args = probe_args(tiny_folder, corpus_file, "--layers=-1", "--out", str(tmp_path / "a"))
    assert main(args) == 0
    assert "%|" in capsys.readouterr().err  # the extraction's progress bar
    quiet = probe_args(tiny_folder, corpus_file, "--layers=-1", "--no-progress")
    quiet += ["--out", str(tmp_path / "b")]
    assert main(quiet) == 0
    assert "%|" not in capsys.readouterr().err
    assert Subspace.load(tmp_path / "b").metadata["command"] == shlex.join(["lenssteer", *quiet])


def test_transplant_grid_new_spelling_layer_specs_and_command(tiny_folder, tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["transplant-grid", "--model", tiny_folder, "--central", "en", "--languages", "en,de"]
    argv += ["--mode", "explicit", "--sources", "top:2", "--targets=-4", "--limit", "4"]
    argv += ["--no-control", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "%|" not in capsys.readouterr().err
    result = json.loads((out / "grid.json").read_text())
    assert result["recipient_languages"] == ["de"]  # the central language listed is no recipient
    assert result["languages"]["de"]["ffn"]["pairs"] == [[2, 0], [3, 0]]
    assert result["command"] == shlex.join(["lenssteer", *argv])


def test_transplant_records_command_and_checks_recipients(tiny_folder, tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = ["transplant", "--model", tiny_folder, "--source", "-1", "--target", "0"]
    argv += ["--central", "en", "--languages", "de", "--limit", "2", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "%|" not in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["command"] == shlex.join(["lenssteer", *argv, "--out", str(out)])
    assert result["recipient_language"] == "de" and result["source_layer"] == 3
    base = ["transplant", "--model", tiny_folder, "--source", "0", "--target", "0"]
    err = _error_of([*base, "--languages", "de,fr"], capsys)
    assert "--languages de,fr" in err and "one recipient language" in err
    err = _error_of([*base, "--donor-lang", "de", "--recipient-lang", "de"], capsys)
    assert "no recipient language other than the central language de" in err


def test_train_layers_top_k_and_no_progress(tiny_folder, corpus_file, tmp_path, capsys):
    from lenssteer.adapter import SteeringAdapter

    subspace = tmp_path / "sub"
    probe = probe_args(tiny_folder, corpus_file, "--layers=top:2", "--no-progress")
    assert main([*probe, "--out", str(subspace)]) == 0
    out = tmp_path / "adapter"
    args = ["train", "--model", tiny_folder, "--subspace", str(subspace), "--corpus", corpus_file]
    args += ["--limit", "12", "--out", str(out), "--max-steps", "1", "--layers", "top:1"]
    assert main([*args, "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "1 steps" in captured.out and "%|" not in captured.err
    adapter = SteeringAdapter.from_pretrained(out)
    assert adapter.config.trained_layers == [3]
    assert adapter.config.metrics["command"] == shlex.join(["lenssteer", *args, "--no-progress"])


# --------------------------------------------------------------------------------------------------
# compare's overrides (a plain function of lenssteer.compare) and bench's scripts


def test_apply_overrides_on_a_config():
    from lenssteer.compare import CompareConfig, SystemConfig, TaskConfig, apply_overrides

    config = apply_overrides(
        CompareConfig(), limit=3, languages=["en", "fr"], central_language="en"
    )
    assert config.limit == 3 and config.languages == ["en", "fr"] and config.seed == 0
    assert [t.name for t in config.tasks] == [
        "mmlu-translated",
        "bible-continuation",
        "bible-retrieval",
        "language-fidelity",
    ]
    assert [(s.name, s.kind) for s in config.systems] == [("base", "base")]

    configured = CompareConfig(
        tasks=[TaskConfig("mmlu-translated", limit=5)],
        systems=[SystemConfig("base"), SystemConfig("lens", kind="lens", adapter="old")],
    )
    config = apply_overrides(
        configured,
        model="m",
        dtype="bfloat16",
        tasks=["mmlu-translated", "mine.jsonl"],
        adapters=["new", "other"],
        subspace="no-such-subspace",
        transplant="3,0",
        transplant_pairs="pairs.json",
    )
    assert config.model == "m" and config.dtype == "bfloat16"
    assert [(t.name, t.file, t.limit) for t in config.tasks] == [
        ("mmlu-translated", None, 5),  # a configured task keeps its settings
        ("mine", "mine.jsonl", None),
    ]
    systems = {s.name: s for s in config.systems}
    assert systems["lens"].adapter == "new" and systems["lens-2"].adapter == "other"
    assert systems["remove-specific"].subspace == "no-such-subspace"
    assert systems["remove-specific"].layers == "top:2"
    assert (systems["xtransplant"].source_layer, systems["xtransplant"].target_layer) == (3, 0)
    assert systems["xtransplant-selected"].pairs_file == "pairs.json"
    config.validate()
    with pytest.raises(ValueError, match="--transplant wants SOURCE,TARGET layers, got '3'"):
        apply_overrides(CompareConfig(), transplant="3")

    # --systems keeps the config's systems of those names; the adapter flag then replaces lens'
    def three() -> CompareConfig:
        return CompareConfig(
            systems=[
                SystemConfig("base"),
                SystemConfig("lens", kind="lens", adapter="old"),
                SystemConfig("language-shift", kind="language-shift"),
            ]
        )

    config = apply_overrides(three(), systems=["base", "lens"], adapters=["new"])
    assert [(s.name, s.adapter) for s in config.systems] == [("base", None), ("lens", "new")]
    with pytest.raises(ValueError, match="--systems names lense, which the config does not have"):
        apply_overrides(three(), systems=["base", "lense"])


def test_bench_finds_the_scripts_or_says_how_to_get_them(tmp_path, capsys):
    from pathlib import Path

    from lenssteer.cli import find_benchmarks

    checkout = Path(__file__).resolve().parent.parent / "benchmarks"
    assert find_benchmarks() == checkout / "run.py"  # next to the package (a source checkout)
    assert find_benchmarks(str(checkout)) == checkout / "run.py"
    err = _error_of(["bench", "--quick", "--benchmarks", str(tmp_path)], capsys)
    assert str(tmp_path) in err and "inside a clone of the lenssteer repository" in err
    assert len(err.strip().splitlines()) == 1


def test_the_cli_offers_every_training_preset():
    from lenssteer.cli import build_parser
    from lenssteer.train import PRESETS

    args = build_parser().parse_args(["train", "--subspace", "s", "--out", "a"])
    assert args.preset == "lens"
    for name in PRESETS:
        parsed = build_parser().parse_args(
            ["train", "--subspace", "s", "--out", "a", "--preset", name]
        )
        assert parsed.preset == name
