"""Reliability and security (issue 11): crafted artifacts, --out safety, bad values, contention.

One test per case of the issue: an adapter folder cannot run code or change the base model, --out
never destroys a user's data, NaN and corrupted files are errors, checkpoints survive a kill, saves
under contention neither fail nor leave scratch folders, identical tensors give identical bytes, and
the command line answers every expected error with one line that names the thing that is wrong.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from safetensors.torch import load_file, save_file
from test_train import make_subspace, quick_config, tiny_corpus

from lenssteer.adapter import (
    CONFIG_NAME,
    LORA_KEYS_OFF,
    LORA_KEYS_PASSED,
    LORA_KEYS_RECORDED,
    WEIGHTS_NAME,
    AdapterError,
    SteeringAdapter,
    check_base_weights,
)
from lenssteer.cli import main
from lenssteer.io import OutputFolderError, atomic_directory, check_output_folder
from lenssteer.subspace import Subspace, SubspaceError
from lenssteer.train import TrainConfig, TrainingError, train_lens

LANGS = ["en", "fr", "de"]
ROWS = [
    {
        "en": f"Verse number {i} speaks of the sea.",
        "fr": f"Le verset {i} parle de la mer.",
        "de": f"Vers {i} spricht vom Meer.",
    }
    for i in range(12)
]


# --------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """A tiny Qwen2 model, its subspace and one saved adapter of each kind (top 2 of 4 layers)."""
    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    corpus = tiny_corpus()
    subspace = make_subspace(model, tokenizer, corpus, [2, 3])
    folder = tmp_path_factory.mktemp("adapters")
    for kind in ("lora", "layers"):
        train_lens(
            model,
            tokenizer,
            subspace,
            corpus,
            folder / kind,
            quick_config(kind=kind, max_steps=2),
            progress=False,
        )
    return model, subspace, folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "parallel.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    return str(path)


def copy_adapter(source: Path, target: Path, edit=None) -> Path:
    """A copy of an adapter folder, ``edit(config_dict)`` applied to its adapter_config.json."""
    target.mkdir(parents=True)
    (target / WEIGHTS_NAME).write_bytes((source / WEIGHTS_NAME).read_bytes())
    data = json.loads((source / CONFIG_NAME).read_text())
    if edit is not None:
        edit(data)
    (target / CONFIG_NAME).write_text(json.dumps(data))
    return target


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI, expecting exit code 2 and exactly one line on stderr (no traceback)."""
    capsys.readouterr()  # drop what earlier calls printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("lenssteer ")]  # no bars
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def probe_args(model: str, corpus: str, *extra: str) -> list[str]:
    return ["probe", "--model", model, "--corpus", corpus, "--languages", ",".join(LANGS)] + [
        "--limit",
        "12",
        "--layers=top:2",
        *extra,
    ]


def notes_folder(tmp_path: Path) -> Path:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("two years of work")
    return notes


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------------------------------
# 1. An adapter folder cannot make lenssteer import and run code


def test_megatron_core_module_in_the_adapter_folder_is_never_imported(trained, tmp_path):
    model, _, folder = trained
    crafted = tmp_path / "crafted"

    def edit(data):
        data["megatron_config"] = {"tensor_model_parallel_size": 1}
        data["megatron_core"] = "lenssteer_evil_module"

    copy_adapter(folder / "lora", crafted, edit)
    marker = tmp_path / "code-ran"
    (crafted / "lenssteer_evil_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
    )
    sys.path.insert(0, str(crafted))  # as with `python -m` or a notebook started in the folder
    try:
        with pytest.raises(AdapterError, match="'megatron_c"):
            SteeringAdapter.from_pretrained(crafted).apply(copy.deepcopy(model))
        # Even an adapter object built around such a config never hands it to PEFT.
        good = SteeringAdapter.from_pretrained(folder / "lora")
        good.lora_config = {**good.lora_config, "megatron_core": "lenssteer_evil_module"}
        with pytest.raises(AdapterError, match="'megatron_core'"):
            good.apply(copy.deepcopy(model))
    finally:
        sys.path.remove(str(crafted))
    assert "lenssteer_evil_module" not in sys.modules
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("auto_mapping", {"base_model_class": "Evil", "parent_library": "evil_module"}),
        ("modules_to_save", ["lm_head"]),
        ("trainable_token_indices", [1, 2]),
        ("use_dora", True),
        ("bias", "all"),
        ("some_future_key", 1),
    ],
)
def test_other_peft_features_are_refused_naming_the_key(trained, tmp_path, key, value):
    _, _, folder = trained
    crafted = copy_adapter(folder / "lora", tmp_path / "crafted", lambda d: d.update({key: value}))
    with pytest.raises(AdapterError, match=f"'{key}'"):
        SteeringAdapter.from_pretrained(crafted)


