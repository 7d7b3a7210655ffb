"""Telling a transient drop of a partition's end from real truncation, before calling it data loss.

Pure decisions with an injected clock, used wherever the connector would report loss: executor readers
(:mod:`streamhydro.kafka.reading`, a range ends below its planned end) and the driver's planner
(:mod:`streamhydro.kafka.source`, a partition's end went below the offset the query has reached).

The high watermark a broker reports can drop for a moment without a record being lost: a new leader's
high watermark is the one it had as a follower, behind the old leader's, until its followers fetch from
it (a leader change, a broker restart). Offsets below the log start are different: the log start only
moves forward (retention, DeleteRecords), so offsets under it are gone at once. So an end below what a
range needs is asked again, every :data:`RECHECK_EVERY_S`, for up to a bounded wait (:func:`recheck_s`:
:data:`RECHECK_S`, or less when the read's own timeout is shorter); only an end still short after that
is truncation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A leader change completes in seconds, and the new leader's high watermark catches up within a few
# follower fetches (replica.fetch.wait.max.ms, 500 ms); 30 s is far past both and far below the time a
# task may take before Spark, a test or a supervisor gives up on it.
RECHECK_S = 30.0
RECHECK_EVERY_S = 0.5


@dataclass(frozen=True)
class Watermarks:
    """A partition's log start (first offset held) and end (high watermark, or the last stable offset
    for a read_committed reader)."""

    low: int
    high: int


def recheck_s(poll_timeout_ms: int) -> float:
    """How long an end short of a range (or a partition missing from the metadata) is asked again, by the
    readers and the planner alike: :data:`RECHECK_S`, at most half the read's timeout (the source option
    ``kafkaConsumer.pollTimeoutMs``)."""
    return min(RECHECK_S, poll_timeout_ms / 2000)


def lost_below_start(from_offset: int, until: int, marks: Watermarks) -> range:
    """Offsets of ``[from_offset, until)`` under the log start: gone for good."""
    return range(from_offset, min(marks.low, until))


def short_of(until: int, marks: Watermarks) -> bool:
    """Whether the partition ends below ``until`` (possibly for a moment)."""
    return marks.high < until


def settle(
    ask: Callable[[], Watermarks | None],
    until: int,
    wait_s: float,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Watermarks | None, bool]:
    """Ask for the watermarks until the partition reaches ``until`` or ``wait_s`` passed.

    ``ask`` returns None when the broker did not answer (a leader being elected); that is asked again too.
    Returns the last answer (None if none came) and whether the end was transient: True when an answer
    reached ``until`` within the wait, False when the end stayed short (truncation) or no answer came.
    """
    deadline = now() + wait_s
    last: Watermarks | None = None
    while True:
        answer = ask()
        if answer is not None:
            last = answer
            if not short_of(until, answer):
                return last, True
        if now() >= deadline:
            return last, False
        sleep(min(RECHECK_EVERY_S, max(0.0, deadline - now())))
