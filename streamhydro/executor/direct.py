"""The service's task: read one input range from Kafka, score it, write the results to Kafka, in one process.

:func:`score_ranges` runs on the driver once per micro-batch (it closes over the picklable
:class:`~streamhydro.executor.scoring.ScoringPlan` and :class:`RangeIO`); the function it returns is given
to ``mapInArrow`` over the rows of streamhydro's Kafka source (one per range) and runs in executor
Python workers, once per task, each task holding one topic-partition range of the micro-batch.
:func:`score_range` is the whole of one range's work, also usable without Spark (the no-Spark ceiling in
``benchmarks/end_to_end.py`` runs it in one process per core).

Records never cross between the JVM and Python: the worker's cached consumer reads the range
(:mod:`streamhydro.kafka.reading`), :func:`~streamhydro.executor.scoring.score_partition` decodes, scores
and encodes it, and the worker's cached producer writes predictions and dead letters
(:mod:`streamhydro.kafka.writing`), or, for exactly-once, a transactional producer writes them in a
sequence of bounded transactions, each with the offset its part of the range ends at
(:mod:`streamhydro.kafka.transactions`). The only rows Spark moves are the range in and
one summary row out. A task ends after every record it wrote is confirmed (or its transaction committed),
so when Spark commits the micro-batch every prediction of it is in Kafka; a task that fails is retried
by Spark and writes its range again (at least once), or, transactionally, writes the part after the last
committed transaction (once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pyarrow as pa

from streamhydro.executor.scoring import ScoringPlan, score_partition
from streamhydro.executor.sessions import TaskResources
from streamhydro.kafka import clients
from streamhydro.kafka.options import ClientConfig
from streamhydro.kafka.planning import OffsetRange
from streamhydro.kafka.reading import read_range, reader_config
from streamhydro.kafka.ranges import ranges_of, summary_batch
from streamhydro.kafka.transactions import produce_exactly_once
from streamhydro.kafka.writing import produce_batches
from streamhydro.metrics.executor import observe_delivery_wait


@dataclasses.dataclass(frozen=True)
class RangeIO:
    """How a task reads its range and writes its results. Picklable.

    ``client``: the ``kafka.*`` settings (both clients); ``fail_on_data_loss`` and ``poll_timeout_ms`` as
    the source's options. ``transactional_id_prefix``: None writes at least once; else each range is
    written in bounded transactions (ids ``<prefix>-<topic>-<partition>``). ``batch_id`` labels logs and
    transaction marks; ``anchored``: the driver committed the marks group's anchor, whose absence then
    means the group was deleted.
    """

    client: ClientConfig
    fail_on_data_loss: bool = True
    poll_timeout_ms: int = 120_000
    transactional_id_prefix: str | None = None
    batch_id: int | None = None
    anchored: bool = False


def score_ranges(plan: ScoringPlan, io: RangeIO) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for ``ranges.mapInArrow(score_ranges(plan, io), SUMMARY_SCHEMA, profile=...)``: rows of
    :data:`~streamhydro.kafka.ranges.RANGE_SCHEMA` in, :data:`~streamhydro.kafka.ranges.SUMMARY_SCHEMA` out
    (:mod:`streamhydro.kafka.ranges`)."""

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for offsets in ranges_of(batch):
                written = score_range(plan, io, offsets)
                yield summary_batch(offsets, written)

    return score


def score_range(plan: ScoringPlan, io: RangeIO, offsets: OffsetRange, resources: TaskResources | None = None) -> int:
    """Read ``offsets``, score them and write the results; returns the number of records written.

    ``resources`` defaults to what Spark assigned the running task (nothing outside Spark). Both delivery
    modes read and score with the same two functions; exactly-once reads the part of the range still to
    write and scores it one transaction's input at a time.
    """
    consumer = clients.consumer(reader_config(io.client))

    def read(part: OffsetRange) -> Iterator[pa.RecordBatch]:
        return read_range(consumer, part, io.fail_on_data_loss, io.poll_timeout_ms)

    def score(records: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return score_partition(plan, records, resources=resources)

    if io.transactional_id_prefix is None:
        written = produce_batches(io.client, score(read(offsets)))
        observe_delivery_wait(written.flush_seconds)
        return written.rows
    # Pieces of one model batch: a transaction checks its clock before each, so one batch's scoring is the
    # most it can overrun its time bound by.
    return produce_exactly_once(
        io.client, offsets, read, score, io.transactional_id_prefix, io.batch_id, piece_rows=plan.engine.batch_size,
        anchored=io.anchored,
    )
