"""The one error every reader of parallel text raises, naming the file, row and language."""

from __future__ import annotations

import os


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
