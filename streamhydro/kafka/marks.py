"""The exactly-once marks group checked against the query's checkpoint. Runs on the driver, once per start of
``streamhydro serve`` with ``delivery = "exactly_once"``.

Each task checks the one mark of its range (:func:`streamhydro.kafka.transactions.written_up_to`), but a
task cannot tell a partition whose marks were deleted from one never written: both have no mark, and
rewriting the first duplicates its predictions. The checkpoint can: its offset log says where every
committed batch ended. So at start, before the query runs a batch, :func:`check_group` compares the
group's marks with the checkpoint (:class:`History`), and the group holds an *anchor*, a mark on
``__streamhydro_transaction_probe[0]`` (a partition no query reads) committed before the query's first
write (:func:`ensure_anchor`): where the anchor is gone, the group was deleted, and every partition the
checkpoint has a position for must have a mark. Tasks read the anchor with their own mark, so a group
deleted while the query runs fails the next task instead of letting it rewrite.

A group that does not match fails the start with :class:`GroupMismatch`, naming the group, each
partition's problem and the ``kafka-consumer-groups`` command that sets it back to the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka import KafkaError as ClientError

from streamhydro.errors import KafkaConnectorError
from streamhydro.kafka import clients
from streamhydro.kafka.options import ISOLATION_LEVEL, READ_UNCOMMITTED, ClientConfig, offsets_from_json
from streamhydro.kafka.planning import TopicPartitionKey
from streamhydro.kafka.transactions import ANCHOR, fence, marks_config

log = logging.getLogger(__name__)

_TIMEOUT_S = 30.0
MISSING, AHEAD, BEHIND = "missing", "ahead", "behind"
_CAUSES = {
    MISSING: "the group, or its offsets of these partitions, was deleted (or the query wrote at least once until now, which leaves no marks)",
    AHEAD: "the group was reset forwards (to latest?), or another deployment with a copy of this checkpoint wrote past it",
    BEHIND: "the group was reset backwards (to earliest?), or another deployment with a copy of this checkpoint wrote after it",
}


@dataclasses.dataclass(frozen=True)
class History:
    """Where the query's checkpoint says its ranges of each input partition end.

    ``committed_batch``: the last committed batch (None: none yet), ``written``: its end offsets (every
    range up to there is written and marked); ``planned_batch`` and ``planned``: the batch planned after
    it and not committed (its ranges may be written in part), None and empty when there is none;
    ``advanced``: the partitions that batches after the earliest one the log retains moved, so written
    by a committed batch for certain (the log does not keep where the first batch started).
    """

    committed_batch: int | None
    written: Mapping[TopicPartitionKey, int]
    planned_batch: int | None = None
    planned: Mapping[TopicPartitionKey, int] = dataclasses.field(default_factory=dict)
    advanced: frozenset[TopicPartitionKey] = frozenset()

    @classmethod
    def of(cls, offsets: Mapping[int, list], committed: frozenset[int]) -> History:
        """From a checkpoint's offset log (batch id -> each source's end offsets, as JSON) and its committed
        batch ids: the query's one source's offsets."""

        def ends(batch: int) -> dict[TopicPartitionKey, int]:
            sources = offsets[batch]
            return offsets_from_json(sources[0]) if sources and sources[0] else {}

        done = sorted(b for b in committed if b in offsets)
        last = done[-1] if done else None
        later = sorted(b for b in offsets if last is None or b > last)
        planned = later[0] if later else None
        if last is None:
            return cls(None, {}, planned, ends(planned) if planned is not None else {})
        written, first = ends(last), ends(min(offsets))
        advanced = frozenset(tp for tp, end in written.items() if end > first.get(tp, end))
        return cls(last, written, planned, ends(planned) if planned is not None else {}, advanced)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One input partition whose mark the checkpoint cannot explain; ``fix`` is the offset to set it to."""

    topic: str
    partition: int
    kind: str
    committed: int
    fix: int
    detail: str