def test_the_allow_list_covers_every_key_installed_peft_writes():
    from peft import LoraConfig

    known = set(LORA_KEYS_PASSED) | set(LORA_KEYS_RECORDED) | set(LORA_KEYS_OFF)
    assert set(LoraConfig().to_dict()) <= known  # a PEFT upgrade with new keys fails here first


def test_shipped_adapters_pass_the_allow_list():
    for folder in Path(__file__).resolve().parent.parent.glob("checkpoints/*/"):
        assert SteeringAdapter.from_pretrained(folder).kind in ("lora", "layers")


# --------------------------------------------------------------------------------------------------
# 2. A crafted LoRA config cannot change the base model


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "loftq"),
        ("init_lora_weights", "olora"),
        ("init_lora_weights", "corda"),
        ("init_lora_weights", "eva"),
        ("loftq_config", {"loftq_bits": 4, "loftq_iter": 1}),
        ("eva_config", {"rho": 2.0}),
        ("corda_config", {"corda_method": "kpm"}),
        ("layer_replication", [[0, 4], [2, 4]]),
    ],
)
def test_base_rewriting_lora_configs_are_refused(trained, tmp_path, key, value):
    model, _, folder = trained
    crafted = copy_adapter(folder / "lora", tmp_path / "crafted", lambda d: d.update({key: value}))
    before = check_base_weights(model)
    with pytest.raises(AdapterError, match=f"'{key}'"):
        SteeringAdapter.from_pretrained(crafted)
    assert check_base_weights(model) == before


def test_apply_and_remove_recheck_the_base_fingerprint(trained):
    model, _, folder = trained
    base = copy.deepcopy(model)
    adapter = SteeringAdapter.from_pretrained(folder / "lora")
    applied = adapter.apply(base)
    with torch.no_grad():  # something changes a base weight while the adapter is applied
        base.get_input_embeddings().weight[0] += 1.0
    with pytest.raises(AdapterError, match="differ after removing the adapter"):
        applied.remove()

    class Rewriting(SteeringAdapter):  # an apply that also rewrites a base weight (as PiSSA does)
        def _apply_layers(self, model):
            applied = super()._apply_layers(model)
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(0.5)
            return applied

    layers = SteeringAdapter.from_pretrained(folder / "layers")
    rewriting = Rewriting(layers.config, layers.weights)
    fresh = copy.deepcopy(model)
    with pytest.raises(AdapterError, match="changed base weights outside its own"):
        rewriting.apply(fresh)
    assert getattr(fresh, "_lenssteer_applied", None) is None


def test_compare_rechecks_the_fingerprint_before_scoring(trained, tokenizer, tmp_path):
    from lenssteer.compare import CompareConfig, SystemConfig, TaskConfig, run_comparison

    model, _, _ = trained
    changed = copy.deepcopy(model)
    changed.lenssteer_identity = dict(
        model.lenssteer_identity
        if hasattr(model, "lenssteer_identity")
        else {"model": "tiny-qwen2", "revision": "local", "fingerprint": check_base_weights(model)}
    )
    with torch.no_grad():  # weights changed after the identity was recorded (a merged adapter...)
        changed.get_input_embeddings().weight.mul_(0.5)
    config = CompareConfig(
        model="tiny-qwen2",
        languages=["en", "fr"],
        tasks=[TaskConfig("bible-retrieval")],
        systems=[SystemConfig("base")],
        limit=4,
        out=str(tmp_path / "report"),
    )
    with pytest.raises(AdapterError, match="base model's weights changed"):
        run_comparison(config, progress=False, loaded=(tokenizer, changed))
    assert not (tmp_path / "report").exists()


