"""The offline tasks added for a powered comparison: multiemo, bible-likelihood, mmlu-open, prompt
kinds (data readers and judges; the comparison runs them in tests/test_compare.py)."""

from __future__ import annotations

import pytest

from lenssteer.mmlu import TaskDataError
from lenssteer.task_registry import get_task
from lenssteer.user_prompts import (
    OPEN_QUESTION_INSTRUCTIONS,
    PROMPT_KINDS,
    PROMPT_WRAPPERS,
    distinctive_options,
    mentions_only,
)


def test_missing_bigbench_archive_names_the_fetch_command(tmp_path, monkeypatch):
    from lenssteer.multiemo import load_multiemo

    monkeypatch.setenv("LENSSTEER_CACHE", str(tmp_path))
    with pytest.raises(TaskDataError, match=r"pip download --no-deps bigbench==1\.0\.0 -d "):
        load_multiemo(["en", "de"])


def test_multiemo_items_are_aligned_and_labels_checked():
    from lenssteer.multiemo import SENTIMENT_LABELS, archive_folder, load_multiemo

    if not (archive_folder() / "bigbench-1.0.0.tar.gz").is_file():
        pytest.skip("the BIG-bench archive is not in the lenssteer cache")
    items, counts = load_multiemo(["en", "de", "ja"], max_chars=400)
    assert counts["kept"] == len(items["en"]) >= 100
    assert counts["kept"] + counts["label_mismatch"] + counts["too_long"] == counts["aligned"]
    assert [i.id for i in items["de"]] == [i.id for i in items["en"]]
    assert [i.answer for i in items["ja"]] == [i.answer for i in items["en"]]
    assert items["de"][0].choices == list(SENTIMENT_LABELS["de"])
    assert all(len(i.question) < 460 for i in items["ja"])
    task = get_task("multiemo", max_chars=400)
    picked = task.items(["en", "de"], 20, 0)
    assert len(picked["de"]) == 20 and 0.25 <= task.chance < 1


def test_bible_likelihood_items_follow_the_previous_verse():
    items = get_task("bible-likelihood").items(["en", "de"], 5, 0)
    assert [i.id for i in items["en"]] == [i.id for i in items["de"]]
    first = items["en"][0]
    assert len(first.choices) == 1 and first.answer == 0 and first.question != first.choices[0]


def test_every_prompt_kind_is_written_for_every_fidelity_language():
    task = get_task("language-fidelity", kinds=list(PROMPT_KINDS))
    for kind, wrappers in PROMPT_WRAPPERS.items():
        assert set(wrappers) == set(task.languages), kind
    prompts = task.prompts(["en", "fr"], 40, 0)
    kinds = {task.item_kinds[item_id] for item_id, _ in prompts["en"]}
    assert kinds == set(PROMPT_KINDS)  # 40 items: every kind drawn
    item_id, message = prompts["fr"][0]
    assert message.startswith(
        {
            "explain": "Explique",
            "summarise": "Résume",
            "rewrite": "Réécris",
            "question": "Quel",
            "title": "Donne",
        }[task.item_kinds[item_id]]
    )
    with pytest.raises(ValueError, match="unknown prompt kind"):
        get_task("language-fidelity", kinds=["poem"]).prompts(["en"], 2, 0)


def test_open_questions_and_their_judge():
    assert set(OPEN_QUESTION_INSTRUCTIONS) == set(get_task("mmlu-open").languages)
    task = get_task("mmlu-open")
    prompts = task.prompts(["en", "de"], 5, 0)
    item_id, message = prompts["de"][0]
    assert message.startswith(OPEN_QUESTION_INSTRUCTIONS["de"])
    gold = task.gold[(item_id, "de")]
    right = f"Die Antwort ist {gold.choices[gold.answer]}."
    assert task.judge(item_id, "de", right) == {"correct": 1.0}
    assert task.judge(item_id, "de", "Ich weiß es nicht.") == {"correct": 0.0}
    assert mentions_only("It is Paris.", ["Paris", "Lyon", "Nice"], 0)
    assert not mentions_only("Paris or Lyon", ["Paris", "Lyon", "Nice"], 0)
    assert not distinctive_options(["0", "1", "2", "3"])
    assert not distinctive_options(["red", "red wine", "blue", "green"])
