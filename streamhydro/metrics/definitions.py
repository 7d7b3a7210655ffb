"""Every Prometheus metric streamhydro exports, and nothing else.

Imported wherever metrics are recorded: the driver (serve, demo), executor Python workers (the
inference engine) and trainer ranks. Nothing here registers anything at import time: each group is
a class whose constructor declares its metrics into the registry it is given, so a test builds a
fresh registry per test and a process builds exactly the groups it records.

Naming: the ``streamhydro_`` prefix, base units (seconds, bytes, ratios 0-1), ``_total`` for
counters, histograms for durations and sizes. The executor group lives in multiprocess mode
(:mod:`streamhydro.metrics.executor`), so it holds only counters and histograms: they merge by
summing across the Python workers' files without any bookkeeping for dead processes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streamhydro.executor.engine import STAGES

PREFIX = "streamhydro_"

# Micro-batch phases are tens of milliseconds to minutes (the first batch of a query takes ~20 s).
BATCH_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Inference stages on one batch: tens of microseconds (a small copy) to seconds (a large CPU batch).
STAGE_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Rows per micro-batch (bounded by kafka.max_offsets_per_trigger) and per inference batch.
# Items waiting in a bounded pipeline queue (inference.pipeline_depth, usually 1-4).
QUEUE_BUCKETS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0)
ROWS_BUCKETS = (1, 10, 100, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000)

QUERY_STATES = ("active", "idle", "stopped", "failed")


class DriverMetricSet:
    """What the driver knows: Structured Streaming progress, Kafka lag, the model in use."""

    def __init__(self, registry: CollectorRegistry) -> None:
        q = ("query",)
        self.input_rows_per_second = Gauge(
            "streamhydro_input_rows_per_second", "Rows read per second in the last micro-batch (inputRowsPerSecond).", q, registry=registry
        )
        self.processed_rows_per_second = Gauge(
            "streamhydro_processed_rows_per_second",
            "Rows processed per second in the last micro-batch (processedRowsPerSecond).",
            q,
            registry=registry,
        )
        self.input_rows = Counter("streamhydro_input_rows_total", "Rows read by the query (sum of numInputRows).", q, registry=registry)
        self.batch_rows = Histogram(
            "streamhydro_batch_rows", "Rows per micro-batch (numInputRows).", q, buckets=ROWS_BUCKETS, registry=registry
        )
        self.batch_duration = Histogram(
            "streamhydro_batch_duration_seconds",
            "Micro-batch duration by phase (durationMs: triggerExecution is the whole batch, addBatch the "
            "inference and write, latestOffset/getBatch the source, walCommit/commitOffsets the checkpoint).",
            ("query", "phase"),
            buckets=BATCH_SECONDS_BUCKETS,
            registry=registry,
        )
        self.batches = Counter("streamhydro_batches_total", "Micro-batches completed (progress events).", q, registry=registry)
        self.query_state = Gauge(
            "streamhydro_query_state",
            f"1 for the query's current state, 0 for the others ({', '.join(QUERY_STATES)}).",
            ("query", "state"),
            registry=registry,
        )
        self.last_progress_age = Gauge(
            "streamhydro_query_last_progress_age_seconds",
            "Seconds since the query last reported progress or idleness; grows when it hangs or stops.",
            q,
            registry=registry,
        )
        self.kafka_lag = Gauge(
            "streamhydro_kafka_lag_records",
            "Records waiting in the partition when the last micro-batch was planned: the partition's end offset "
            "minus the offset processed so far (0 once the query reports idle).",
            ("query", "topic", "partition"),
            registry=registry,
        )
        # Info-style gauges (value 1, the facts in labels): no series at all until something is known.
        self.model = Gauge("streamhydro_model_info", "The model version serving predictions (value 1).", ("model", "version"), registry=registry)
        self.model_refusals = Counter(
            "streamhydro_model_refusals_total",
            "Model versions refused (checksum, loading or input checks failed); the previous version keeps serving.",
            ("model", "version"),
            registry=registry,
        )
        self.last_refusal = Gauge(
            "streamhydro_model_last_refusal_info",
            "The most recently refused model version and why (value 1).",
            ("model", "version", "reason"),
            registry=registry,
        )


class ExecutorMetricSet:
    """What the inference engine measures in executor Python workers (multiprocess mode).

    Recorded once per task partition from the engine's ``BatchStats``: stage times are the time
    the partition spent in each stage (summed over its inference batches).
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.stage_duration = Histogram(
            "streamhydro_inference_stage_duration_seconds",
            f"Time one task partition spent in an inference stage ({', '.join(STAGES)}); stages overlap when pipelined.",
            ("stage", "device"),
            buckets=STAGE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.delivery_wait = Histogram(
            "streamhydro_delivery_wait_seconds",
            "Time one task waited, after handing its last record to the producer, until every record was confirmed.",
            buckets=STAGE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.partition_duration = Histogram(
            "streamhydro_inference_partition_duration_seconds",
            "Wall time of one task partition in the inference engine.",
            ("device",),
            buckets=STAGE_SECONDS_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "streamhydro_inference_batch_rows", "Rows per ONNX Runtime call.", ("device",), buckets=ROWS_BUCKETS, registry=registry
        )
        self.queue_items = Histogram(
            "streamhydro_inference_queue_items",
            "Mean items waiting in a pipeline queue (staged, computed) over one task partition.",
            ("queue",),
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.rows_scored = Counter(
            "streamhydro_inference_rows_total",
            "Rows scored (predictions produced), by model version and device.",
            ("model", "version", "device"),
            registry=registry,
        )
        self.partitions = Counter(
            "streamhydro_inference_partitions_total", "Task partitions the engine finished.", ("device",), registry=registry
        )
        self.device_fallbacks = Counter(
            "streamhydro_inference_device_fallbacks_total",
            "Task partitions that ran on another device than the one they asked for (e.g. a GPU task on CPU).",
            ("requested", "device"),
            registry=registry,
        )
        self.cpu_fallback_batches = Counter(
            "streamhydro_inference_cpu_fallback_batches_total",
            "Inference batches scored on the CPU by tasks Spark assigned a GPU (only with inference.allow_cpu_fallback "
            "= true; without it such a task fails).",
            ("requested", "device"),
            registry=registry,
        )
        self.dead_letters = Counter(
            "streamhydro_dead_letters_total",
            "Records sent to the dead-letter topic, by error class.",
            ("error_class",),
            registry=registry,
        )


class TrainerMetricSet:
    """What a trainer rank reports (served by the rank, or pushed to a Pushgateway)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.loss = Gauge("streamhydro_trainer_loss", "Training loss of the last step.", registry=registry)
        self.epoch = Gauge("streamhydro_trainer_epoch", "Last finished epoch (1-based; ends at training.epochs).", registry=registry)
        self.samples_per_second = Gauge(
            "streamhydro_trainer_samples_per_second", "Training samples per second over the last epoch.", registry=registry
        )
        self.samples = Counter("streamhydro_trainer_samples_total", "Training samples processed.", registry=registry)
        self.steps = Counter("streamhydro_trainer_steps_total", "Optimizer steps taken.", registry=registry)
        self.rank = Gauge("streamhydro_trainer_rank", "This process' rank in the barrier stage.", registry=registry)
        self.ranks = Gauge("streamhydro_trainer_ranks", "Ranks in the barrier stage (world size).", registry=registry)


# GPU metrics are read from NVML at scrape time by :class:`streamhydro.metrics.gpu.GpuCollector`;
# their names and help texts live here with the rest. Labels: gpu (the address Spark gives tasks,
# see streamhydro.devices.spark_addresses), name (model).
GPU_LABELS = ("gpu", "name")
GPU_UTILIZATION = ("streamhydro_gpu_utilization_ratio", "Fraction of the last sample period the GPU was busy (0-1).")
GPU_MEMORY_USED = ("streamhydro_gpu_memory_used_bytes", "GPU memory in use.")
GPU_MEMORY_TOTAL = ("streamhydro_gpu_memory_total_bytes", "GPU memory installed.")
GPU_TEMPERATURE = ("streamhydro_gpu_temperature_celsius", "GPU core temperature.")
GPU_POWER = ("streamhydro_gpu_power_watts", "GPU power draw.")
GPU_FAMILIES = (GPU_UTILIZATION, GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_TEMPERATURE, GPU_POWER)


def declared_names() -> set[str]:
    """Every sample name streamhydro can export (``_bucket``/``_count``/``_sum``/``_info`` included)."""
    registry = CollectorRegistry()
    DriverMetricSet(registry)
    ExecutorMetricSet(registry)
    TrainerMetricSet(registry)
    names: set[str] = {name for name, _ in GPU_FAMILIES}
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}
    for family in registry.collect():
        names.update(f"{family.name}{suffix}" for suffix in suffixes[family.type])
    return names