# --------------------------------------------------------------------------------------------------
# 3. --out never deletes what it is pointed at


def test_probe_out_refuses_a_folder_of_notes(tiny_folder, corpus_file, tmp_path, capsys):
    notes = notes_folder(tmp_path)
    err = cli_error(probe_args(tiny_folder, corpus_file, "--out", str(notes)), capsys)
    assert str(notes) in err and "not a subspace" in err
    assert tree(notes) == {"thesis.txt": b"two years of work"}


def test_probe_out_refuses_an_existing_file(tiny_folder, corpus_file, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    err = cli_error(probe_args(tiny_folder, corpus_file, "--out", str(notes)), capsys)
    assert str(notes) in err and "not a folder" in err
    assert notes.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_force_replaces_a_result_of_the_same_kind_only(tiny_folder, corpus_file, tmp_path, capsys):
    out = tmp_path / "sub"
    assert main(probe_args(tiny_folder, corpus_file, "--out", str(out))) == 0
    err = cli_error(probe_args(tiny_folder, corpus_file, "--out", str(out)), capsys)
    assert "already holds a subspace" in err and "--force" in err
    assert main(probe_args(tiny_folder, corpus_file, "--out", str(out), "--force")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["subspace.json", "subspace.safetensors"]
    notes = notes_folder(tmp_path)
    cli_error(probe_args(tiny_folder, corpus_file, "--out", str(notes), "--force"), capsys)
    assert tree(notes) == {"thesis.txt": b"two years of work"}


def test_train_out_equal_to_or_inside_its_subspace_is_refused(
    tiny_folder, corpus_file, tmp_path, capsys
):
    subspace = tmp_path / "sub"
    assert main(probe_args(tiny_folder, corpus_file, "--out", str(subspace))) == 0
    before = tree(subspace)
    for out in (subspace, subspace / "adapter"):
        argv = ["train", "--model", tiny_folder, "--subspace", str(subspace)]
        argv += ["--corpus", corpus_file, "--limit", "12", "--max-steps", "1", "--out", str(out)]
        err = cli_error(argv, capsys)
        assert str(out) in err and "would overwrite the input" in err
    assert tree(subspace) == before


def test_saves_refuse_a_foreign_folder_from_python(trained, tmp_path):
    _, subspace, folder = trained
    notes = notes_folder(tmp_path)
    with pytest.raises(OutputFolderError, match="not a subspace"):
        subspace.save(notes)
    with pytest.raises(OutputFolderError, match="not a steering adapter"):
        SteeringAdapter.from_pretrained(folder / "lora").save_pretrained(notes)
    assert tree(notes) == {"thesis.txt": b"two years of work"}
    assert sorted(os.listdir(tmp_path)) == ["notes"]  # no scratch folder left


def test_transplant_grid_out_and_arguments_are_checked_before_any_work(tmp_path, capsys):
    notes = notes_folder(tmp_path)
    missing_model = str(tmp_path / "no-such-model")  # loading it would fail: nothing gets that far
    grid = ["transplant-grid", "--model", missing_model, "--limit", "4"]
    err = cli_error([*grid, "--out", str(notes)], capsys)
    assert "not a transplant-grid result" in err
    err = cli_error([*grid, "--recipient-lang", "de,de", "--out", str(tmp_path / "g")], capsys)
    assert "de given more than once" in err
    err = cli_error([*grid, "--dev-fraction", "1.5", "--out", str(tmp_path / "g")], capsys)
    assert "--dev-fraction" in err and "1.5" in err
    assert tree(notes) == {"thesis.txt": b"two years of work"}


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a read-only /proc")
def test_unwritable_output_is_found_before_computing(tiny_folder, corpus_file, capsys):
    err = cli_error(probe_args(tiny_folder, corpus_file, "--out", "/proc/lenssteer-out"), capsys)
    assert "/proc" in err and "not writable" in err


def test_check_output_folder_refuses_a_folder_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is not a folder"):
        check_output_folder(tmp_path / "file" / "out", "grid.json", "grid")


# --------------------------------------------------------------------------------------------------
# 4. One long row is cut to a token cap, with a warning naming it


def test_a_long_row_is_cut_to_the_models_context_with_a_warning(tokenizer):
    from lenssteer.extract import default_max_tokens, extract_states

    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))  # 256 positions
    cap = default_max_tokens(model, tokenizer, chat_template=True)
    assert 200 < cap < 256
    long_row = "the sea " * 5000  # 10,000 tokens: far beyond the model's 256 positions
    texts = ["a short verse", long_row, "another short verse"]
    with pytest.warns(UserWarning, match=r"extract: row 2 \(\d+ tokens\) cut to the first"):
        states = extract_states(
            model, tokenizer, texts, [3], chat_template=True, cache_dir=False, progress=False
        )
    assert torch.isfinite(states).all()
    cut = tokenizer.decode(tokenizer(long_row, add_special_tokens=False)["input_ids"][:cap])
    alone = extract_states(
        model, tokenizer, [cut], [3], chat_template=True, cache_dir=False, progress=False
    )
    torch.testing.assert_close(states[1], alone[0], atol=1e-5, rtol=1e-5)


