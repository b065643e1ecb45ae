"""Parallel instruction corpora: parallel by construction, the MMLU training split disjoint from the
scored items, per-language wrappers, and the names ``--corpus`` accepts."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from lenssteer.data import CorpusError, load_corpus
from lenssteer.instructions import (
    INSTRUCTIONS_SIZE,
    MMLU_TRAINING_POSITIONS,
    VERSE_TEMPLATES,
    check_not_training,
    instruction_training_corpora,
    load_instruction_corpus,
    mmlu_scored_ids,
    mmlu_training_ids,
)
from lenssteer.mmlu import load_mmlu_translated
from lenssteer.sampling import OverlapError

TRAINED = ["en", "de", "es", "fr", "it"]


def _template_of(text: str, language: str) -> int:
    """Which template of ``language`` produced ``text`` (its fixed text around the verse)."""
    found = []
    for k, template in enumerate(VERSE_TEMPLATES[language]):
        head, tail = template.split("{verse}")
        if text.startswith(head) and text.endswith(tail):
            found.append(k)
    assert len(found) == 1, (text, found)
    return found[0]


def test_templates_are_written_for_each_language():
    counts = {language: len(templates) for language, templates in VERSE_TEMPLATES.items()}
    assert set(counts.values()) == {6} and {"en", "de", "es", "fr", "it", "ru", "ar"} <= set(counts)
    for language, templates in VERSE_TEMPLATES.items():
        assert all(template.count("{verse}") == 1 for template in templates)
        assert len(set(templates)) == len(templates)
        if language != "en":  # no English wrapper reused in another language
            assert not set(templates) & set(VERSE_TEMPLATES["en"]), language
    assert VERSE_TEMPLATES["de"][0].startswith("Erkläre diesen Vers")
    assert "?" not in VERSE_TEMPLATES["ar"][2] and "؟" in VERSE_TEMPLATES["ar"][2]


def test_verse_instructions_are_parallel_in_every_language():
    corpus = load_corpus("verse-instructions", ["en", "de", "fr", "ru", "ar"], limit=40)
    bible = load_corpus("bible", ["en", "de", "fr", "ru", "ar"])
    verse = {
        language: dict(zip(bible.ids, bible.texts[language], strict=True))
        for language in bible.languages
    }
    used = set()
    for i, item_id in enumerate(corpus.ids):
        assert item_id.startswith("verse:bible:")
        templates = {
            _template_of(corpus.texts[language][i], language) for language in corpus.languages
        }
        assert len(templates) == 1  # the same instruction in every language
        used |= templates
        for language in corpus.languages:  # the verse itself, untouched, inside its wrapper
            assert verse[language][item_id.removeprefix("verse:")] in corpus.texts[language][i]
    assert len(used) >= 4  # the templates vary across items


def test_mmlu_open_uses_the_training_split_only():
    training = mmlu_training_ids()
    every = [item.id for item in load_mmlu_translated("de")]
    assert len(training) == 57 and {int(i.rsplit("/", 1)[1]) for i in training} == set(
        MMLU_TRAINING_POSITIONS
    )
    scored = mmlu_scored_ids()
    assert set(scored).isdisjoint(training) and sorted(scored + training) == sorted(every)
    corpus = load_corpus("mmlu-open", TRAINED)
    assert [i.removeprefix("mmlu:") for i in corpus.ids] == sorted(training)
    check_not_training(scored)  # the complement may be scored
    with pytest.raises(OverlapError, match="mmlu-open training split"):
        check_not_training([scored[0], training[3]])
    with pytest.raises(OverlapError):
        check_not_training([f"mmlu:{training[0]}"])


def test_mmlu_letter_is_the_task_prompt_of_the_training_split():
    """The hold corpus asks the training split's questions exactly as mmlu-translated does."""
    from transformers import AutoTokenizer

    from lenssteer.extract import format_texts
    from lenssteer.mmlu import format_multiple_choice
    from lenssteer.models import bundled_model_folder

    corpus = load_corpus("mmlu-letter", TRAINED)
    assert corpus.ids == load_corpus("mmlu-open", TRAINED).ids  # the same 57 questions
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_folder("smollm2-135m-instruct"))
    for language in TRAINED:
        items = {f"mmlu:{item.id}": item for item in load_mmlu_translated(language)}
        for i in (0, 30, 56):
            item = items[corpus.ids[i]]
            text = corpus.texts[language][i]
            assert text.startswith(item.question) and "\nD. " in text
            # templated as training templates it = the prompt the task scores letters after
            assert format_texts(tokenizer, [text], True)[0] == (
                format_multiple_choice(tokenizer, item).text
            )


def test_mmlu_questions_are_asked_openly():
    corpus = load_corpus("mmlu-open", TRAINED)
    english = {f"mmlu:{item.id}": item for item in load_mmlu_translated("en")}
    lettered = re.compile(r"^\s*\(?[A-D][).:]\s", re.M)
    with_options = 0
    for i, item_id in enumerate(corpus.ids):
        shapes = {corpus.texts[language][i].count("\n- ") for language in corpus.languages}
        assert len(shapes) == 1  # the same prompt shape in every language
        for language in corpus.languages:
            text = corpus.texts[language][i]
            assert not lettered.search(text), text
        item = english[item_id]
        if "following" in item.question.lower():
            assert shapes == {len(item.choices)}
        with_options += shapes != {0}
        assert corpus.texts["en"][i].startswith(item.question)
    assert 0 < with_options < len(corpus)  # some questions stand alone, some need their options


def test_mixed_corpus_and_languages_without_a_source():
    corpus = load_instruction_corpus("instructions", TRAINED)
    assert len(corpus) == INSTRUCTIONS_SIZE
    kinds = {item_id.split(":", 1)[0] for item_id in corpus.ids}
    assert kinds == {"mmlu", "verse"} and sum(i.startswith("mmlu:") for i in corpus.ids) == 57
    with pytest.raises(CorpusError, match="has no ru.*verse-instructions"):
        load_corpus("instructions", ["en", "ru"])
    with pytest.raises(CorpusError, match="has no ar"):
        load_corpus("mmlu-open", ["en", "ar"])
    with pytest.raises(CorpusError, match="needs a list of languages"):
        load_corpus("verse-instructions", None)


def test_training_and_heldout_parts_are_disjoint():
    train, heldout = instruction_training_corpora("mmlu-open", TRAINED, 200, 100)
    assert (len(train), len(heldout)) == (38, 19)  # 57 items, split 2:1
    assert set(train.ids).isdisjoint(heldout.ids)
    train, heldout = instruction_training_corpora("instructions", TRAINED, 20, 10, seed=1)
    assert (len(train), len(heldout)) == (20, 10) and set(train.ids).isdisjoint(heldout.ids)


def test_quickstart_can_train_on_instructions():
    path = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert recipe.parse_args([]).corpus == "instructions"  # the default since issue 15
    assert recipe.parse_args(["--corpus", "instructions"]).corpus == "instructions"