class GroupMismatch(KafkaConnectorError):
    """The marks group does not match the query's checkpoint: running would skip or rewrite ranges.

    ``group``, ``problems`` (:class:`Problem`) and ``commands``: the ``kafka-consumer-groups`` commands
    that set the group back to the checkpoint (``<servers>`` to fill in)."""

    def __init__(self, group: str, history: History, problems: list[Problem]) -> None:
        self.group = group
        self.problems = problems
        self.commands = reset_commands(group, problems)
        planned = ""
        ends = [f"{t}:{p}={end}" for (t, p), end in sorted(history.planned.items()) if end > history.written.get((t, p), end)]
        if history.planned_batch is not None and ends:
            planned = (
                f" (batch {history.planned_batch} was planned and not committed: where the output already holds all "
                f"predictions of a partition's range in it, set that partition to the range's end instead, {', '.join(ends)})"
            )
        causes = "; ".join(sorted({_CAUSES[p.kind] for p in problems}))
        super().__init__(
            f"consumer group {group} does not match this query's checkpoint, whose last committed batch is "
            f"{history.committed_batch}: " + "; ".join(p.detail for p in problems) + f". Cause: {causes}. "
            "Fix: if another deployment runs with a copy of this checkpoint, stop one of them (never share a checkpoint "
            "or its group); else find out (by idempotency_key) whether the output holds predictions past the checkpoint, "
            f"and set the group back to it: {' && '.join(self.commands)}{planned}"
        )


def reset_commands(group: str, problems: list[Problem]) -> list[str]:
    """``kafka-consumer-groups`` commands setting each problem partition to its fix offset, one per offset."""
    by_offset: dict[int, list[Problem]] = {}
    for problem in problems:
        by_offset.setdefault(problem.fix, []).append(problem)
    commands = []
    for offset, same in sorted(by_offset.items()):
        topics = " ".join(f"--topic {p.topic}:{p.partition}" for p in same)
        commands.append(
            f"kafka-consumer-groups.sh --bootstrap-server <servers> --group {group} --reset-offsets {topics} --to-offset {offset} --execute"
        )
    return commands


def check_group(history: History, marks: Mapping[TopicPartitionKey, int], anchored: bool) -> list[Problem]:
    """The partitions whose committed offset in the marks group (``marks``, negative or absent when none)
    the checkpoint ``history`` cannot explain (pure: tested without Kafka). ``anchored``: whether the
    group holds its anchor.

    A partition the checkpoint has a position for is marked where its last committed batch ended, or
    inside the planned batch's range (up to its end); a partition without a mark must be one no batch
    wrote, which only the anchor's presence vouches for where the log cannot tell (the first batch).
    """
    problems = []
    for (topic, partition), end in sorted(history.written.items()):
        committed = marks.get((topic, partition), -1)
        top = history.planned.get((topic, partition), end) if history.planned_batch is not None else end
        where = f"{topic}[{partition}]"
        if committed < 0:
            if (topic, partition) in history.advanced or not anchored:
                problems.append(Problem(topic, partition, MISSING, committed, end, f"{where} has no mark, where batch {history.committed_batch} ended at {end}"))
        elif committed < end:
            problems.append(Problem(topic, partition, BEHIND, committed, end, f"{where} is marked at {committed}, before offset {end} where batch {history.committed_batch} ended"))
        elif committed > top:
            upto = f"batch {history.planned_batch}'s range ends" if top != end else f"batch {history.committed_batch} ended"
            problems.append(Problem(topic, partition, AHEAD, committed, end, f"{where} is marked at {committed}, past offset {top} where {upto}"))
    return problems


def read_marks(client: ClientConfig, group: str, partitions: list[TopicPartitionKey]) -> tuple[dict[TopicPartitionKey, int], bool]:
    """The group's committed offsets of ``partitions`` (stable: waits out pending transactions) and whether
    it holds its anchor."""
    wanted = [TopicPartition(t, p) for t, p in partitions] + [TopicPartition(*ANCHOR)]
    found, error = _committed(marks_config(client, group), wanted)
    if error is not None and error.code() == ClientError._TIMED_OUT:
        raise KafkaConnectorError(f"reading the marks of consumer group {group}: {error.str()} after {_TIMEOUT_S:.0f} s. {_unstable(client, group, wanted)}")
    if error is not None:
        raise KafkaConnectorError(f"reading the marks of consumer group {group}: {error.str()}")
    marks = {(tp.topic, tp.partition): tp.offset for tp in found}
    return marks, marks.pop(ANCHOR) >= 0


