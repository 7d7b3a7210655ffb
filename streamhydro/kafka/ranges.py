"""The ranges protocol of streamhydro's connector: what moves between its source, its tasks and the driver.

No record crosses between the JVM and Python. Per micro-batch:

1. The source (:mod:`streamhydro.kafka.source`) plans offset ranges on the driver and gives Spark one row
   per task, :data:`RANGE_SCHEMA` (:func:`range_batch`): the topic-partition range
   ``[from_offset, until_offset)`` the task is to read.
2. Each task (:func:`streamhydro.executor.direct.score_ranges`, in an executor Python worker) turns its row
   back into an :class:`~streamhydro.kafka.planning.OffsetRange` (:func:`ranges_of`), reads, scores and
   writes that range itself, and returns one row of :data:`SUMMARY_SCHEMA` (:func:`summary_batch`): the range
   and how many records it wrote.
3. The driver (:class:`streamhydro.driver.connectors.python.PythonConnector`) collects the summaries:
   Spark counts one input row per range, so the batch's input records are :func:`range_records`, which the
   metrics take instead of Spark's count.

The range rows are the same on every attempt of a task and every replay of the batch (Spark's offset log),
which is what at-least-once replays and exactly-once marks rely on (``docs/delivery.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
from pyspark.sql.types import IntegerType, LongType, StringType, StructField, StructType

from streamhydro.kafka.planning import OffsetRange

RANGE_SCHEMA = StructType(
    [
        StructField("topic", StringType()),
        StructField("partition", IntegerType()),
        StructField("from_offset", LongType()),
        StructField("until_offset", LongType()),
    ]
)
ARROW_RANGE_SCHEMA = pa.schema(
    [
        pa.field("topic", pa.string()),
        pa.field("partition", pa.int32()),
        pa.field("from_offset", pa.int64()),
        pa.field("until_offset", pa.int64()),
    ]
)
# One row per task: the range it read and how many records it wrote (0 for a range an earlier attempt had
# written transactionally).
SUMMARY_SCHEMA = StructType([*RANGE_SCHEMA.fields, StructField("written", LongType())])
ARROW_SUMMARY_SCHEMA = ARROW_RANGE_SCHEMA.append(pa.field("written", pa.int64()))


def range_batch(ranges: Sequence[OffsetRange]) -> pa.RecordBatch:
    """``ranges`` as rows of :data:`RANGE_SCHEMA` (the source's side)."""
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.topic for r in ranges], pa.string()),
            pa.array([r.partition for r in ranges], pa.int32()),
            pa.array([r.from_offset for r in ranges], pa.int64()),
            pa.array([r.until_offset for r in ranges], pa.int64()),
        ],
        schema=ARROW_RANGE_SCHEMA,
    )


def ranges_of(batch: pa.RecordBatch) -> list[OffsetRange]:
    """The rows of a :data:`RANGE_SCHEMA` batch as OffsetRanges (the task's side)."""
    return [
        OffsetRange(row["topic"], row["partition"], row["from_offset"], row["until_offset"])
        for row in batch.to_pylist()
    ]


def summary_batch(offsets: OffsetRange, written: int) -> pa.RecordBatch:
    """A task's one row of :data:`SUMMARY_SCHEMA`."""
    return range_batch([offsets]).append_column(ARROW_SUMMARY_SCHEMA.field("written"), pa.array([written], pa.int64()))


def range_records(summaries: Iterable[Any]) -> int:
    """The input records of a micro-batch: the sum of its tasks' range lengths (the driver's side; rows of
    :data:`SUMMARY_SCHEMA` as ``collect()`` returns them)."""
    return sum(row.until_offset - row.from_offset for row in summaries)
