"""A partition end that drops for a moment is waited out; one that stays short is data loss."""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import KafkaError as ClientError

from streamhydro.errors import DataLossError
from streamhydro.kafka import source as source_module
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.reading import read_range
from streamhydro.kafka.truncation import RECHECK_EVERY_S, Watermarks, lost_below_start, recheck_s, settle


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def asker(answers):
    answers = list(answers)

    def ask():
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return ask


def test_an_end_that_comes_back_within_the_wait_is_transient():
    clock = Clock()
    marks, transient = settle(asker([Watermarks(0, 5), None, Watermarks(0, 7), Watermarks(0, 10)]), 10, 30, clock.now, clock.sleep)
    assert transient and marks == Watermarks(0, 10)
    assert clock.sleeps == [RECHECK_EVERY_S] * 3


def test_an_end_that_stays_short_is_truncation_after_the_bounded_wait():
    clock = Clock()
    marks, transient = settle(asker([Watermarks(0, 5)]), 10, 3.2, clock.now, clock.sleep)
    assert not transient and marks == Watermarks(0, 5)
    assert clock.t == pytest.approx(3.2) and max(clock.sleeps) <= RECHECK_EVERY_S


def test_no_answer_at_all_is_not_called_transient():
    clock = Clock()
    assert settle(asker([None]), 10, 2, clock.now, clock.sleep) == (None, False)


def test_an_end_already_there_costs_one_question():
    clock = Clock()
    assert settle(asker([Watermarks(3, 12)]), 10, 30, clock.now, clock.sleep) == (Watermarks(3, 12), True)
    assert clock.sleeps == []


def test_offsets_under_the_log_start_are_gone_at_once_and_the_wait_is_bounded_by_the_read():
    assert list(lost_below_start(5, 20, Watermarks(8, 30))) == [5, 6, 7]
    assert list(lost_below_start(5, 20, Watermarks(5, 30))) == []
    assert recheck_s(120_000) == 30 and recheck_s(10_000) == 5


class Message:
    def __init__(self, offset: int, error: ClientError | None = None) -> None:
        self._offset, self._error = offset, error

    def error(self):
        return self._error

    def offset(self):
        return self._offset

    def key(self):
        return b"k"

    def value(self):
        return str(self._offset).encode()

    def headers(self):
        return None

    def timestamp(self):
        return (0, 0)


class Consumer:
    """A partition whose end is ``ends[i]`` at the i-th look; records up to the current end are fetched."""

    def __init__(self, ends: list[int], low: int = 0) -> None:
        self.ends, self.low, self.looks = ends, low, 0
        self.position = None

    def end(self) -> int:
        return self.ends[min(self.looks, len(self.ends) - 1)]

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        if cached:  # what the last fetch said
            return self.low, self.end()
        self.looks += 1
        return self.low, self.end()

    def assign(self, tps):
        self.position = tps[0].offset

    def unassign(self):
        self.position = None

    def consume(self, num_messages, timeout):
        end = self.end()
        if self.position >= end:
            eof = Message(self.position, ClientError(ClientError._PARTITION_EOF))
            return [eof]
        batch = [Message(o) for o in range(self.position, min(end, self.position + num_messages))]
        self.position += len(batch)
        return batch


def offsets_read(consumer, until, fail=True, poll_timeout_ms=2000):
    batches = read_range(consumer, OffsetRange("t", 0, 0, until), fail, poll_timeout_ms)
    return [int(v) for b in batches for v in b.column("value").to_pylist()]


def test_the_reader_waits_out_an_end_that_drops_for_a_moment():
    # The end is 6 when the reader gets there, back at 10 on the next look (a new leader catching up).
    consumer = Consumer([6, 6, 6, 10])
    assert offsets_read(consumer, 10) == list(range(10))


def test_the_reader_reports_an_end_that_stays_short_as_loss():
    with pytest.raises(DataLossError, match=r"t\[0\] ends at 6, offsets 6..9 are gone \(still after 1 s\)"):
        offsets_read(Consumer([6]), 10)


def test_without_fail_on_data_loss_the_reader_warns_and_returns_what_there_is(caplog):
    with caplog.at_level(logging.WARNING):
        assert offsets_read(Consumer([6]), 10, fail=False) == list(range(6))
    assert "offsets 6..9 are gone" in caplog.text


class Probe:
    def __init__(self, ends: list[int], metadata: list[list] | None = None) -> None:
        self.ends, self.looks = ends, 0
        self.metadata, self.asked = metadata or [[("t", 0)]], 0

    def topic_partitions(self, subscription):
        self.asked += 1
        return self.metadata[min(self.asked - 1, len(self.metadata) - 1)]

    def offset_ranges(self, partitions):
        end = self.ends[min(self.looks, len(self.ends) - 1)]
        self.looks += 1
        return {tp: (0, end) for tp in partitions}


def reader_with(probe, monkeypatch):
    monkeypatch.setattr(source_module, "RECHECK_EVERY_S", 0.01)
    monkeypatch.setattr("streamhydro.kafka.truncation.RECHECK_EVERY_S", 0.01)
    reader = source_module.KafkaStreamReader.__new__(source_module.KafkaStreamReader)
    reader._probe, reader._target = probe, None
    # A read timeout of 2 s: the planner re-checks for half of it, 1 s.
    reader.options = type("Options", (), {"subscription": None, "poll_timeout_ms": 2000})()
    return reader


def test_the_planner_takes_the_end_back_when_it_returns(monkeypatch):
    reader = reader_with(Probe([100]), monkeypatch)
    assert reader._settled({("t", 0): 100, ("t", 1): 7}, {("t", 0): (0, 40), ("t", 1): (0, 9)}) == {
        ("t", 0): (0, 100),
        ("t", 1): (0, 9),
    }


def test_the_planner_keeps_an_end_that_stays_short_for_partitions_to_report(monkeypatch):
    probe = Probe([40])
    reader = reader_with(probe, monkeypatch)
    assert reader._settled({("t", 0): 100}, {("t", 0): (0, 40)}) == {("t", 0): (0, 40)}
    assert probe.looks > 5


def test_a_partition_missing_from_the_metadata_for_a_moment_is_asked_again(monkeypatch):
    probe = Probe([50], metadata=[[("t", 0)], [("t", 0)], [("t", 0), ("t", 1)]])
    reader = reader_with(probe, monkeypatch)
    assert reader._present({("t", 0): 10, ("t", 1): 20}) == {("t", 0): (0, 50), ("t", 1): (0, 50)}
    assert probe.asked == 3


def test_a_partition_still_missing_after_the_wait_is_left_for_loss_reporting(monkeypatch):
    probe = Probe([50])
    reader = reader_with(probe, monkeypatch)
    assert reader._present({("t", 0): 10, ("t", 1): 20}) == {("t", 0): (0, 50)}
    assert probe.asked > 5


class HeldBack(Consumer):
    """A read_committed view: the end (last stable offset) is below the high watermark until a transaction ends."""

    def __init__(self, stable: list[int], high: int) -> None:
        super().__init__(stable)
        self.high, self.polls = high, 0

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return self.low, self.high if cached else self.end()

    def consume(self, num_messages, timeout):
        self.polls += 1
        self.looks = self.polls // 3  # the transaction ends after a few polls
        return super().consume(num_messages, timeout)


def test_records_held_back_by_an_open_transaction_are_waited_for_not_lost():
    consumer = HeldBack([6, 6, 10], high=10)
    assert offsets_read(consumer, 10, poll_timeout_ms=60_000) == list(range(10))  # no 30 s truncation re-check
