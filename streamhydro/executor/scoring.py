"""The scoring function given to ``DataFrame.mapInArrow``: Kafka source rows in, Kafka sink rows out.

:func:`score_batches` runs on the driver once per model version (it only closes over the picklable
:class:`ScoringPlan`); the function it returns runs in executor Python workers, once per task
partition of every micro-batch. That function only orchestrates: payload decoding and output
encoding live in :mod:`streamhydro.payload`, sessions in :mod:`streamhydro.executor.sessions`, the
pipeline in :mod:`streamhydro.executor.engine`.

Per task partition it yields, in the sink's schema ``OUTPUT_SCHEMA``: one prediction per good
record (in input order, to ``plan.output_topic``) and one dead letter per bad record (to
``plan.dead_letter_topic``). A record never fails the task: decoding and encoding reject what they
cannot code, down to an exception nobody foresaw (``UnexpectedError``). What fails the task is what
no single record causes: the model cannot load, the worker runs out of memory, or ONNX Runtime
fails a run. A run only gets finite numbers of the model's dtype and shape, so its failure is the
model's or the device's (CUDA out of memory, a lost GPU) and Spark's task retry is the right answer;
dead-lettering the batch would divert good records for an infrastructure fault. At the end it hands
one :class:`BatchStats` to the metrics module.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa

from streamhydro.executor.engine import BatchStats, EngineSettings, Rebatcher, StageClock, Tracer, run_pipeline
from streamhydro.executor.sessions import ModelSession, TaskResources, get_session, place, task_resources
from streamhydro.kafka.options import LIBRDKAFKA_MESSAGE_MAX_BYTES
from streamhydro.payload import Rejected
from streamhydro.payload.formats import Decoder, make_decoder
from streamhydro.payload.encoding import Encoder
from streamhydro.config import PayloadSettings
from streamhydro.payload.limits import fit_dead_letters, refuse_oversized
from streamhydro.registry import Manifest

log = logging.getLogger(__name__)

__all__ = ["OUTPUT_SCHEMA", "EngineSettings", "ScoringPlan", "BatchStats", "score_batches", "score_partition"]

OUTPUT_SCHEMA = "key binary, value binary, topic string, headers array<struct<key:string,value:binary>>"
# Kafka source columns the encoder needs for each scored row (the value for a dead letter, should encoding fail).
META_COLUMNS = ("key", "value", "topic", "partition", "offset", "timestamp", "headers")


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """Everything a scoring task needs; built on the driver once per model version, pickled into tasks.

    ``model_bytes`` is any object whose ``.value`` is the ONNX bytes: a pyspark Broadcast on the
    driver (read by an executor only when its worker has no session for the model yet).
    ``payload`` is the ``[payload]`` section: how record values are decoded.
    ``max_record_bytes``: the sink producer's limit (``KafkaSettings.max_record_bytes``); no output record is larger.
    ``recorded``: whether tasks report to the metrics module; False for serve's warm-up job, whose
    made-up row is no event.
    """

    manifest: Manifest
    model_bytes: Any
    payload: PayloadSettings
    output_topic: str
    dead_letter_topic: str
    engine: EngineSettings = EngineSettings()
    max_record_bytes: int = LIBRDKAFKA_MESSAGE_MAX_BYTES
    recorded: bool = True


def score_batches(
    plan: ScoringPlan, observe: Callable[[BatchStats], None] | None = None
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The function for ``df.mapInArrow(score_batches(plan), OUTPUT_SCHEMA, profile=...)``.

    ``observe`` receives each task partition's stats in addition to the metrics module.
    """

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        return score_partition(plan, batches, observe)

    return score


def score_partition(
    plan: ScoringPlan,
    batches: Iterator[pa.RecordBatch],
    observe: Callable[[BatchStats], None] | None = None,
    trace: Tracer | None = None,
    resources: TaskResources | None = None,
) -> Iterator[pa.RecordBatch]:
    """Score one task partition's batches (also usable without Spark: benchmarks, GPU tests).

    ``resources`` defaults to what Spark assigned the running task (nothing outside Spark).
    """
    resources = resources if resources is not None else task_resources()
    placement = place(plan.engine, resources)
    model = get_session(plan.manifest, plan.model_bytes, plan.payload, placement, plan.engine)
    decoder = make_decoder(plan.manifest, plan.payload)
    encoder = Encoder(plan.manifest, plan.output_topic, plan.dead_letter_topic)
    clock = StageClock(trace)
    stages = _Stages(model, decoder, encoder, clock, plan.engine.batch_size, plan.max_record_bytes)
    depth = plan.engine.depth_for(model.on_gpu)
    results = run_pipeline(_timed_reads(batches, clock), stages.front, stages.compute, stages.back, depth, clock)
    for seq, result in enumerate(results):
        with clock.stage("write", seq):
            yield result
    stats = clock.finish(
        model=plan.manifest.name,
        version=plan.manifest.version,
        partition_id=resources.partition_id,
        requested_device=model.requested_device,
        device=model.device,
        providers=model.providers,
        pipeline_depth=depth,
    )
    if plan.recorded:
        publish_stats(stats)
    if observe is not None:
        observe(stats)


