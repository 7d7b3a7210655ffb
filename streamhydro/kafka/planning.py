"""Offset-range planning for micro-batches: pure functions over ``{(topic, partition): offset}`` maps.

Runs on the driver, in the stream reader's ``latestOffset`` and ``partitions``, once per micro-batch.
No Kafka client here; the reader feeds in what the broker said.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# (topic, partition): the key of every offset map in streamhydro's Kafka code.
TopicPartitionKey = tuple[str, int]


@dataclass(frozen=True)
class OffsetRange:
    """Records ``[from_offset, until_offset)`` of one topic-partition."""

    topic: str
    partition: int
    from_offset: int
    until_offset: int

    @property
    def size(self) -> int:
        return self.until_offset - self.from_offset


def split_limit(available: Mapping[TopicPartitionKey, int], max_rows: int) -> dict[TopicPartitionKey, int]:
    """How many of each partition's ``available`` records to admit so the total is at most ``max_rows``.

    Shares are proportional to what each partition has, and a partition whose share rounds to zero still
    gets one record, as in Spark's Kafka source, so small partitions are not starved while big ones are
    busy. Unlike Spark, the total never exceeds ``max_rows``: the rows given to small partitions come off
    the largest shares, and rows left by rounding down go to the largest remainders.
    """
    total = sum(n for n in available.values() if n > 0)
    if total <= max_rows:
        return {tp: max(n, 0) for tp, n in available.items()}
    shares: dict[TopicPartitionKey, int] = {}
    remainders: dict[TopicPartitionKey, int] = {}
    for tp, n in available.items():
        quotient, remainders[tp] = divmod(max_rows * max(n, 0), total)
        shares[tp] = 1 if quotient == 0 and n > 0 else quotient
    left = max_rows - sum(shares.values())
    if left > 0:
        growable = sorted((tp for tp in shares if shares[tp] < available[tp]), key=lambda tp: (-remainders[tp], tp))
        for tp in growable[:left]:
            shares[tp] += 1
    for tp in sorted(shares, key=lambda tp: (-shares[tp], tp)):
        if left >= 0:
            break
        taken = max(0, min(-left, shares[tp] - 1))
        shares[tp] -= taken
        left += taken
    for tp in sorted(shares, reverse=True):
        if left >= 0:
            break
        if shares[tp] == 1:
            shares[tp] = 0
            left += 1
    return shares


def admit(
    start: Mapping[TopicPartitionKey, int],
    latest: Mapping[TopicPartitionKey, int],
    max_rows: int | None,
) -> dict[TopicPartitionKey, int]:
    """End offsets of the next micro-batch: ``latest``, cut to ``max_rows`` records in all when given.

    ``start`` must hold every partition of ``latest`` (new partitions at their earliest offset). A partition
    whose latest offset is below its start (topic recreated, log truncated) ends at that latest offset:
    planning reports the backwards range as data loss and the next batch goes on from there.
    """
    available = {tp: max(end - start[tp], 0) for tp, end in latest.items()}
    admitted = available if max_rows is None else split_limit(available, max_rows)
    return {tp: end if end < start[tp] else start[tp] + admitted[tp] for tp, end in latest.items()}


def cap(
    latest: Mapping[TopicPartitionKey, int], target: Mapping[TopicPartitionKey, int]
) -> dict[TopicPartitionKey, int]:
    """For Trigger.AvailableNow: never past ``target`` (the ends when the query started), and no new partitions."""
    return {tp: min(end, latest.get(tp, end)) for tp, end in target.items()}


def ranges(
    start: Mapping[TopicPartitionKey, int],
    end: Mapping[TopicPartitionKey, int],
    new_partition_start: Mapping[TopicPartitionKey, int],
) -> list[OffsetRange]:
    """One range per partition with records in ``[start, end)``; partitions absent from ``start`` begin at
    ``new_partition_start`` (their earliest offset). Empty and backwards ranges produce nothing."""
    planned = []
    for (topic, partition), until in sorted(end.items()):
        begin = start.get((topic, partition), new_partition_start.get((topic, partition), until))
        if until > begin:
            planned.append(OffsetRange(topic, partition, begin, until))
    return planned


def regressions(
    start: Mapping[TopicPartitionKey, int], latest: Mapping[TopicPartitionKey, int]
) -> dict[TopicPartitionKey, tuple[int, int | None]]:
    """Partitions whose offsets went backwards (``{tp: (start, latest)}``) or vanished (``(start, None)``)."""
    return {tp: (offset, latest.get(tp)) for tp, offset in start.items() if tp not in latest or latest[tp] < offset}
