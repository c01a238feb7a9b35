"""Only the contiguous acknowledged prefix of each partition is ever committable."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.offsets import OffsetTracker


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(0, 40), gaps=st.lists(st.integers(1, 3), min_size=40, max_size=40))
def test_commit_position_is_first_unacked_offset(data, n, gaps):
    offsets, o = [], 5
    for g in gaps[:n]:
        offsets.append(o)
        o += g  # offsets need not be contiguous (compaction, transaction markers)
    t = OffsetTracker()
    for off in offsets:
        t.track("p0", off)
    acked = data.draw(st.permutations(offsets))[: data.draw(st.integers(0, n))]
    for off in acked:
        t.ack("p0", off)
    unacked = [off for off in offsets if off not in set(acked)]
    prefix = offsets[: offsets.index(unacked[0])] if unacked else offsets  # acked, with nothing unacked before
    expected = prefix[-1] + 1 if prefix else None  # Kafka commits the next offset to read
    assert t.committable().get("p0") == expected
    assert t.outstanding("p0") == (len(offsets) - offsets.index(unacked[0]) if unacked else 0)


def test_partitions_are_independent_and_commits_are_not_repeated():
    t = OffsetTracker()
    for off in range(3):
        t.track("a", off)
        t.track("b", off)
    t.ack("a", 0)
    t.ack("b", 1)
    assert t.committable() == {"a": 1}
    t.mark_committed({"a": 1})
    assert t.committable() == {}
    t.ack("b", 0)
    assert t.committable() == {"b": 2}


def test_revoked_partition_is_forgotten_and_late_acks_ignored():
    t = OffsetTracker()
    t.track("a", 10)
    t.revoke(["a"])
    t.ack("a", 10)
    assert t.committable() == {} and t.partitions() == []
    t.track("a", 4)  # re-assigned later, re-read from the committed offset: a fresh start
    t.ack("a", 4)
    assert t.committable() == {"a": 5}


def test_offsets_must_increase():
    t = OffsetTracker()
    t.track("a", 3)
    with pytest.raises(ValueError):
        t.track("a", 3)