def _timed_reads(batches: Iterator[pa.RecordBatch], clock: StageClock) -> Iterator[pa.RecordBatch]:
    """``batches``, the wait for each one timed as the ``read`` stage."""
    seq = 0
    while True:
        with clock.stage("read", seq):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch
        seq += 1


def _slices(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """``batches`` cut into slices of at most ``rows`` rows, without copying.

    The front decodes one slice at a time, so with pipelining it hands compute a model batch about every
    ``rows`` rows decoded. Decoding a whole Arrow batch (maxRecordsPerBatch, 20,000 rows) before staging
    any of it would stage its model batches in a burst the queue cannot hold, and leave the device idle
    while the next one decodes."""
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


def publish_stats(stats: BatchStats) -> None:
    """Hand a task partition's stats to the metrics module: the one place the engine reports to."""
    from streamhydro.metrics.executor import observe_batch

    log.debug("task partition stats: %s", stats)
    observe_batch(stats)


@dataclasses.dataclass
class _Staged:
    seq: int
    meta: pa.Table
    inputs: Any


@dataclasses.dataclass
class _Computed:
    seq: int
    meta: pa.Table
    outputs: Any


class _Stages:
    """The engine's three stage groups for one task partition (see streamhydro.executor.engine)."""

    def __init__(
        self, model: ModelSession, decoder: Decoder, encoder: Encoder, clock: StageClock, batch_size: int, max_record_bytes: int
    ) -> None:
        self.max_record_bytes = max_record_bytes
        self.model = model
        self.decoder = decoder
        self.encoder = encoder
        self.clock = clock
        self.batch_size = batch_size
        # Only with inference.allow_cpu_fallback: otherwise such a session fails to be created.
        self.fell_back = model.requested_device != model.device

    def front(self, batches: Iterator[pa.RecordBatch]) -> Iterator[_Staged | pa.RecordBatch]:
        rebatcher = Rebatcher(self.batch_size)
        chunks = 0
        for seq, batch in enumerate(_slices(batches, self.batch_size)):
            with self.clock.stage("decode", seq):
                decoded = self.decoder.decode(batch.column("value"))
                meta = batch.select(list(META_COLUMNS))
                if len(decoded.good) < batch.num_rows:
                    meta = meta.take(pa.array(decoded.good))
            self.clock.rows_in += batch.num_rows
            if len(decoded.rejected.rows):
                yield self._dead_letters(seq, batch, decoded.rejected)
            for meta_chunk, inputs in rebatcher.add(meta, decoded.inputs):
                yield self._stage(chunks, meta_chunk, inputs)
                chunks += 1
        for meta_chunk, inputs in rebatcher.flush():
            yield self._stage(chunks, meta_chunk, inputs)

    def compute(self, item: _Staged | pa.RecordBatch) -> _Computed | pa.RecordBatch:
        if not isinstance(item, _Staged):
            return item
        with self.clock.stage("compute", item.seq):
            outputs = self.model.compute(item.inputs)
        return _Computed(item.seq, item.meta, outputs)

    def back(self, item: _Computed | pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        if not isinstance(item, _Computed):
            yield item
            return
        with self.clock.stage("d2h", item.seq):
            outputs = self.model.to_host(item.outputs)
        with self.clock.stage("encode", item.seq):
            out, rejected = self.encoder.predictions(item.meta, outputs)
            out, rejected = refuse_oversized(out, item.meta, rejected, self.max_record_bytes)
        self.clock.rows_scored += out.num_rows
        yield out
        if len(rejected.rows):
            yield self._dead_letters(item.seq, item.meta, rejected)

    def _stage(self, seq: int, meta: pa.Table, inputs: dict[str, Any]) -> _Staged:
        self.clock.batch_sizes.append(meta.num_rows)
        if self.fell_back:
            log.warning(
                "batch %d (%d rows) of %s:%d scored on %s, not on the task's %s (inference.allow_cpu_fallback = true)",
                seq, meta.num_rows, self.model.manifest.name, self.model.manifest.version, self.model.device,
                self.model.requested_device,
            )
        with self.clock.stage("h2d", seq):
            staged = self.model.to_device(inputs)
        return _Staged(seq, meta, staged)

    def _dead_letters(self, seq: int, batch: pa.RecordBatch | pa.Table, rejected: Rejected) -> pa.RecordBatch:
        self.clock.count_errors(rejected.error_classes)
        with self.clock.stage("encode", seq):
            return fit_dead_letters(self.encoder.dead_letters(batch, rejected), self.max_record_bytes)
