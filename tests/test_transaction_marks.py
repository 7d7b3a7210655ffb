"""Exactly-once marks are checked, not trusted, and a range is cut into bounded transactions: every group
state an operator can cause and every cut, decided without Kafka."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamhydro.errors import KafkaConnectorError
from streamhydro.kafka.transactions import (
    MarkMismatch,
    Transaction,
    TransactionBounds,
    mark_metadata,
    pieces,
    written_up_to,
)
from streamhydro.kafka.options import ClientConfig
from streamhydro.kafka.planning import OffsetRange

QUERY = "streamhydro-1111"
RANGE = OffsetRange("events", 3, 100, 200)


def mark(until: int, batch: int | None, query: str = QUERY, start: int = 0, end: int | None = None) -> str:
    return mark_metadata(query, batch, OffsetRange("events", 3, start, until), end)


def test_the_mark_carries_query_batch_range_and_its_end():
    assert json.loads(mark_metadata(QUERY, 7, RANGE)) == {"query": QUERY, "batch": 7, "from": 100, "until": 200, "end": 200}
    assert json.loads(mark_metadata(QUERY, 7, RANGE, 150))["end"] == 150


@pytest.mark.parametrize(
    ("committed", "metadata", "resume"),
    [
        (-1001, None, 100),  # no range of this partition written yet
        (100, mark(100, 6, start=40), 100),  # the previous range is marked: this one is to write
        (100, mark(100, 2, start=40), 100),  # ... by any earlier batch (the partition was idle since)
        (200, mark(200, 7, start=100), 200),  # earlier attempts of this batch wrote it: write nothing
        (150, mark(200, 7, start=100, end=150), 150),  # ... up to 150 in committed transactions: write the rest
        (150, mark(200, 7, start=80, end=150), 150),  # ... the range's start moved by retention before the replay
        (100, "", 100),  # set by hand (kafka-consumer-groups leaves no metadata) to the range's start
        (200, "", 200),  # ... or to its end
        (200, json.dumps({"batch": 7}), 200),  # a mark of the earlier format, at the end
        (200, json.dumps({"query": QUERY, "batch": 7, "from": 100, "until": 200}), 200),  # ... without "end"
    ],
)
def test_marks_this_history_explains(committed, metadata, resume):
    assert written_up_to(QUERY, 7, RANGE, committed, metadata) == resume


@pytest.mark.parametrize(
    ("committed", "metadata", "problem"),
    [
        (900, mark(900, 12, start=800), "reset forwards"),  # reset to latest: skipping would lose 100..199
        (900, "", "not streamhydro's"),  # reset to latest with the tool
        (150, "", "not streamhydro's"),  # by hand inside the range: no transaction of ours says so
        (50, mark(50, 5, start=0), "reset backwards"),  # reset backwards: writing 50..99 again would duplicate
        (150, mark(150, 9, start=100), "marked by batch 9"),  # another batch's mark inside this range
        (150, mark(200, 9, start=100, end=150), "marked by batch 9"),  # ... a copy of the checkpoint, partway
        (150, mark(300, 7, start=100, end=150), "ending at 300"),  # this batch, but not this range
        (200, mark(200, 9, start=100), "marked by batch 9"),  # a copy of the checkpoint wrote this range in its batch 9
        (100, mark(100, 7, start=40), "not an earlier one"),  # the previous range marked by this very batch
        (100, mark(180, 6, start=40, end=100), "partway through batch 6"),  # an earlier batch left unfinished
        (200, mark(200, 7, query="streamhydro-2222"), "another query"),
        (200, mark(180, 7), "the offset was moved"),
        (160, mark(200, 7, start=100, end=150), "the offset was moved"),
        (120, "not json", "not streamhydro's"),
    ],
)
def test_marks_it_cannot_explain_fail_naming_the_group_and_the_fix(committed, metadata, problem):
    with pytest.raises(MarkMismatch) as info:
        written_up_to(QUERY, 7, RANGE, committed, metadata)
    message = str(info.value)
    assert problem in message
    assert f"consumer group {QUERY} marks events[3] written up to offset {committed}" in message
    assert "--reset-offsets" in message and "--topic events:3" in message and "to 200 if they are, or to 100 if not" in message
    assert info.value.group == QUERY and info.value.committed == committed


def test_without_a_batch_id_only_offsets_and_query_are_checked():
    assert written_up_to(QUERY, None, RANGE, 200, mark(200, 3)) == 200
    assert written_up_to(QUERY, None, RANGE, 150, mark(200, 3, start=100, end=150)) == 150
    assert written_up_to(QUERY, None, RANGE, 100, mark(100, 9)) == 100
    with pytest.raises(MarkMismatch):
        written_up_to(QUERY, None, RANGE, 900, mark(900, 3))


def test_bounds_come_from_the_transaction_timeout():
    bounds = TransactionBounds.of(ClientConfig.of({"transaction.timeout.ms": "3000"}), piece_rows=500)
    assert bounds.seconds == pytest.approx(1.0) and bounds.records == 50_000 and bounds.piece_rows == 500
    assert TransactionBounds.of(ClientConfig.of({}), piece_rows=500).seconds == pytest.approx(40.0)
    assert TransactionBounds.of(ClientConfig.of({}), piece_rows=10**6, records=1000).piece_rows == 1000
    assert not bounds.full(0, 99.0), "an empty transaction always takes a piece: every mark moves forwards"
    assert bounds.full(50_000, 0.0) and bounds.full(1, 1.0) and not bounds.full(49_999, 0.99)


def _input(offsets: list[int], batch_rows: int) -> list[pa.RecordBatch]:
    return [pa.RecordBatch.from_pydict({"offset": offsets[i : i + batch_rows]}) for i in range(0, len(offsets), batch_rows)]


class _Clock:
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _cut(offsets: list[int], start: int, until: int, bounds: TransactionBounds, batch_rows: int, step_s: float = 0.0):
    """The transactions a task writes for input ``offsets`` of ``[start, until)``: (from, mark, offsets) each."""
    source = pieces(iter(_input(offsets, batch_rows)), bounds.piece_rows)
    clock, position, written = _Clock(step_s), start, []
    while position < until:
        part = Transaction(source, bounds, clock)
        held = [o for piece in part for o in piece.column("offset").to_pylist()]
        end = part.mark_offset(until)
        written.append((position, end, held))
        position = end
    return written


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 50),
    present=st.lists(st.booleans(), min_size=1, max_size=300),
    records=st.integers(1, 80),
    piece_rows=st.integers(1, 40),
    batch_rows=st.integers(1, 60),
)
def test_transactions_cover_the_range_once_in_bounded_steps(start, present, records, piece_rows, batch_rows):
    until = start + len(present)
    offsets = [start + i for i, here in enumerate(present) if here]  # gaps: compaction, transaction markers
    bounds = TransactionBounds(records=records, seconds=1e9, piece_rows=min(piece_rows, records))
    written = _cut(offsets, start, until, bounds, batch_rows)
    assert [o for _, _, held in written for o in held] == offsets, "every input offset in exactly one transaction, in order"
    assert written[0][0] == start and written[-1][1] == until
    for (a, b, held), nxt in zip(written, [*written[1:], None], strict=True):
        assert a < b and all(a <= o < b for o in held), "each transaction holds its own sub-range and moves the mark"
        assert len(held) < records + bounds.piece_rows
        if nxt is not None:
            assert nxt[0] == b and held and b == held[-1] + 1, "an inner mark is one past the last offset written"


def test_a_transaction_stops_reading_once_open_a_share_of_the_timeout():
    bounds = TransactionBounds(records=10**6, seconds=1.0, piece_rows=10)
    written = _cut(list(range(100)), 0, 100, bounds, batch_rows=100, step_s=0.3)  # each piece read takes 0.3 s
    assert [len(held) for _, _, held in written] == [30] * 3 + [10]
    assert [end for _, end, _ in written] == [30, 60, 90, 100]


def test_an_input_ending_in_a_gap_is_marked_at_the_range_end():
    bounds = TransactionBounds(records=5, seconds=1e9, piece_rows=5)
    assert [(a, b) for a, b, _ in _cut([0, 1, 2, 3, 4], 0, 8, bounds, 5)] == [(0, 5), (5, 8)]
    assert [(a, b, held) for a, b, held in _cut([], 0, 8, bounds, 5)] == [(0, 8, [])]


def test_no_mark_when_the_scoring_stopped_before_its_input_ended():
    part = Transaction(iter(_input(list(range(10)), 5)), TransactionBounds(records=100, seconds=1e9, piece_rows=5))
    next(iter(part))
    with pytest.raises(KafkaConnectorError, match="ended before it had read its input"):
        part.mark_offset(10)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 200), records=st.integers(1, 50), failures=st.lists(st.integers(0, 4), max_size=6))
def test_retries_resume_at_the_last_mark_and_write_every_offset_once(length, records, failures):
    """Attempts that each commit some transactions then fail, then one that finishes: the marks they leave
    lead every retry to exactly the offsets not yet written."""
    start, until = 1000, 1000 + length
    offsets_range = OffsetRange("events", 3, start, until)
    bounds = TransactionBounds(records=records, seconds=1e9, piece_rows=records)
    committed, metadata, written = -1001, None, []
    for commits_before_failing in [*failures, None]:
        position = written_up_to(QUERY, 7, offsets_range, committed, metadata)
        todo = list(range(position, until))
        for i, (_, end, held) in enumerate(_cut(todo, position, until, bounds, 17)):
            if commits_before_failing is not None and i == commits_before_failing:
                break  # the open transaction is aborted: neither its records nor its mark count
            written.extend(held)
            committed, metadata = end, mark_metadata(QUERY, 7, offsets_range, end)
    assert written == list(range(start, until))
    assert written_up_to(QUERY, 7, offsets_range, committed, metadata) == until


def test_closing_a_producer_in_a_fatal_state_does_not_replace_the_tasks_error(caplog):
    """librdkafka raises a fatal transaction error again on close(); the error that ended the task must win."""
    from confluent_kafka import KafkaError as ClientError
    from confluent_kafka import KafkaException

    from streamhydro.kafka import transactions

    class FatalProducer:
        def close(self):
            raise KafkaException(ClientError(ClientError.INVALID_TXN_STATE, "Failed to end transaction", fatal=True))

    with pytest.raises(RuntimeError, match="the task's own error"):
        try:
            raise RuntimeError("the task's own error")
        finally:
            transactions._close(FatalProducer(), "tid-0")
    assert "closed in a failed state" in caplog.text


class _Calls:
    """A transaction call that fails with ``errors`` in turn, then succeeds; each call moves the clock 30 s."""

    def __init__(self, *errors):
        self.errors, self.calls, self.now = list(errors), 0, 0.0

    def __call__(self):
        from confluent_kafka import KafkaException

        self.calls += 1
        self.now += 30.0
        if self.errors:
            raise KafkaException(self.errors.pop(0))

    def clock(self):
        return self.now


def _timed_out():
    from confluent_kafka import KafkaError as ClientError

    return ClientError(ClientError._TIMED_OUT, "Timed out waiting for operation to finish, retry call to resume", retriable=True)


def test_a_transaction_call_that_timed_out_is_called_again_until_it_succeeds(caplog):
    """A broker stalled longer than the call's timeout: the call resumes when called again (librdkafka's
    "retry call to resume"), and the task goes on instead of failing its batch."""
    from streamhydro.kafka.transactions import retried

    call = _Calls(_timed_out(), _timed_out())
    retried(call, "tid-0: commit_transaction", deadline=120.0, clock=call.clock)
    assert call.calls == 3
    assert caplog.text.count("calling it again") == 2


def test_a_transaction_call_is_not_retried_past_the_deadline_or_for_other_errors():
    from confluent_kafka import KafkaError as ClientError
    from confluent_kafka import KafkaException

    from streamhydro.kafka.transactions import retried

    call = _Calls(*[_timed_out()] * 10)
    with pytest.raises(KafkaException, match="retry call to resume"):
        retried(call, "tid-0: commit_transaction", deadline=100.0, clock=call.clock)
    assert call.calls == 4, "the clock passed the deadline at the fourth call (120 s): no fifth"
    fenced = _Calls(ClientError(ClientError._FENCED, "Producer fenced", fatal=True), _timed_out())
    with pytest.raises(KafkaException, match="fenced"):
        retried(fenced, "tid-0: commit_transaction", deadline=1e9, clock=fenced.clock)
    assert fenced.calls == 1


# --- the marks group against the checkpoint, at start (streamhydro.kafka.marks) ----------------------------

from streamhydro.kafka.marks import AHEAD, BEHIND, MISSING, GroupMismatch, History, check_group  # noqa: E402


def _log(*ends: dict[int, int] | None) -> dict[int, list]:
    """An offset log of batches 0.. whose end offsets of ``events`` are ``ends`` (partition -> offset)."""
    return {b: [{"events": {str(p): o for p, o in e.items()}} if e is not None else None] for b, e in enumerate(ends)}


def test_history_reads_the_last_committed_and_the_planned_batch():
    history = History.of(_log({0: 100, 1: 50}, {0: 300, 1: 50}, {0: 400, 1: 80}), frozenset({0, 1}))
    assert history.committed_batch == 1 and history.written == {("events", 0): 300, ("events", 1): 50}
    assert history.planned_batch == 2 and history.planned == {("events", 0): 400, ("events", 1): 80}
    assert history.advanced == {("events", 0)}, "partition 1 did not move after batch 0: the log cannot say batch 0 wrote it"
    assert History.of(_log({0: 100}), frozenset()) == History(None, {}, 0, {("events", 0): 100})
    assert History.of({}, frozenset()) == History(None, {})
    purged = History.of({7: _log({0: 500})[0], 8: _log({0: 600})[0]}, frozenset({7, 8}))
    assert purged.committed_batch == 8 and purged.advanced == {("events", 0)} and purged.planned_batch is None


HISTORY = History.of(_log({0: 100, 1: 50, 2: 0}, {0: 300, 1: 50, 2: 0}, {0: 400, 1: 80, 2: 0}), frozenset({0, 1}))


@pytest.mark.parametrize(
    ("marks", "anchored"),
    [
        ({("events", 0): 300, ("events", 1): 50}, True),  # stopped between batches
        ({("events", 0): 350, ("events", 1): 50}, True),  # batch 2 written in part
        ({("events", 0): 400, ("events", 1): 80}, True),  # batch 2 written, not committed in the checkpoint
        ({("events", 0): 300}, True),  # partition 1 never written (it may have been idle since the start)
        ({("events", 0): 300, ("events", 1): 50, ("events", 2): 0}, False),  # restored by hand, anchor not yet back
    ],
)
def test_groups_the_checkpoint_explains(marks, anchored):
    assert check_group(HISTORY, marks, anchored) == []


@pytest.mark.parametrize(
    ("marks", "anchored", "kinds"),
    [
        ({}, False, {0: MISSING, 1: MISSING, 2: MISSING}),  # the group deleted: anchor and marks gone
        ({("events", 1): 50}, True, {0: MISSING}),  # marks of partition 0 deleted (kafka-consumer-groups --delete-offsets)
        ({("events", 0): 900, ("events", 1): 900, ("events", 2): 900}, True, {0: AHEAD, 1: AHEAD, 2: AHEAD}),  # reset to latest
        ({("events", 0): 0, ("events", 1): 0, ("events", 2): 0}, True, {0: BEHIND, 1: BEHIND}),  # reset to earliest
        ({("events", 0): 200, ("events", 1): 50}, True, {0: BEHIND}),  # a copy of the checkpoint wrote after this one
    ],
)
def test_groups_the_checkpoint_cannot_explain(marks, anchored, kinds):
    problems = check_group(HISTORY, marks, anchored)
    assert {p.partition: p.kind for p in problems} == kinds
    assert all(p.fix == HISTORY.written[("events", p.partition)] for p in problems)


def test_a_group_mismatch_names_the_group_each_partition_and_the_commands():
    problems = check_group(HISTORY, {("events", 1): 900}, anchored=False)
    error = GroupMismatch("streamhydro-q", HISTORY, problems)
    message = str(error)
    assert "\n" not in message
    assert message.startswith("consumer group streamhydro-q does not match this query's checkpoint, whose last committed batch is 1")
    assert "events[0] has no mark, where batch 1 ended at 300" in message
    assert "events[1] is marked at 900, past offset 80 where batch 2's range ends" in message
    assert "was deleted" in message and "reset forwards" in message
    assert error.commands == [
        "kafka-consumer-groups.sh --bootstrap-server <servers> --group streamhydro-q --reset-offsets --topic events:2 --to-offset 0 --execute",
        "kafka-consumer-groups.sh --bootstrap-server <servers> --group streamhydro-q --reset-offsets --topic events:1 --to-offset 50 --execute",
        "kafka-consumer-groups.sh --bootstrap-server <servers> --group streamhydro-q --reset-offsets --topic events:0 --to-offset 300 --execute",
    ]
    assert " && ".join(error.commands) in message
    assert "batch 2 was planned and not committed" in message and "events:0=400, events:1=80" in message
