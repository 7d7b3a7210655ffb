"""Exactly-once marks are checked, not trusted: every group state an operator can cause, decided without Kafka."""

from __future__ import annotations

import json

import pytest

from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.transactions import MarkMismatch, mark_metadata, range_written

QUERY = "streamhydro-1111"
RANGE = OffsetRange("events", 3, 100, 200)


def mark(until: int, batch: int | None, query: str = QUERY, start: int = 0) -> str:
    return mark_metadata(query, batch, OffsetRange("events", 3, start, until))


def test_the_mark_carries_query_batch_and_range():
    assert json.loads(mark_metadata(QUERY, 7, RANGE)) == {"query": QUERY, "batch": 7, "from": 100, "until": 200}


@pytest.mark.parametrize(
    ("committed", "metadata", "written"),
    [
        (-1001, None, False),  # no range of this partition written yet
        (100, mark(100, 6, start=40), False),  # the previous range is marked: this one is to write
        (100, mark(100, 2, start=40), False),  # ... by any earlier batch (the partition was idle since)
        (200, mark(200, 7, start=100), True),  # an earlier attempt of this batch wrote it: write nothing
        (100, "", False),  # set by hand (kafka-consumer-groups leaves no metadata) to the range's start
        (200, "", True),  # ... or to its end
        (200, json.dumps({"batch": 7}), True),  # a mark of the earlier format, at the end
    ],
)
def test_marks_this_history_explains(committed, metadata, written):
    assert range_written(QUERY, 7, RANGE, committed, metadata) is written


@pytest.mark.parametrize(
    ("committed", "metadata", "problem"),
    [
        (900, mark(900, 12, start=800), "reset forwards"),  # reset to latest: skipping would lose 100..199
        (900, "", "not streamhydro's"),  # reset to latest with the tool
        (50, mark(50, 5, start=0), "reset backwards"),  # reset backwards: writing 50..99 again would duplicate
        (150, mark(150, 9, start=100), "inside this range"),
        (200, mark(200, 9, start=100), "marked by batch 9"),  # a copy of the checkpoint wrote this range in its batch 9
        (100, mark(100, 7, start=40), "not an earlier one"),  # the previous range marked by this very batch
        (200, mark(200, 7, query="streamhydro-2222"), "another query"),
        (200, mark(180, 7), "the offset was moved"),
        (120, "not json", "not streamhydro's"),
    ],
)
def test_marks_it_cannot_explain_fail_naming_the_group_and_the_fix(committed, metadata, problem):
    with pytest.raises(MarkMismatch) as info:
        range_written(QUERY, 7, RANGE, committed, metadata)
    message = str(info.value)
    assert problem in message
    assert f"consumer group {QUERY} marks events[3] written up to offset {committed}" in message
    assert "--reset-offsets" in message and "--topic events:3" in message and "to 200 if they are, or to 100 if not" in message
    assert info.value.group == QUERY and info.value.committed == committed


def test_without_a_batch_id_only_offsets_and_query_are_checked():
    assert range_written(QUERY, None, RANGE, 200, mark(200, 3)) is True
    assert range_written(QUERY, None, RANGE, 100, mark(100, 9)) is False
    with pytest.raises(MarkMismatch):
        range_written(QUERY, None, RANGE, 900, mark(900, 3))
