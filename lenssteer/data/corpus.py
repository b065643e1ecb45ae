"""`ParallelCorpus`: the same N items in K languages, validated on construction; deterministic
sampling and splits by item.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from lenssteer.data.errors import CorpusError
from lenssteer.data.languages import check_language
from lenssteer.io import atomic_write_text

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