def test_the_token_cap_is_configurable_and_applies_to_training_data(tokenizer):
    from lenssteer.data import ParallelCorpus
    from lenssteer.extract import extract_states
    from lenssteer.training_data import prepare_training_data

    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    with pytest.warns(UserWarning, match=r"row 1 \(\d+ tokens\) cut to the first 4 tokens"):
        extract_states(
            model,
            tokenizer,
            ["one two three four five six seven"],
            [3],
            cache_dir=False,
            progress=False,
            max_tokens=4,
        )
    corpus = ParallelCorpus({"en": ["short", "word " * 400], "fr": ["court", "mot"]}, "en")
    with pytest.warns(
        UserWarning, match=r"precompute en: row 2 \(\d+ tokens\) cut to the first 256"
    ):
        data = prepare_training_data(model, tokenizer, corpus, 2, [3], progress=False)
    assert len(data) == 2


def test_a_result_folder_never_replaces_a_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(OutputFolderError, match="not a folder"):
        with atomic_directory(notes) as scratch:
            (scratch / "report.json").write_text("{}")
    assert notes.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["notes.txt"]


# --------------------------------------------------------------------------------------------------
# 5. A kill during a checkpoint write does not break --resume


def test_resume_skips_an_incomplete_checkpoint(trained, tokenizer, tmp_path):
    model, subspace, _ = trained
    corpus = tiny_corpus()
    checkpoints = tmp_path / "checkpoints"
    config = quick_config(save_steps=1, max_steps=3)
    run = dict(checkpoint_dir=checkpoints, keep_checkpoints=True, progress=False)
    train_lens(model, tokenizer, subspace, corpus, None, config, **run)
    assert sorted(os.listdir(checkpoints)) == ["checkpoint-2", "checkpoint-3", "lenssteer_run.json"]
    (checkpoints / "checkpoint-3" / "trainer_state.json").unlink()  # killed while writing it
    with pytest.warns(UserWarning, match="skipping the incomplete checkpoint .*checkpoint-3"):
        adapter = train_lens(model, tokenizer, subspace, corpus, None, config, resume=True, **run)
    state = json.loads((checkpoints / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3  # step 3 ran again from checkpoint-2
    assert adapter.config.metrics["train"]["global_step"] == 3


def test_a_foreign_checkpoint_folder_is_never_deleted(trained, tokenizer, tmp_path):
    model, subspace, _ = trained
    notes = notes_folder(tmp_path)
    with pytest.raises(TrainingError, match="not a lenssteer checkpoint folder"):
        train_lens(
            model,
            tokenizer,
            subspace,
            tiny_corpus(),
            None,
            quick_config(max_steps=1),
            checkpoint_dir=notes,
            progress=False,
        )
    assert tree(notes) == {"thesis.txt": b"two years of work"}


# --------------------------------------------------------------------------------------------------
# 6. A result folder is replaced as a whole (a full disk leaves the old one)


def test_a_failed_write_leaves_the_old_result_folder_whole(tmp_path):
    out = tmp_path / "grid"
    with atomic_directory(out, marker="grid.json") as scratch:
        (scratch / "grid.json").write_text("old")
        (scratch / "summary.md").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_directory(out, marker="grid.json") as scratch:
            (scratch / "heatmap_de_ffn.png").write_bytes(b"new")
            raise OSError(28, "No space left on device")
    assert tree(out) == {"grid.json": b"old", "summary.md": b"old"}
    assert sorted(os.listdir(tmp_path)) == ["grid"]


def test_a_grid_run_that_fails_leaves_the_previous_grid_whole(
    tiny_folder, tmp_path, capsys, monkeypatch
):
    import lenssteer.transplant_pairs as transplant

    out = tmp_path / "grid"
    argv = ["transplant-grid", "--model", tiny_folder, "--mode", "explicit", "--sources", "0"]
    argv += ["--targets", "0", "--limit", "4", "--no-control", "--out", str(out)]
    assert main([*argv, "--recipient-lang", "de"]) == 0
    before = tree(out)
    err = cli_error([*argv, "--recipient-lang", "fr"], capsys)
    assert "already holds a transplant-grid result" in err and "--force" in err

    def full_disk(accuracy, pairs, path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(transplant, "plot_accuracy_heatmap", full_disk)
    err = cli_error([*argv, "--recipient-lang", "fr", "--force"], capsys)
    assert "disk is full" in err
    assert tree(out) == before  # not a mix of new heatmaps and the old grid.json
    assert sorted(os.listdir(tmp_path)) == ["grid"]


# --------------------------------------------------------------------------------------------------
# 7. No silent wrong results


def test_a_nan_subspace_is_refused_everywhere(trained, tokenizer, tmp_path):
    model, subspace, _ = trained
    broken = subspace.to(torch.float32)
    broken.agnostic = torch.full_like(broken.agnostic, float("nan"))
    with pytest.raises(SubspaceError, match="agnostic holds NaN"):
        broken.save(tmp_path / "sub")
    with pytest.raises(TrainingError, match="agnostic hold NaN"):
        train_lens(model, tokenizer, broken, tiny_corpus(), tmp_path / "a", quick_config())
    assert not (tmp_path / "a").exists()
    subspace.save(tmp_path / "sub")  # a NaN written into the file by hand, checksum updated
    tensors = load_file(tmp_path / "sub" / "subspace.safetensors")
    tensors["directions"][0, 0, 0] = float("inf")
    save_file(tensors, tmp_path / "sub" / "subspace.safetensors")
    header = json.loads((tmp_path / "sub" / "subspace.json").read_text())
    header.pop("tensors_sha256")
    (tmp_path / "sub" / "subspace.json").write_text(json.dumps(header))
    with pytest.raises(SubspaceError, match="directions holds NaN or infinite"):
        Subspace.load(tmp_path / "sub")


def test_a_nan_loss_is_an_error_and_writes_nothing(trained, tokenizer, tmp_path):
    model, subspace, _ = trained
    config = quick_config(learning_rate=1e30, max_steps=3, max_grad_norm=0.0)
    with pytest.raises(TrainingError, match="NaN or infinite at step"):
        train_lens(
            model, tokenizer, subspace, tiny_corpus(), tmp_path / "a", config, progress=False
        )
    assert not (tmp_path / "a").exists()


def test_a_flipped_bit_in_a_subspace_file_is_found(trained, tmp_path):
    _, subspace, _ = trained
    subspace.save(tmp_path / "sub")
    path = tmp_path / "sub" / "subspace.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(SubspaceError, match="subspace.safetensors is corrupted"):
        Subspace.load(tmp_path / "sub")


def test_an_adapter_with_nan_weights_and_no_checksum_is_refused(trained, tmp_path):
    _, _, folder = trained

    def drop_checksum(data):
        data["lenssteer"]["weights_sha256"] = None

    crafted = copy_adapter(folder / "lora", tmp_path / "crafted", drop_checksum)
    weights = load_file(crafted / WEIGHTS_NAME)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, crafted / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match=f"weight {name} holds NaN"):
        SteeringAdapter.from_pretrained(crafted)


def test_a_layers_adapter_cannot_name_the_embeddings(trained, tmp_path):
    model, _, folder = trained
    adapter = SteeringAdapter.from_pretrained(folder / "layers")
    embedding = "model.embed_tokens.weight"
    adapter.weights[embedding] = torch.zeros_like(model.get_input_embeddings().weight)
    adapter.config.weights_sha256 = None
    adapter.save_pretrained(tmp_path / "crafted")
    crafted = SteeringAdapter.from_pretrained(tmp_path / "crafted")
    base = copy.deepcopy(model)
    before = check_base_weights(base)
    with pytest.raises(AdapterError, match=f"{embedding} lies outside its trained decoder layers"):
        crafted.apply(base)
    assert check_base_weights(base) == before


def test_a_bom_in_a_language_file_is_dropped(tmp_path):
    from lenssteer.data import load_corpus_file

    (tmp_path / "en.txt").write_text("\ufeffIn the beginning\nAnd the earth\n", encoding="utf-8")
    (tmp_path / "fr.txt").write_text("Au commencement\nEt la terre\n", encoding="utf-8")
    corpus = load_corpus_file(tmp_path, ["en", "fr"], "en")
    assert corpus.texts["en"][0] == "In the beginning"


# --------------------------------------------------------------------------------------------------
# 8. One clear line, never a traceback


def test_epochs_zero_is_a_clear_error(tiny_folder, corpus_file, tmp_path, capsys):
    subspace = tmp_path / "sub"
    assert main(probe_args(tiny_folder, corpus_file, "--out", str(subspace))) == 0
    argv = ["train", "--model", tiny_folder, "--subspace", str(subspace), "--corpus", corpus_file]
    err = cli_error([*argv, "--epochs", "0", "--out", str(tmp_path / "a")], capsys)
    assert "num_epochs must be > 0" in err and "--epochs" in err
    with pytest.raises(TrainingError, match="learning_rate must be a finite number"):
        TrainConfig(learning_rate=float("nan"))


def test_subspace_json_with_a_string_format_version(trained, tmp_path):
    _, subspace, _ = trained
    subspace.save(tmp_path / "sub")
    header = json.loads((tmp_path / "sub" / "subspace.json").read_text())
    header["format_version"] = "1"
    (tmp_path / "sub" / "subspace.json").write_text(json.dumps(header))
    with pytest.raises(SubspaceError, match='format_version = "1" is not an integer'):
        Subspace.load(tmp_path / "sub")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("base_model", "tiny-qwen2", "'lenssteer.base_model' = \"tiny-qwen2\" is not an object"),
        ("format_version", [1], "'lenssteer.format_version' = \\[1\\] is not an integer"),
        ("trained_layers", ["2"], "'lenssteer.trained_layers'"),
        ("weights_sha256", 5, "'lenssteer.weights_sha256'"),
    ],
)
def test_adapter_config_values_are_checked(trained, tmp_path, key, value, message):
    _, _, folder = trained
    crafted = copy_adapter(
        folder / "layers", tmp_path / "crafted", lambda d: d["lenssteer"].update({key: value})
    )
    with pytest.raises(AdapterError, match=message):
        SteeringAdapter.from_pretrained(crafted)


