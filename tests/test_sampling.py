"""The one item sampler and the dev/score overlap check."""

from __future__ import annotations

import hashlib

import pytest

from lenssteer.sampling import (
    OverlapError,
    check_disjoint,
    rank_ids,
    rank_key,
    sample_ids,
    split_ids,
)

IDS = [f"item{i}" for i in range(50)]


def test_rank_key_is_sha256_of_salt_seed_id():
    assert rank_key("x", 3, "task") == hashlib.sha256(b"task\x003\x00x").digest()
    assert rank_key("x", 3) == hashlib.sha256(b"3\x00x").digest()


def test_sample_is_deterministic_nested_and_order_free():
    small, large = sample_ids(IDS, 5, seed=1, salt="t"), sample_ids(IDS, 20, seed=1, salt="t")
    assert large[:5] == small  # a larger sample extends a smaller one
    assert sample_ids(list(reversed(IDS)), 5, seed=1, salt="t") == small
    assert sample_ids(IDS, 5, seed=2, salt="t") != small
    assert sample_ids(IDS, 5, seed=1, salt="other") != small
    assert sample_ids(IDS, None, seed=1, salt="t") == rank_ids(IDS, 1, "t")
    with pytest.raises(ValueError, match="non-negative"):
        sample_ids(IDS, -1)


def test_exclude_and_split_are_disjoint():
    scored = sample_ids(IDS, 10, salt="scored")
    dev = sample_ids(IDS, 10, salt="dev", exclude=scored)
    assert len(dev) == 10 and not set(dev) & set(scored)
    first, rest = split_ids(IDS, [7, None], seed=0, salt="s")
    assert len(first) == 7 and len(rest) == 43 and not set(first) & set(rest)


def test_every_sampler_follows_the_one_rule():
    from lenssteer.data import ParallelCorpus
    from lenssteer.mmlu import MultipleChoiceItem, sample_items
    from lenssteer.task_registry import deterministic_sample
    from lenssteer.transplant_pairs import dev_heldout_split

    assert deterministic_sample(IDS, 8, "mmlu-translated", 4) == set(
        sample_ids(IDS, 8, 4, "mmlu-translated")
    )
    items = [MultipleChoiceItem(i, "en", "q", ["a", "b"], 0, "s") for i in IDS]
    assert {item.id for item in sample_items(items, 8, seed=4)} == set(sample_ids(IDS, 8, 4))
    corpus = ParallelCorpus(
        ids=IDS, texts={"en": IDS, "de": IDS}, central_language="en", source="test"
    )
    assert set(corpus.sample(8, seed=4).ids) == set(sample_ids(IDS, 8, 4))
    dev, held = dev_heldout_split(10, 0.3, seed=2)
    expected = split_ids([str(i) for i in range(10)], [3, None], 2, "transplant-dev")
    assert dev.tolist() == sorted(int(i) for i in expected[0])
    assert held.tolist() == sorted(int(i) for i in expected[1])


def test_overlap_is_an_error_that_names_the_items():
    check_disjoint(["a", "b"], ["c"], "the pair")
    with pytest.raises(OverlapError, match=r"the pair: 1 dev item\(s\).*also scored: b"):
        check_disjoint(["a", "b"], ["b", "c"], "the pair")
