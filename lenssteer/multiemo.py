"""MultiEmo sentiment reviews in ten languages, read at run time from the BIG-bench source archive.

BIG-bench's ``multiemo`` task holds reviews machine-translated from Polish with a four-way
sentiment label (positive, negative, neutral, ambivalent), aligned by index across en, de, fr, es,
it, pt, nl, ru, ja and zh (``all_text_<lang>``: 8,215 reviews each). The archive is the PyPI source
distribution ``bigbench==1.0.0`` (358 MB); lenssteer never installs it and never copies its data:
the task JSON files are read straight from the archive in the user's lenssteer cache. Its licence
is not stated in the archive (BIG-bench is Apache-2.0, MultiEmo's own terms are unchecked): reading
it on your machine is your business.

Pairing checks the labels: an index is used only where every requested language (and English) has
the same gold label, since some sentence-level files of the collection drift; items that disagree
are dropped and counted.

Fetch the archive once with ``python -m lenssteer.multiemo fetch`` (it runs ``pip download``), or
by hand with the command :func:`archive_path` prints when the file is missing.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from lenssteer.mmlu import MultipleChoiceItem, TaskDataError
from lenssteer.models import cache_root

__all__ = [
    "BIGBENCH_VERSION",
    "MULTIEMO_LANGUAGES",
    "SENTIMENT_LABELS",
    "archive_path",
    "fetch_archive",
    "load_multiemo",
]

BIGBENCH_VERSION = "1.0.0"
ARCHIVE_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
MULTIEMO_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "ru", "ja", "zh")
LABEL_KEYS = ("positive", "negative", "neutral", "ambivalent")  # option order in every language

# The question and the four labels, written for this project in each language (same order as
# LABEL_KEYS).
SENTIMENT_QUESTIONS: dict[str, str] = {
    "en": "What is the sentiment of this review?",
    "de": "Welche Stimmung drückt diese Bewertung aus?",
    "fr": "Quel est le sentiment exprimé dans cet avis ?",
    "es": "¿Qué sentimiento expresa esta reseña?",
    "it": "Quale sentimento esprime questa recensione?",
    "pt": "Que sentimento expressa esta avaliação?",
    "nl": "Welk sentiment drukt deze recensie uit?",
    "ru": "Какое настроение выражает этот отзыв?",
    "ja": "このレビューの感情はどれですか？",
    "zh": "这条评论表达了什么情感？",
}
SENTIMENT_LABELS: dict[str, tuple[str, str, str, str]] = {
    "en": ("positive", "negative", "neutral", "ambivalent"),
    "de": ("positiv", "negativ", "neutral", "ambivalent"),
    "fr": ("positif", "négatif", "neutre", "ambivalent"),
    "es": ("positivo", "negativo", "neutral", "ambivalente"),
    "it": ("positivo", "negativo", "neutro", "ambivalente"),
    "pt": ("positivo", "negativo", "neutro", "ambivalente"),
    "nl": ("positief", "negatief", "neutraal", "ambivalent"),
    "ru": ("положительное", "отрицательное", "нейтральное", "неоднозначное"),
    "ja": ("肯定的", "否定的", "中立", "賛否両論"),
    "zh": ("正面", "负面", "中性", "褒贬不一"),
}


def archive_folder() -> Path:
    return cache_root() / "bigbench"


def fetch_command() -> str:
    folder = archive_folder()
    return f"{sys.executable} -m pip download --no-deps bigbench=={BIGBENCH_VERSION} -d {folder}"


def archive_path() -> Path:
    """The BIG-bench source archive in the lenssteer cache; a clear error with the fetch command
    when it is not there."""
    path = archive_folder() / ARCHIVE_NAME
    if not path.is_file():
        raise TaskDataError(
            f"the multiemo task reads BIG-bench's source archive, which is not at {path}; fetch it "
            f"once (358 MB) with:\n    {fetch_command()}\nor: python -m lenssteer.multiemo fetch"
        )
    return path


def fetch_archive() -> Path:
    """Download the archive into the lenssteer cache with ``pip download`` (no install)."""
    folder = archive_folder()
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        f"bigbench=={BIGBENCH_VERSION}",
        "-d",
        str(folder),
    ]
    subprocess.run(command, check=True)
    return archive_path()


@functools.cache
def _read_languages(path: Path, languages: tuple[str, ...]) -> dict[str, list[dict]]:
    """``{language: examples}`` of ``all_text_<language>``, one pass over the archive."""
    wanted = {
        f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/multiemo/all_text_{lang}/task.json": lang
        for lang in languages
    }
    found: dict[str, list[dict]] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                language = wanted.get(member.name)
                if language is None:
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                found[language] = json.load(handle)["examples"]
                if len(found) == len(wanted):
                    break
    except (OSError, tarfile.TarError, ValueError, KeyError) as error:
        raise TaskDataError(f"cannot read multiemo from {path}: {error!r}") from error
    missing = sorted(set(languages) - set(found))
    if missing:
        raise TaskDataError(f"{path} has no multiemo all_text file for {', '.join(missing)}")
    return found


def _label(example: dict) -> str:
    scores = example["target_scores"]
    best = max(scores, key=scores.get)
    if scores[best] != 1 or sum(scores.values()) != 1:
        raise TaskDataError(f"multiemo example without one gold label: {scores}")
    return best


def load_multiemo(
    languages: list[str], max_chars: int | None = 600
) -> tuple[dict[str, list[MultipleChoiceItem]], dict[str, int]]:
    """``({language: items}, counts)``: reviews aligned by index whose gold label agrees in every
    requested language and English, each at most ``max_chars`` characters in every language.

    ``counts``: ``aligned`` (indices present in all languages), ``label_mismatch`` (dropped: the
    labels differ between languages), ``too_long`` (dropped by ``max_chars``), ``kept``.
    """
    unknown = [lang for lang in languages if lang not in MULTIEMO_LANGUAGES]
    if unknown:
        raise ValueError(
            f"multiemo has no language {unknown[0]!r}; available: {', '.join(MULTIEMO_LANGUAGES)}"
        )
    read = tuple(sorted({*languages, "en"}))
    examples = _read_languages(archive_path(), read)  # the archive is looked for on every call
    n = min(len(rows) for rows in examples.values())
    counts = {"aligned": n, "label_mismatch": 0, "too_long": 0, "kept": 0}
    items: dict[str, list[MultipleChoiceItem]] = {lang: [] for lang in languages}
    for index in range(n):
        labels = {_label(examples[lang][index]) for lang in read}
        if len(labels) != 1:
            counts["label_mismatch"] += 1
            continue
        texts = {lang: " ".join(str(examples[lang][index]["input"]).split()) for lang in read}
        if max_chars is not None and any(len(t) > max_chars for t in texts.values()):
            counts["too_long"] += 1
            continue
        answer = LABEL_KEYS.index(labels.pop())
        counts["kept"] += 1
        for lang in languages:
            items[lang].append(
                MultipleChoiceItem(
                    id=f"multiemo/{index}",
                    language=lang,
                    question=f"{SENTIMENT_QUESTIONS[lang]}\n\n{texts[lang]}",
                    choices=list(SENTIMENT_LABELS[lang]),
                    answer=answer,
                    subject="multiemo all_text",
                )
            )
    return items, counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["fetch"]:
        print(
            "usage: python -m lenssteer.multiemo fetch   (downloads the BIG-bench archive)",
            file=sys.stderr,
        )
        return 2
    try:
        print(archive_path())
        return 0
    except TaskDataError:
        pass
    print(fetch_archive())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
