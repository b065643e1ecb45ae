"""Django's gettext catalogs (BSD-3) as a parallel corpus, English being the msgid."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

from lenssteer.data.corpus import ParallelCorpus
from lenssteer.data.errors import CorpusError
from lenssteer.data.languages import _base_language, _check_languages

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
