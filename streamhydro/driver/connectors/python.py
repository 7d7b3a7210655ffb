"""streamhydro's Kafka connector for ``serve``: the source (:mod:`streamhydro.kafka.source`) plans offset
ranges, and each task reads, scores and writes its range in one Python worker
(:mod:`streamhydro.executor.direct`); no record crosses between the JVM and Python. The only connector that
writes exactly once (``docs/delivery.md``). Runs on the driver."""

from __future__ import annotations

import logging
from typing import Any

from streamhydro.driver.connectors import Batch, ServeConnector
from streamhydro.errors import ConfigError
from streamhydro.kafka.options import Delivery

log = logging.getLogger(__name__)

SPECULATION = "spark.speculation"


class PythonConnector(ServeConnector):
    described = "streamhydro's Python"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._anchored = False

    @property
    def exactly_once(self) -> bool:
        return self.config.kafka.delivery == Delivery.EXACTLY_ONCE

    def check(self, spark: Any) -> None:
        """With exactly-once delivery: no speculation, a broker whose transactions are isolated, and a marks
        group that matches the checkpoint."""
        from streamhydro.kafka.source import FORMAT

        log.info("Kafka connector: streamhydro's (%s): each task reads, scores and writes its range", FORMAT)
        if not self.exactly_once:
            return
        from streamhydro.kafka.transactions import check_transactions

        client = self.config.kafka.librdkafka()
        if spark.sparkContext.getConf().get(SPECULATION, "false").strip().lower() == "true":
            raise ConfigError(
                f"spark.conf.{SPECULATION}",
                "is true, and a speculative copy of a write task fences the original's transaction, failing it",
                f'set {SPECULATION} = "false" (in spark.conf or spark-submit --conf), or delivery = "at_least_once"',
            )
        check_transactions(client)
        # A checkpoint's group is checked and anchored here; a new checkpoint's is anchored by its first batch.
        self._anchored = check_marks_group(spark, self.config.spark.checkpoint_location, client)

    def stream(self, spark: Any) -> Any:
        from streamhydro.kafka.source import FORMAT

        return spark.readStream.format(FORMAT).options(**self.config.kafka.source_options()).load()

    def process(self, batch: Batch) -> int:
        """One Spark job, one summary row per task; returns the records the tasks' ranges held (Spark counts a
        range as one row)."""
        from streamhydro.executor.direct import RangeIO, score_ranges
        from streamhydro.kafka.marks import ensure_anchor
        from streamhydro.kafka.ranges import SUMMARY_SCHEMA, range_records

        k = self.config.kafka
        prefix = None
        if self.exactly_once:
            # The query's id is in its checkpoint: the same across restarts, new for a new checkpoint.
            prefix = marks_group(batch.query_id())
            if not self._anchored:
                ensure_anchor(k.librdkafka(), prefix)  # before the query's first write (a new checkpoint's)
                self._anchored = True
        io = RangeIO(k.librdkafka(), k.fail_on_data_loss, transactional_id_prefix=prefix, batch_id=batch.batch_id, anchored=prefix is not None)
        summaries = batch.frame.mapInArrow(score_ranges(batch.plan, io), SUMMARY_SCHEMA, profile=batch.profile).collect()
        return range_records(summaries)


def marks_group(query_id: str) -> str:
    """The prefix of a query's transactional ids, and its consumer group of exactly-once marks."""
    return f"streamhydro-{query_id}"


def check_marks_group(spark: Any, checkpoint: str, client: Any) -> bool:
    """Refuse at start a marks group that does not match the checkpoint's offset log (reset, deleted, or
    shared with a copy of the checkpoint: :mod:`streamhydro.kafka.marks`), before the query runs a batch;
    whether there was a checkpoint (its group then holds its anchor). A new checkpoint has no group yet:
    its first batch commits the group's anchor."""
    from streamhydro.internals import read_checkpoint
    from streamhydro.kafka.marks import History, check_marks

    found = read_checkpoint(spark, checkpoint)
    if found.query_id is None:
        return False
    check_marks(client, marks_group(found.query_id), History.of(found.offsets, found.committed))
    return True
