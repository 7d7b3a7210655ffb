"""The pipelined inference engine inside one scoring task.

Runs in executor Python workers, once per task partition (the ``mapInArrow`` function drives it),
and in benchmarks/tests directly. No Spark import: the engine is plain Python threads over
Arrow/numpy, so it is tested without a cluster and runs on GPU hosts that have no Spark.

Three stage groups run concurrently when ``pipeline_depth > 0``::

    [front thread]   decode the next slice of an input batch, re-batch, stage on host, copy host->device
          | queue "staged" (at most pipeline_depth items)
    [compute thread] run the model on batch N
          | queue "computed" (at most pipeline_depth items)
    [task thread]    copy device->host, encode batch N-1, hand it to Spark

Full queues block the stage before them (back-pressure). An exception in any stage travels down
the queues and is re-raised in the task thread as the same exception object, so its traceback
still shows where it happened. When the consumer stops iterating (generator close, task killed
by an exception) the engine sets a stop flag, both threads leave at their next queue operation,
and they are joined before the generator finishes. With ``pipeline_depth == 0`` the same stages
run one after another in the task thread ("pipelining off").

Every stage reports its duration to one :class:`StageClock`; at the end of a task partition the
clock becomes one :class:`BatchStats`, the single record the metrics module consumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

# In task order: waiting for the next input batch, the pipeline's stages, and waiting for the consumer of
# the output (the writer) to ask for the next one.
STAGES = ("read", "decode", "h2d", "compute", "d2h", "encode", "write")
QUEUES = ("staged", "computed")
JOIN_TIMEOUT_S = 10.0
# inference.pipeline_depth = "auto" on a GPU: decode of the next batch and encode of the last overlap compute.
GPU_PIPELINE_DEPTH = 2
_POLL_S = 0.05

A = TypeVar("A")
B = TypeVar("B")
C = TypeVar("C")
D = TypeVar("D")

# A stage event: (stage name, sequence number, "start" | "end"). Tests observe overlap through it.
Tracer = Callable[[str, int, str], None]


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """The ``[inference]`` configuration section, as the executor sees it. Picklable.

    ``providers``: ONNX Runtime execution providers in preference order.
    ``batch_size``: rows per model run, independent of Arrow's ``maxRecordsPerBatch``.
    ``pipeline_depth``: bounded queue depth between stage groups; 0 runs stages sequentially; None
    (``auto``) picks per task with :meth:`depth_for`.
    ``intra_op_threads``: ORT threads per session; None = the task's CPUs (``spark.task.cpus``).
    ``gpu_mem_limit_bytes``: ORT CUDA arena limit per session; None = the task's share of the GPU.
    ``gpu_share``: the fraction of a GPU each task gets (``spark.task_gpus``), which sizes that share.
    ``allow_tf32``: let the CUDA provider use TF32 in float32 matrix products (faster, about three decimals;
    :func:`streamhydro.precision.score_tolerance`).
    ``allow_cpu_fallback``: a task assigned a GPU whose session did not get a GPU provider scores on the CPU
    (a warning and a metric per batch) instead of failing.
    ``tensorrt_cache_dir``: where the TensorRT provider keeps built engines; "" = a folder under the temp dir.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    batch_size: int = 4096
    pipeline_depth: int | None = None
    intra_op_threads: int | None = None
    gpu_mem_limit_bytes: int | None = None
    gpu_share: float = 1.0
    allow_tf32: bool = False
    allow_cpu_fallback: bool = False
    tensorrt_cache_dir: str = ""

    def depth_for(self, on_gpu: bool) -> int:
        """The pipeline depth of a task whose session is on a GPU (or not): the setting, or for ``auto``
        :data:`GPU_PIPELINE_DEPTH` on a GPU and 0 on the CPU, where compute shares the cores with
        decoding and encoding and overlapping them only adds hand-offs (docs/inference.md)."""
        if self.pipeline_depth is not None:
            return self.pipeline_depth
        return GPU_PIPELINE_DEPTH if on_gpu else 0


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What one task partition did: the single record the engine hands to the metrics module.

    ``stage_seconds`` has one entry per name in ``STAGES`` (time spent inside that stage, summed
    over batches; stages overlap when pipelined, so they may add up to more than ``wall_seconds``).
    ``queue_mean`` / ``queue_max`` are the items waiting in each queue of ``QUEUES``, sampled at
    every put. ``requested_device`` is what the task asked for (``cuda:<id>`` or ``cpu``);
    ``device`` is what ONNX Runtime actually used.
    """

    model: str
    version: int
    partition_id: int | None
    requested_device: str
    device: str
    providers: tuple[str, ...]
    rows_in: int
    rows_scored: int
    dead_letters: Mapping[str, int]
    stage_seconds: Mapping[str, float]
    batch_sizes: tuple[int, ...]
    pipeline_depth: int
    queue_mean: Mapping[str, float]
    queue_max: Mapping[str, int]
    wall_seconds: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class StageClock:
    """Collects stage durations, queue occupancy and row counts for one task partition. Thread-safe."""

    def __init__(self, trace: Tracer | None = None) -> None:
        self._trace = trace
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self.seconds = {name: 0.0 for name in STAGES}
        self._queue_sum = {name: 0 for name in QUEUES}
        self._queue_samples = {name: 0 for name in QUEUES}
        self._queue_max = {name: 0 for name in QUEUES}
        self.rows_in = 0
        self.rows_scored = 0
        self.dead_letters: dict[str, int] = {}
        self.batch_sizes: list[int] = []

    @contextlib.contextmanager
    def stage(self, name: str, seq: int) -> Iterator[None]:
        if self._trace is not None:
            self._trace(name, seq, "start")
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[name] += elapsed
            if self._trace is not None:
                self._trace(name, seq, "end")

    def queued(self, name: str, size: int) -> None:
        with self._lock:
            self._queue_sum[name] += size
            self._queue_samples[name] += 1
            self._queue_max[name] = max(self._queue_max[name], size)

    def count_errors(self, error_classes: Iterable[str]) -> None:
        with self._lock:
            for error_class in error_classes:
                self.dead_letters[error_class] = self.dead_letters.get(error_class, 0) + 1

    def finish(self, **fields: Any) -> BatchStats:
        with self._lock:
            return BatchStats(
                rows_in=self.rows_in,
                rows_scored=self.rows_scored,
                dead_letters=dict(self.dead_letters),
                stage_seconds=dict(self.seconds),
                batch_sizes=tuple(self.batch_sizes),
                queue_mean={
                    name: self._queue_sum[name] / self._queue_samples[name] if self._queue_samples[name] else 0.0
                    for name in QUEUES
                },
                queue_max=dict(self._queue_max),
                wall_seconds=time.perf_counter() - self._started,
                **fields,
            )


class Rebatcher:
    """Cuts a stream of (rows, arrays) pieces into chunks of exactly ``size`` rows (the last may be short).

    A piece is an Arrow table/batch of per-row metadata plus a dict of numpy arrays whose first axis
    is the same rows. Row order is kept; a piece that is cut is sliced without copying, pieces are
    only concatenated when a chunk spans several of them.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be at least 1, got {size}")
        self.size = size
        self._meta: list[pa.Table] = []
        self._arrays: list[dict[str, np.ndarray]] = []
        self._rows = 0

    def add(self, meta: pa.Table | pa.RecordBatch, arrays: dict[str, np.ndarray]) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        if meta.num_rows == 0:
            return
        self._meta.append(meta if isinstance(meta, pa.Table) else pa.Table.from_batches([meta]))
        self._arrays.append(arrays)
        self._rows += meta.num_rows
        while self._rows >= self.size:
            yield self._take(self.size)

    def flush(self) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
        if self._rows:
            yield self._take(self._rows)

    def _take(self, n: int) -> tuple[pa.Table, dict[str, np.ndarray]]:
        if len(self._meta) == 1:
            meta, arrays = self._meta[0], self._arrays[0]
        else:
            meta = pa.concat_tables(self._meta)
            arrays = {name: np.concatenate([piece[name] for piece in self._arrays]) for name in self._arrays[0]}
        chunk = (meta.slice(0, n), {name: array[:n] for name, array in arrays.items()})
        rest = meta.num_rows - n
        self._meta = [meta.slice(n)] if rest else []
        self._arrays = [{name: array[n:] for name, array in arrays.items()}] if rest else []
        self._rows = rest
        return chunk


