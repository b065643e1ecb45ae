"""The one rule by which lenssteer draws items, and the check that dev and scored items never meet.

Every sample of items (a task's scored items, a corpus sample, the dev items that choose an
XTransplant pair or a language-shift layer and strength, a held-out split) is drawn the same way:
items are ranked by ``sha256(salt, seed, id)`` and the first ``limit`` are taken. The rank depends
only on the item's id, the seed and a salt naming the purpose, so

* the same limit and seed pick the same items on any machine and Python version, in every language
  (aligned items share their id) and for every system;
* a larger limit extends a smaller one (a sample of 20 is the first 20 of a sample of 100);
* different purposes (salts) draw independently, and a purpose can exclude ids already used by
  another (:func:`sample_ids` ``exclude=``), which is how dev items stay disjoint from scored ones.

Items chosen to *tune* something (a pair, a layer, a strength) must never be items that are then
*scored*: :func:`check_disjoint` raises :class:`OverlapError` naming the overlapping ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence

__all__ = [
    "OverlapError",
    "check_disjoint",
    "rank_ids",
    "rank_key",
    "sample_ids",
    "split_ids",
]


class OverlapError(ValueError):
    """Items used to choose a setting are also scored (the setting has seen the test)."""


def rank_key(item_id: str, seed: int = 0, salt: str | None = None) -> bytes:
    """``sha256(salt, seed, id)``: the sort key of an item (``salt=None``: ``sha256(seed, id)``)."""
    parts = [str(seed), str(item_id)] if salt is None else [str(salt), str(seed), str(item_id)]
    return hashlib.sha256("\x00".join(parts).encode()).digest()


def rank_ids(ids: Iterable[str], seed: int = 0, salt: str | None = None) -> list[str]:
    """All ``ids`` (duplicates removed) in the order of :func:`rank_key`."""
    return sorted(set(ids), key=lambda item_id: rank_key(item_id, seed, salt))


def sample_ids(
    ids: Iterable[str],
    limit: int | None,
    seed: int = 0,
    salt: str | None = None,
    exclude: Collection[str] = (),
) -> list[str]:
    """The first ``limit`` ids by :func:`rank_key` (all when ``limit`` is None), in rank order.

    ``exclude``: ids that may not be drawn (e.g. the scored items, when drawing dev items).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"a sample size must be a non-negative integer or None, got {limit!r}")
    excluded = set(exclude)
    ranked = [item_id for item_id in rank_ids(ids, seed, salt) if item_id not in excluded]
    return ranked if limit is None else ranked[:limit]


def split_ids(
    ids: Sequence[str], sizes: Sequence[int | None], seed: int = 0, salt: str | None = None
) -> list[list[str]]:
    """Disjoint consecutive slices of the ranked ids: ``sizes[k]`` ids each (None: the rest)."""
    ranked = rank_ids(ids, seed, salt)
    parts, start = [], 0
    for size in sizes:
        stop = len(ranked) if size is None else start + size
        parts.append(ranked[start:stop])
        start = stop
    return parts


def check_disjoint(chosen_on: Iterable[str], scored: Iterable[str], what: str) -> None:
    """Raise :class:`OverlapError` if any item used to choose ``what`` is also scored."""
    overlap = sorted(set(chosen_on) & set(scored))
    if overlap:
        shown = ", ".join(overlap[:10]) + (
            f", ... ({len(overlap)} in all)" if len(overlap) > 10 else ""
        )
        raise OverlapError(
            f"{what}: {len(overlap)} dev item(s) used to choose it are also scored: {shown}. "
            "Dev items must be disjoint from the scored items (lower the dev size or the limit, "
            "or choose on other items)"
        )