def _committed(config: ClientConfig, wanted: list[TopicPartition]) -> tuple[list[TopicPartition], ClientError | None]:
    consumer = clients.build_client(Consumer, config)
    try:
        found = consumer.committed(wanted, timeout=_TIMEOUT_S)
    except KafkaException as exc:
        return [], exc.args[0]
    finally:
        consumer.close()
    bad = [tp for tp in found if tp.error is not None]
    return found, bad[0].error if bad else None


def _unstable(client: ClientConfig, group: str, wanted: list[TopicPartition]) -> str:
    """Why a stable read of the group's offsets timed out, told apart by a plain read (one that does not
    wait for pending transactional offsets), and the fix."""
    _, plain = _committed(ClientConfig.of({**marks_config(client, group).as_dict(), ISOLATION_LEVEL: READ_UNCOMMITTED}), wanted)
    if plain is not None:
        return (
            f"The group's coordinator did not answer a plain read either ({plain.str()}): the brokers are down or still "
            "loading the group. Fix: check kafka.bootstrap.servers and the brokers; serve reads the marks again when started again"
        )
    return (
        "The group's coordinator answers a plain read, so offsets committed in a transaction are pending that no producer "
        "of this query holds (every one of its transactional ids was fenced, which finishes their transactions): a hanging "
        "transaction, which Kafka's KIP-890 protocol prevents and librdkafka clients do not speak yet. Fix: find it with "
        "kafka-transactions.sh --bootstrap-server <servers> find-hanging --topic __consumer_offsets, abort it with "
        "kafka-transactions.sh --bootstrap-server <servers> abort --topic __consumer_offsets --partition <its partition> "
        "--start-offset <its start offset>, and start serve again"
    )


def ensure_anchor(client: ClientConfig, group: str) -> None:
    """Commit the group's anchor unless it is there (before the query's first write)."""
    _, anchored = read_marks(client, group, [])
    if not anchored:
        _commit_anchor(client, group)


def _commit_anchor(client: ClientConfig, group: str) -> None:
    from streamhydro.kafka.admin import ensure_topics

    ensure_topics(client, {ANCHOR[0]: 1})  # serve's transaction probe made it already; a broker refuses marks on no topic
    consumer = clients.build_client(Consumer, marks_config(client, group))
    metadata = json.dumps({"query": group, "anchor": "this group holds the query's exactly-once marks"})
    try:
        consumer.commit(offsets=[TopicPartition(*ANCHOR, 0, metadata=metadata)], asynchronous=False)
    except KafkaException as exc:
        raise KafkaConnectorError(f"committing the anchor of consumer group {group}: {exc.args[0].str()}") from exc
    finally:
        consumer.close()
    log.info("consumer group %s: anchor committed on %s[%d]", group, *ANCHOR)


def check_marks(client: ClientConfig, group: str, history: History) -> None:
    """Raise :class:`GroupMismatch` when the group's marks do not match ``history``; else make sure the
    group holds its anchor (a group restored by hand, or from before anchors, gets one here). Earlier producers of
    the query's transactions are fenced first (:func:`~streamhydro.kafka.transactions.fence`), so none is
    left open to hold the read back or to commit a mark after it."""
    fence(client, group, {*history.written, *history.planned})
    marks, anchored = read_marks(client, group, sorted(history.written))
    problems = check_group(history, marks, anchored)
    if problems:
        raise GroupMismatch(group, history, problems)
    log.info("consumer group %s matches the checkpoint (last committed batch %s)", group, history.committed_batch)
    if not anchored:
        _commit_anchor(client, group)