def run_pipeline(
    source: Iterable[A],
    front: Callable[[Iterator[A]], Iterator[B]],
    middle: Callable[[B], C],
    back: Callable[[C], Iterable[D]],
    depth: int,
    clock: StageClock | None = None,
) -> Iterator[D]:
    """Yield ``back(middle(b))`` for every ``b`` in ``front(source)``, in order.

    With ``depth > 0``, ``front`` and ``middle`` run in their own threads, connected by queues of
    at most ``depth`` items; ``back`` runs in the caller's thread. See the module docstring.
    """
    if depth <= 0:
        for item in front(iter(source)):
            yield from back(middle(item))
        return
    stop = threading.Event()
    staged: queue.Queue[Any] = queue.Queue(maxsize=depth)
    computed: queue.Queue[Any] = queue.Queue(maxsize=depth)
    threads = [
        threading.Thread(
            target=_pump,
            args=(lambda: front(iter(source)), staged, "staged", stop, clock),
            name="streamhydro-front",
            daemon=True,
        ),
        threading.Thread(
            target=_pump,
            args=(lambda: map(middle, _drain(staged, stop)), computed, "computed", stop, clock),
            name="streamhydro-compute",
            daemon=True,
        ),
    ]
    for thread in threads:
        thread.start()
    try:
        for item in _drain(computed, stop):
            yield from back(item)
    finally:
        stop.set()
        for thread in threads:
            thread.join(JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning(
                    "pipeline thread %s still blocked after %.0f s (waiting on its input); it is a daemon thread "
                    "and ends with its next item or the worker",
                    thread.name,
                    JOIN_TIMEOUT_S,
                )


class _Done:
    """End of a stream in a pipeline queue."""


class _Failed:
    """An exception raised upstream, on its way to the task thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _pump(
    produce: Callable[[], Iterator[Any]], out: queue.Queue[Any], name: str, stop: threading.Event, clock: StageClock | None
) -> None:
    try:
        for item in produce():
            if not _put(out, item, stop):
                return
            if clock is not None:
                clock.queued(name, out.qsize())
        _put(out, _Done(), stop)
    except BaseException as error:  # noqa: BLE001 -- handed to the task thread, which re-raises it
        _put(out, _Failed(error), stop)


def _put(out: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
        except queue.Full:
            continue
        return True
    return False


def _drain(source: queue.Queue[Any], stop: threading.Event) -> Iterator[Any]:
    while not stop.is_set():
        try:
            item = source.get(timeout=_POLL_S)
        except queue.Empty:
            continue
        if isinstance(item, _Done):
            return
        if isinstance(item, _Failed):
            raise item.error
        yield item
