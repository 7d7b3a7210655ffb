"""The streaming inference service, ``streamhydro serve``: its lifecycle. Runs on the driver for the life of the daemon.

One Structured Streaming query: Kafka source -> ``foreachBatch``. Each micro-batch is one Spark job of
``mapInArrow`` tasks that score with the model version the :class:`~streamhydro.driver.models.ModelFollower`
picked at that batch boundary and write predictions to the output topic and records that could not be
scored to the dead-letter topic. How records are read and written is the connector's
(:mod:`streamhydro.driver.connectors`: Spark's JVM source and sink, or streamhydro's, where each task reads,
scores and writes its range). ``foreachBatch`` is what makes the model version a per-batch decision
without restarting the query. Delivery (``kafka.delivery``) is at-least-once by default, every prediction
carrying an idempotency key (topic/partition/offset of its event); with ``exactly_once`` each task writes
its input range in bounded Kafka transactions (``docs/delivery.md``).

SIGTERM and SIGINT stop the query between micro-batches: a batch that has started writing is
finished and committed first; a batch that has not started writing is left to the next run (its
offsets are not committed), so nothing is lost or half-written, and the process exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from typing import Any

from streamhydro.config import Config, load, pipeline_depth, reference
from streamhydro.driver.connectors import Batch, ServeConnector, connector_for
from streamhydro.errors import StreamhydroError
from streamhydro.executor.engine import GPU_PIPELINE_DEPTH
from streamhydro.internals import check_versions, query_exception_chain

log = logging.getLogger(__name__)

STOP_POLL_SECONDS = 0.2
# The log line that says the query runs; supervisors and tests wait for it.
QUERY_STARTED = "query started"


class StopRequested(StreamhydroError):
    """Raised inside a micro-batch that started after a stop was asked for; ends the query cleanly.

    The query then ends with an exception, which :func:`ended_by_stop` tells from a failure by this type."""


class QueryFailed(StreamhydroError):
    """The streaming query failed and cannot go on in this process; ``cause`` is its root cause in one line.

    serve exits non-zero with it, so that its supervisor restarts it from the checkpoint."""

    def __init__(self, cause: str) -> None:
        self.cause = cause
        super().__init__(f"streaming query failed: {cause} (Spark's full trace is in its log; a restart resumes from the checkpoint)")


def add_parser(subparsers: Any) -> None:
    keys = "\n".join(f"  {name} = {default}\n      {text}" for name, default, text in reference())
    parser = subparsers.add_parser(
        "serve",
        help="run the streaming inference daemon",
        description="Read events from Kafka, score them with an ONNX model in mapInArrow tasks, write predictions "
        "to Kafka. Stops after the current micro-batch on SIGTERM/SIGINT.",
        epilog=f"configuration keys (TOML; env override STREAMHYDRO_<SECTION>_<KEY>; secrets as \"${{ENV}}\"):\n{keys}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (defaults apply to missing keys)")
    parser.set_defaults(run=_run, third_party_log="streamhydro-serve.log")


def _run(args: argparse.Namespace) -> int:
    service = Service(load(args.config))
    return service.run()


class Service:
    """The query and everything it needs; :meth:`run` is the daemon, :meth:`start`/:meth:`stop` for embedding."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._stopping = False
        self._in_batch = False
        self._stop_event = threading.Event()
        self.spark = None
        self.query = None
        self.follower = None
        self.metrics = None
        self._profile = None
        self.connector: ServeConnector = connector_for(config)
        self.batches = 0
        self._query_started = threading.Event()
        self._batch_error: BaseException | None = None

    def start(self, on_signal: Callable[[], None] | None = None) -> Any:
        """Build the session, check the model, start the query. Returns the StreamingQuery.

        ``on_signal``, when given, is called on SIGTERM and SIGINT from the moment the session
        exists (PySpark installs its own SIGINT handler when the SparkContext starts, so handlers
        set before that would be replaced).
        """
        from streamhydro.driver.models import ModelFollower, engine_settings
        from streamhydro.executor.sessions import check_gpu_build
        from streamhydro.kafka.admin import ensure_topics
        from streamhydro.metrics.driver import start_driver_metrics
        from streamhydro.metrics.multiprocess import executor_conf
        from streamhydro.spark import checkpoint_conf, gpu_conf, resolve_master, streaming_session, task_cpus, task_profile

        check_versions()
        c = self.config
        s = c.spark
        check_gpu_build(engine_settings(c), s.task_gpus)
        master = resolve_master(s.master)
        conf = {
            **gpu_conf(master, s.executor_gpus, s.gpu_discovery_script),
            **checkpoint_conf(s.checkpoint_location),
            **s.conf,
            **self.connector.spark_conf(s.conf),
            **executor_conf(c.metrics, master.url),
        }
        log.info("starting the Spark session (master %s)", master.url)
        self.spark = streaming_session(master, s.app_name, conf)
        if on_signal is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: on_signal())
        self._profile = task_profile(master, task_cpus(self.spark), s.task_gpus)
        log.info(
            "scoring stage (Kafka read, score, Kafka write): %s",
            f"task profile {self._profile.id}, {s.task_gpus} GPU and {task_cpus(self.spark)} CPU per task"
            if self._profile else "no GPU requested, the application's task resources",
        )
        if pipeline_depth(c.inference) is None:
            on_gpu = bool(s.task_gpus)
            log.info(
                "inference.pipeline_depth = auto: %d for tasks %s", GPU_PIPELINE_DEPTH if on_gpu else 0,
                "on a GPU" if on_gpu else "on the CPU (pipelining does not pay there)",
            )
        self.metrics = start_driver_metrics(self.spark, c.metrics)
        if self.metrics.url:
            print(f"metrics at {self.metrics.url}", flush=True)
        self.follower = ModelFollower(
            self.spark,
            c,
            on_switch=lambda version: self.metrics.set_model(version.manifest.name, version.manifest.version),
            on_refuse=self.metrics.model_refused,
        )
        self.connector.check(self.spark)
        ensure_topics(c.kafka.librdkafka(), {c.kafka.output_topic: 1, c.kafka.dead_letter_topic: 1})
        # Python workers start while the query starts (its driver-side source, first offsets, first plan):
        # the warm-up job takes the task slots first, so the first micro-batch finds the workers ready.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamhydro-warm-up") as pool:
            warming = pool.submit(self._warm_up)
            stream = self.connector.stream(self.spark)
            self.query = (
                stream.writeStream.queryName(c.spark.app_name)
                .option("checkpointLocation", c.spark.checkpoint_location)
                .trigger(processingTime=c.spark.trigger_interval)
                .foreachBatch(self._process_batch)
                .start()
            )
            self._query_started.set()
            log.info(
                "%s: %s via %s connector -> %s (dead letters -> %s), checkpoint %s",
                QUERY_STARTED,
                c.kafka.subscribe or c.kafka.subscribe_pattern or c.kafka.assign,
                self.connector.described,
                c.kafka.output_topic, c.kafka.dead_letter_topic, c.spark.checkpoint_location,
            )
            try:
                warming.result()
            except BaseException:
                self.query.stop()
                raise
        return self.query

    def run(self) -> int:
        """Start, then wait for a signal or a failure. 0 after a requested stop."""
        self.start(on_signal=self.request_stop)
        try:
            return self.wait()
        finally:
            self.close()

    def request_stop(self) -> None:
        """Ask for a stop after the current micro-batch. Safe from a signal handler."""
        self._stop_event.set()

    def wait(self) -> int:
        """Block until the query ends: 0 after a requested stop, raise if the query failed."""
        while True:
            if self._stop_event.wait(STOP_POLL_SECONDS):
                self._stop_between_batches()
                return 0
            if not self.query.isActive:
                exception = self.query.exception()
                if not ended_by_stop(exception, self._batch_error):
                    raise self._failure(exception)
                return 0

    def stop(self) -> None:
        """Stop between micro-batches and release everything (for embedding and tests)."""
        self.request_stop()
        self._stop_between_batches()
        self.close()

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _stop_between_batches(self) -> None:
        with self._lock:
            self._stopping = True
            busy = self._in_batch
        if busy:
            log.info("stop requested: finishing the current micro-batch")
            while self.query.isActive and self._in_batch:
                time.sleep(STOP_POLL_SECONDS / 4)
        if self.query.isActive:
            self.query.stop()
        exception = self.query.exception()
        if not ended_by_stop(exception, self._batch_error):
            raise self._failure(exception)
        log.info("query stopped after %d micro-batches", self.batches)

    def _failure(self, exception: Any) -> QueryFailed:
        """The query's failure as one line; the whole chain goes to the log at DEBUG (Spark's own log has
        it at ERROR, "terminated with error")."""
        from streamhydro.driver.failure import root_cause

        log.debug("the streaming query failed:\n%s", exception)
        return QueryFailed(root_cause(self._batch_error, query_exception_chain(self.query)))

    def _process_batch(self, batch_df: Any, batch_id: int) -> None:
        with self._lock:
            if self._stopping:
                # Kept before it is raised: the query ends with it, and ended_by_stop asks for its type.
                self._batch_error = StopRequested(f"stop requested before micro-batch {batch_id}; it will run on restart")
                raise self._batch_error
            self._in_batch = True
        try:
            batch = Batch(batch_df, batch_id, self.follower.plan, self._profile, self._query_id)
            records = self.connector.process(batch)
            if records is not None and self.metrics is not None:
                self.metrics.recorder.ranges_read(batch_id, records)
            self.batches += 1
        except Exception as exc:
            # Kept as the Python object it is here, where its Java cause chain can still be walked.
            self._batch_error = exc
            raise
        finally:
            with self._lock:
                self._in_batch = False

    def _query_id(self) -> str:
        """The query's id, once the query object exists (a first micro-batch may start before ``start`` returns)."""
        self._query_started.wait()
        return self.query.id

    def _warm_up(self) -> None:
        """Start the Python workers and load the model, while the query starts (``docs/performance.md``).

        The first task of a fresh worker pays for its start and the ONNX Runtime session (seconds); a
        one-row job per core does that while the driver starts the query, instead of after it.
        """
        from streamhydro.executor.scoring import OUTPUT_SCHEMA, score_batches
        from streamhydro.kafka.records import KAFKA_SCHEMA
        from streamhydro.producer import make_values

        plan = dataclasses.replace(self.follower.plan, recorded=False)
        parallelism = self.spark.sparkContext.defaultParallelism
        value = make_values(plan.manifest, plan.payload.format, count=1)[0]
        rows = [(b"warm-up", value, "warm-up", 0, i, None, 0, []) for i in range(parallelism)]
        started = time.monotonic()
        frame = self.spark.createDataFrame(rows, KAFKA_SCHEMA).repartition(parallelism)
        frame.mapInArrow(score_batches(plan), OUTPUT_SCHEMA, profile=self._profile).count()
        log.info("warm-up: %d Python workers ready in %.1f s", parallelism, time.monotonic() - started)


def ended_by_stop(query_exception: Any | None, batch_error: BaseException | None) -> bool:
    """Whether a query that is no longer active ended because a stop was requested: without an exception,
    or with the :class:`StopRequested` that :meth:`Service._process_batch` raised (``batch_error``, the
    last exception ``foreachBatch`` raised in this process; the query ends with the first one)."""
    return query_exception is None or isinstance(batch_error, StopRequested)