def test_a_pickle_model_folder_is_one_line_and_runs_nothing(tmp_path, tokenizer, capsys):
    import pickle

    folder = tmp_path / "evil-model"
    make_tiny_model("llama", vocab_size=len(tokenizer)).config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    err = cli_error(["generate", "--model", str(folder), "--prompt", "hi"], capsys)
    assert "pytorch_model.bin" in err and "pickle" in err
    assert not marker.exists()


def test_a_folder_that_is_not_a_model(tmp_path, capsys):
    notes = notes_folder(tmp_path)
    err = cli_error(["generate", "--model", str(notes), "--prompt", "hi"], capsys)
    assert "not a model folder" in err and "config.json" in err and "sentencepiece" not in err


def test_invalid_utf8_in_a_csv_names_file_and_line(tmp_path):
    from lenssteer.data import CorpusError, load_corpus_file

    path = tmp_path / "corpus.csv"
    path.write_bytes(b"en,fr\nhello,bonjour\nbye,au revoir \xff\xfe\n")
    with pytest.raises(CorpusError, match=r"corpus.csv.*line 3.*not valid UTF-8"):
        load_corpus_file(path, ["en", "fr"], "en")


def test_a_fingerprint_mismatch_does_not_suggest_a_flag_the_cli_lacks(trained, tokenizer):
    _, _, folder = trained
    other = make_tiny_model("qwen2", vocab_size=len(tokenizer), seed=7)
    with pytest.raises(AdapterError) as error:
        SteeringAdapter.from_pretrained(folder / "lora").apply(other)
    assert "use the base model the adapter was trained on" in str(error.value)
    assert not str(error.value).rstrip().endswith("pass strict=False to apply it anyway")


