"""Language codes: which codes a corpus accepts, a suggestion for a near miss, and the check of a
requested language list.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from lenssteer.data.errors import CorpusError

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
