"""User files (JSONL, JSON, CSV, TSV, Parquet, a folder of ``<language>.txt``) and ``datasets``
objects as parallel corpora, and `load_corpus`, the one entry point.
"""

from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lenssteer.data.bible import load_bible
from lenssteer.data.corpus import ParallelCorpus
from lenssteer.data.django import load_django
from lenssteer.data.errors import CorpusError
from lenssteer.data.languages import _check_languages, _is_known_language

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