def test_compare_languages_as_a_string_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "compare.toml"
    config.write_text('model = "x"\nlanguages = "en,de"\n')
    err = cli_error(["compare", "--config", str(config), "--no-progress"], capsys)
    assert "languages must be a list" in err


def test_a_full_disk_during_a_safetensors_write_is_one_line(trained, tmp_path, capsys):
    from safetensors import SafetensorError

    from lenssteer.cli import _expected_errors, _one_line

    error = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'
    )
    assert isinstance(error, _expected_errors())
    assert "no space left on device" in _one_line(error)
    assert "disk is full" in _one_line(OSError(28, "No space left on device", "/x/cache"))
    assert "/x/cache" in _one_line(OSError(28, "No space left on device", "/x/cache"))


def test_an_unwritable_cache_costs_speed_not_the_run(tokenizer, tmp_path):
    from lenssteer.extract import extract_states

    model = make_tiny_model("qwen2", vocab_size=len(tokenizer))
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("")  # the cache folder cannot be created (as on a full or read-only disk)
    with pytest.warns(UserWarning, match="could not write the states cache"):
        states = extract_states(
            model, tokenizer, ["hello there"], [3], cache_dir=blocked, progress=False
        )
    assert states.shape == (1, 1, 32)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a read-only /proc")
def test_compare_and_transplant_find_an_unwritable_out_before_scoring(tmp_path, capsys):
    argv = ["compare", "--model", str(tmp_path / "no-such-model"), "--no-progress"]
    err = cli_error([*argv, "--out", "/proc/lenssteer-report"], capsys)
    assert "/proc" in err and "not writable" in err
    argv = ["transplant", "--model", str(tmp_path / "no-such-model"), "--source", "0"]
    err = cli_error([*argv, "--target", "0", "--out", "/proc/one.json"], capsys)
    assert "/proc" in err and "not writable" in err


