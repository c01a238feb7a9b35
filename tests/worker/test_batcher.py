"""The batcher never exceeds its budgets, keeps arrival order, and closes on size, tokens or wait."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batcher import Batcher


def drain(b: Batcher, now: float = 1e9):
    out = []
    while (batch := b.pop_ready(now, flush=True)) is not None:
        out.append(batch)
    return out


@settings(max_examples=200, deadline=None)
@given(max_items=st.integers(1, 20), max_tokens=st.integers(8, 300),
       lengths=st.lists(st.integers(1, 8), max_size=80))
def test_batches_respect_budgets_and_keep_order(max_items, max_tokens, lengths):
    b: Batcher[int] = Batcher(max_items, max_tokens, max_wait_s=10)
    for i, n in enumerate(lengths):
        b.add(i, n, now=0.0)
    assert len(b) == len(lengths)
    batches = drain(b)
    assert [i for batch in batches for i in batch.items] == list(range(len(lengths)))
    assert len(b) == 0
    for k, batch in enumerate(batches):
        assert 1 <= len(batch) <= max_items
        assert batch.padded_tokens <= max_tokens
        if k + 1 < len(batches):  # closed because the next item would not fit: it starts the next batch
            nxt = lengths[sum(len(x) for x in batches[: k + 1])]
            assert len(batch) == max_items or batch.padded_with(nxt) > max_tokens


def test_overflowing_item_starts_next_batch():
    b: Batcher[str] = Batcher(max_items=10, max_tokens=100, max_wait_s=1)
    b.add("a", 10, 0.0)
    b.add("b", 10, 0.0)
    b.add("long", 50, 0.0)  # 3 x 50 = 150 > 100: closes [a, b]
    first = b.pop_ready(0.0)
    assert first.items == ["a", "b"] and first.padded_tokens == 20
    assert b.pop_ready(0.0) is None  # [long] waits for company or its deadline
    assert b.pop_ready(1.0).items == ["long"]


def test_item_cap_closes_at_once_and_wait_closes_partial_batch():
    b: Batcher[int] = Batcher(max_items=2, max_tokens=1000, max_wait_s=0.05)
    assert b.seconds_until_ready(0.0) is None
    b.add(1, 5, 0.0)
    assert b.pop_ready(0.01) is None
    assert b.seconds_until_ready(0.01) == pytest.approx(0.04)
    b.add(2, 5, 0.02)
    assert b.seconds_until_ready(0.02) == 0.0
    assert b.pop_ready(0.02).items == [1, 2]
    b.add(3, 5, 0.1)
    assert b.pop_ready(0.149) is None
    assert b.pop_ready(0.16).items == [3]


def test_full_token_budget_closes_without_waiting():
    b: Batcher[int] = Batcher(max_items=100, max_tokens=128, max_wait_s=10)
    b.add(1, 64, 0.0)
    b.add(2, 64, 0.0)  # 2 x 64 = 128: nothing else can join
    assert b.pop_ready(0.0).items == [1, 2]


def test_item_larger_than_budget_is_refused():
    with pytest.raises(ValueError):
        Batcher(4, 16, 0.1).add("x", 17, 0.0)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 16), max_size=60), drop_mod=st.integers(2, 4))
def test_drop_keeps_the_rest_in_order(lengths, drop_mod):
    b: Batcher[int] = Batcher(max_items=7, max_tokens=64, max_wait_s=10)
    for i, n in enumerate(lengths):
        b.add(i, n, now=float(i))
    dropped = b.drop(lambda i: i % drop_mod == 0)
    assert dropped == [i for i in range(len(lengths)) if i % drop_mod == 0]
    kept = [i for batch in drain(b) for i in batch.items]
    assert kept == [i for i in range(len(lengths)) if i % drop_mod != 0]
