"""``streamhydro serve`` with one fault injected at a chosen point, for tests/test_exactly_once.py.

    python tests/_serve_with_fault.py kill-after-write BATCH serve --config serve.toml
    python tests/_serve_with_fault.py fail-mid-write FLAG_FILE serve --config serve.toml

- ``kill-after-write``: the driver SIGKILLs itself as soon as micro-batch BATCH's write has returned:
  every transaction of that batch is committed, Spark's commit of the batch is not yet written.
- ``fail-mid-write``: after warm-up, the first task to claim FLAG_FILE (created exclusively) hands its
  third scored batch to the writer, waits until records lie in the output topics, inside the write's
  open transaction, then raises; Spark retries the task (use a master with retries, ``local[N,F]``).

Everything else is the real service, started through the real command line.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from streamhydro import cli
from streamhydro.config import load
from streamhydro.driver import serve
from streamhydro.executor import direct

GROWTH_WAIT_S = 30.0


def kill_after_write(batch: int) -> None:
    process = serve.Service._process_batch

    def process_then_die(self, batch_df, batch_id: int) -> None:
        process(self, batch_df, batch_id)
        if batch_id == batch:
            os.kill(os.getpid(), signal.SIGKILL)

    serve.Service._process_batch = process_then_die


def fail_mid_write(flag: str, config_path: str) -> None:
    kafka = load(config_path).kafka
    client, topics = kafka.librdkafka(), (kafka.output_topic, kafka.dead_letter_topic)
    score_ranges = direct.score_ranges

    def failing_once(plan, io):
        score = score_ranges(plan, io)

        def score_or_fail(batches):
            # In the executor's worker: its scoring, wrapped for this task.
            scored = direct.score_partition

            def scored_or_fail(*args, **kwargs):
                before = _log_end(client, topics)
                for i, batch in enumerate(scored(*args, **kwargs)):
                    yield batch
                    if i == 2 and _claim(flag):
                        _wait_for_growth(client, topics, before)
                        raise RuntimeError("injected fault: a scoring task fails while its transaction is open")

            direct.score_partition = scored_or_fail
            try:
                yield from score(batches)
            finally:
                direct.score_partition = scored

        return score_or_fail

    warm_up = serve.Service._warm_up

    def warm_up_then_inject(self) -> None:
        warm_up(self)
        direct.score_ranges = failing_once

    serve.Service._warm_up = warm_up_then_inject


def _claim(flag: str) -> bool:
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _log_end(client, topics) -> int:
    """Records in ``topics`` counted to their log ends, open transactions included."""
    from confluent_kafka import Consumer, TopicPartition

    from streamhydro.kafka.clients import build_client

    consumer = build_client(Consumer, client.with_defaults({"group.id": "fault-injection"}))
    try:
        metadata = consumer.list_topics(timeout=30).topics
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30)[1]
            for topic in topics
            for p in metadata[topic].partitions
        )
    finally:
        consumer.close()


def _wait_for_growth(client, topics, before: int) -> None:
    deadline = time.monotonic() + GROWTH_WAIT_S
    while _log_end(client, topics) <= before and time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    mode, argument, *serve_args = sys.argv[1:]
    if mode == "kill-after-write":
        kill_after_write(int(argument))
    elif mode == "fail-mid-write":
        fail_mid_write(argument, serve_args[serve_args.index("--config") + 1])
    else:
        sys.exit(f"unknown fault {mode!r}: use kill-after-write or fail-mid-write")
    sys.exit(cli.main(serve_args))