# --------------------------------------------------------------------------------------------------
# 9. Saves under contention, deterministic bytes


def _save_many(args: tuple[str, int]) -> list[str]:
    folder, count = args
    subspace = Subspace.load(folder + ".source")
    failures = []
    for _ in range(count):
        try:
            subspace.save(folder)
        except Exception as error:  # collected: the test expects none
            failures.append(f"{type(error).__name__}: {error}")
    return failures


def test_parallel_saves_of_one_folder_neither_fail_nor_leave_scratch(trained, tmp_path):
    _, subspace, _ = trained
    target = tmp_path / "sub"
    subspace.save(str(target) + ".source")
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        failures = pool.map(_save_many, [(str(target), 60), (str(target), 60)])
    assert failures == [[], []]
    assert sorted(os.listdir(tmp_path)) == ["sub", "sub.source"]  # no .tmp or .old folders
    assert tree(target) == tree(Path(str(target) + ".source"))
    Subspace.load(target)


def test_identical_tensors_give_identical_bytes(trained, tmp_path):
    import subprocess

    _, subspace, folder = trained
    adapter = SteeringAdapter.from_pretrained(folder / "lora")
    subspace.save(tmp_path / "sub")
    adapter.save_pretrained(tmp_path / "adapter")
    script = (
        "import sys\nfrom lenssteer.adapter import SteeringAdapter\n"
        "from lenssteer.subspace import Subspace\n"
        "Subspace.load(sys.argv[1]).save(sys.argv[2])\n"
        "SteeringAdapter.from_pretrained(sys.argv[3]).save_pretrained(sys.argv[4])\n"
    )
    digests = []
    for run in range(2):  # fresh processes: hash-map order differs from one to the next
        sub, ada = tmp_path / f"sub{run}", tmp_path / f"adapter{run}"
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "sub"), str(sub)]
            + [str(tmp_path / "adapter"), str(ada)],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        files = [*sub.iterdir(), *ada.iterdir()]
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]
    assert (tmp_path / "sub0" / "subspace.safetensors").read_bytes() == (
        tmp_path / "sub" / "subspace.safetensors"
    ).read_bytes()
