"""ONNX Runtime sessions for scoring: device placement, model validation, and a per-worker cache.

Runs in executor Python workers (once per task to resolve placement; a session is created once per
(model sha256, device) per worker) and on the driver (:func:`validate_model`, before a model
version is switched to). pyspark is imported lazily, only to read the task's resources, so this
module also works on GPU hosts without Spark.

Placement rules:

* A task that Spark assigned a GPU (``TaskContext.resources()["gpu"]``) runs on the first assigned
  address, turned into a CUDA ordinal by :func:`streamhydro.devices.cuda_ordinal` (nvidia-smi
  index, GPU or MIG UUID) and passed as ``device_id`` to every GPU provider (CUDA and TensorRT);
  Spark does not set ``CUDA_VISIBLE_DEVICES``, so this is the only pinning there is.
* A task with no GPU assignment runs on CPU even when the settings list the CUDA provider: it must
  not silently take device 0 from the tasks that were given it.
* ORT falls back to CPU without raising when the CUDA provider cannot load; the session's actual
  providers are read back and logged (one line per session), and :class:`ModelSession` records
  both the requested and the actual device. A task assigned a GPU whose session got no GPU provider
  fails with :class:`~streamhydro.errors.CpuFallbackError` (cause and fix in one line) unless
  ``inference.allow_cpu_fallback``; :func:`check_gpu_build` refuses the same on the driver at start.
* The CUDA provider gets ``use_tf32 = 0`` unless ``inference.allow_tf32`` (see
  :mod:`streamhydro.precision`); the TensorRT provider an engine cache and one shape profile
  (1 to ``batch_size`` rows), so it builds each engine once instead of once per batch shape.

Cache caveats: sessions live in module state of the Python worker. With
``spark.python.worker.reuse=true`` (streamhydro's default) a worker serves many tasks, so later
tasks on the same model and device reuse the session; tasks that share a GPU through fractional
amounts run in different workers and each holds its own session and CUDA arena. A worker keeps
sessions on one GPU at a time: a task on another GPU evicts the sessions (and so the arenas) on
the old one; the CUDA context ORT opened there stays until the worker exits. Each session's device
memory, its CUDA arena plus the engine's :class:`InputBuffers`, is bounded: by ``gpu_mem_limit_bytes``,
or else by the task's share of the GPU's memory (``gpu_share`` x total x :data:`ARENA_FRACTION`). At most ``MAX_SESSIONS`` sessions are kept;
creating a session for a new version of a model evicts that model's older versions on the same
device. Each session holds the model's weights (and, on CUDA, its arena) until evicted or the
worker exits.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from streamhydro.devices import cuda_ordinal, device_memory_bytes
from streamhydro.config import PayloadSettings
from streamhydro.errors import ConfigError, CpuFallbackError, ModelError, StreamhydroError
from streamhydro.executor.engine import EngineSettings
from streamhydro.payload.formats import make_decoder
from streamhydro.registry import Manifest, TensorSpec, numpy_dtype

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
GPU_PROVIDERS = (CUDA_PROVIDER, TENSORRT_PROVIDER)
DEVICE_CPU = "cpu"
MAX_SESSIONS = 4
# Share of the task's part of the GPU memory that the arena may take: the rest is left for the CUDA
# context, cuDNN/cuBLAS workspaces and allocations ORT makes outside its arena.
ARENA_FRACTION = 0.8
# What users install for GPU scoring: onnxruntime-gpu with the CUDA and cuDNN wheels (pyproject.toml).
GPU_EXTRA = "streamhydro[gpu]"
TENSORRT_CACHE_DIR = "streamhydro-tensorrt"

# ONNX Runtime's type names of the tensor types a manifest may name (streamhydro.registry.DTYPES).
_ORT_DTYPES = {
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


class OnnxRuntimeMissing(StreamhydroError):
    """Neither ONNX Runtime build is installed in this interpreter."""


def onnxruntime() -> Any:
    """The ``onnxruntime`` module, or :class:`OnnxRuntimeMissing` naming the extra to install.

    ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same package; with both installed the
    one installed last wins, so that case is logged with the fix.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxRuntimeMissing(
            "ONNX Runtime is not installed in this interpreter. Fix: pip install 'streamhydro[cpu]' (onnxruntime), "
            "or 'streamhydro[gpu]' (onnxruntime-gpu) on NVIDIA hosts -- one of the two, not both"
        ) from exc
    _warn_if_both_builds()
    _preload_gpu_libraries(ort)
    return ort


@functools.cache
def _preload_gpu_libraries(ort: Any) -> None:
    """Once per process, before the first session: load the CUDA and cuDNN libraries that the ``gpu`` extra
    installs as wheels (``onnxruntime.preload_dlls``, in builds from 1.21 on; CUDA builds only).

    ``preload_dlls`` reports what it could not load by printing; that text goes to the log instead.
    """
    if not hasattr(ort, "preload_dlls") or CUDA_PROVIDER not in ort.get_available_providers():
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 -- a failed preload leaves ORT to find the libraries itself
        log.warning("onnxruntime.preload_dlls() failed (%s); ONNX Runtime will look for CUDA on the library path", exc)
    text = printed.getvalue().strip()
    if text:
        log.warning("onnxruntime.preload_dlls(): %s", " | ".join(text.splitlines()))


def installed_builds() -> list[str]:
    """The ONNX Runtime distributions installed in this interpreter, as "name version"."""
    from importlib import metadata

    installed = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return installed


@functools.cache
def _warn_if_both_builds() -> None:
    """Once per process: a warning when both ONNX Runtime distributions are installed."""
    installed = installed_builds()
    if len(installed) == 2:
        log.warning(
            "both %s and %s are installed; they share one package and the last installed wins. "
            "Fix: pip uninstall -y onnxruntime onnxruntime-gpu, then install the one you want", *installed,
        )


@dataclasses.dataclass(frozen=True)
class TaskResources:
    """What Spark gave the current task: GPU addresses, CPUs, partition id (empty outside Spark)."""

    gpu_addresses: tuple[str, ...] = ()
    cpus: int | None = None
    partition_id: int | None = None


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a task asks ORT to run: the requested device and the provider list to pass."""

    device: str
    device_id: int | None
    providers: tuple[str, ...]
    intra_op_threads: int
    note: str


def task_resources() -> TaskResources:
    """The current Spark task's resources; empty when not inside a Spark task (or without pyspark)."""
    try:
        from pyspark.taskcontext import TaskContext
    except ImportError:
        return TaskResources()
    context = TaskContext.get()
    if context is None:
        return TaskResources()
    gpu = context.resources().get("gpu")
    return TaskResources(
        gpu_addresses=tuple(gpu.addresses) if gpu is not None else (),
        cpus=context.cpus(),
        partition_id=context.partitionId(),
    )


def place(settings: EngineSettings, resources: TaskResources) -> Placement:
    """Decide device and providers for a task from the settings and what Spark assigned it."""
    threads = settings.intra_op_threads or resources.cpus or os.cpu_count() or 1
    if resources.cpus:
        threads = min(threads, resources.cpus)
    wants_gpu = any(p in GPU_PROVIDERS for p in settings.providers)
    if wants_gpu and resources.gpu_addresses:
        device_id = cuda_ordinal(resources.gpu_addresses[0])
        return Placement(
            device=f"cuda:{device_id}",
            device_id=device_id,
            providers=settings.providers,
            intra_op_threads=threads,
            note=f"GPU address(es) {list(resources.gpu_addresses)} assigned to the task",
        )
    cpu_only = tuple(p for p in settings.providers if p not in GPU_PROVIDERS) or (CPU_PROVIDER,)
    note = "CPU requested"
    if wants_gpu:
        note = "GPU provider configured but no GPU assigned to this task: using CPU, not device 0"
    return Placement(DEVICE_CPU, None, cpu_only, threads, note)


class InputBuffers:
    """Device memory for a session's inputs that the engine owns: ``slots`` sets of one tensor per input, each
    ``rows`` rows long, allocated once when the session is created and reused round-robin.

    :meth:`stage` copies a batch of at most ``rows`` rows host->device into the next set (a shorter batch is
    padded on the host to the set's size, once per task at most: the rebatcher cuts full batches until the
    last) and returns it bound as its first ``n`` rows. A set is overwritten ``slots`` stagings later, so
    ``slots`` must exceed the batches a task holds at once between staging and compute: the pipeline's queue
    (``pipeline_depth``), the one being staged and the one being computed (:func:`input_slots`). Staging runs
    in one thread only, the engine's front stage.

    With these, and outputs bound to the session's own allocator, every byte a session puts on its device
    is either in its arena or in these buffers, a size known before the session exists
    (:func:`input_buffer_bytes`), so ``gpu_mem_limit`` bounds both (:func:`arena_limit_bytes`).
    """

    def __init__(self, specs: Iterable[TensorSpec], rows: int, slots: int, device_type: str, device_id: int) -> None:
        ort = onnxruntime()
        self.rows = rows
        self.device_type = device_type
        self.device_id = device_id
        self._specs = {spec.name: spec for spec in specs}
        shapes = {name: (rows, *spec.shape[1:]) for name, spec in self._specs.items()}
        self._host = {name: np.zeros(shapes[name], dtype=numpy_dtype(spec.dtype)) for name, spec in self._specs.items()}
        self._sets = [
            {name: ort.OrtValue.ortvalue_from_shape_and_type(list(shapes[name]), self._host[name].dtype, device_type, device_id)
             for name in self._specs}
            for _ in range(slots)
        ]
        self._next = 0

    @property
    def slots(self) -> int:
        return len(self._sets)

    def stage(self, inputs: dict[str, np.ndarray]) -> "StagedInputs":
        buffers = self._sets[self._next]
        self._next = (self._next + 1) % len(self._sets)
        rows = len(next(iter(inputs.values())))
        if rows > self.rows:
            raise ValueError(f"a batch of {rows} rows does not fit input buffers of {self.rows} rows")
        for name, array in inputs.items():
            if rows == self.rows:
                buffers[name].update_inplace(np.ascontiguousarray(array, dtype=self._host[name].dtype))
            else:
                host = self._host[name]
                host[:rows] = array
                buffers[name].update_inplace(host)
        return StagedInputs(buffers, rows)

    def bind(self, binding: Any, staged: "StagedInputs") -> None:
        for name, value in staged.buffers.items():
            shape = [staged.rows, *self._specs[name].shape[1:]]
            binding.bind_input(name, self.device_type, self.device_id, self._host[name].dtype, shape, value.data_ptr())


@dataclasses.dataclass(frozen=True)
class StagedInputs:
    """One batch's inputs on the device: the first ``rows`` rows of one set of :class:`InputBuffers`."""

    buffers: dict[str, Any]
    rows: int


def input_slots(settings: EngineSettings, on_gpu: bool) -> int:
    """How many sets of input buffers a session needs: the batches one task holds between staging and compute
    (the queue of ``pipeline_depth`` items, one being staged, one being computed)."""
    return settings.depth_for(on_gpu) + 2


def input_buffer_bytes(manifest: Manifest, settings: EngineSettings) -> int:
    """The device bytes a GPU session's :class:`InputBuffers` take (0 when its inputs are not bound)."""
    if any(spec.dtype == "string" for spec in (*manifest.inputs, *manifest.outputs)):
        return 0
    row_bytes = sum(spec.width * np.dtype(numpy_dtype(spec.dtype)).itemsize for spec in manifest.inputs)
    return input_slots(settings, on_gpu=True) * settings.batch_size * row_bytes


@dataclasses.dataclass
class ModelSession:
    """An ORT session bound to one device, with the three device-facing stages of the engine.

    :meth:`compute` runs every manifest output; :meth:`to_host` gives them as ``{output name:
    array}``, batch axis first. With ``buffers`` (a session on a GPU whose inputs and outputs are all
    numeric), inputs are copied host->device into the engine's :class:`InputBuffers` (:meth:`to_device`),
    the run is bound with IOBinding so each output stays on the device, allocated by the session's arena
    (:meth:`compute`), and :meth:`to_host` copies them back. Without, the copies are no-ops and
    :meth:`compute` is a plain ``run``: on the CPU, and for a model with a string input or output (ORT keeps
    strings on the host and cannot make a device OrtValue of them).
    """

    session: Any
    manifest: Manifest
    requested_device: str
    device: str
    device_id: int | None
    providers: tuple[str, ...]
    buffers: InputBuffers | None = None

    @property
    def on_gpu(self) -> bool:
        return self.device != DEVICE_CPU

    def to_device(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | StagedInputs:
        return inputs if self.buffers is None else self.buffers.stage(inputs)

    def compute(self, staged: dict[str, np.ndarray] | StagedInputs) -> dict[str, Any]:
        names = [spec.name for spec in self.manifest.outputs]
        if self.buffers is None:
            return dict(zip(names, self.session.run(names, staged)))
        binding = self.session.io_binding()
        self.buffers.bind(binding, staged)
        for name in names:
            binding.bind_output(name, self.buffers.device_type, self.buffers.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return dict(zip(names, binding.get_outputs()))

    def to_host(self, outputs: dict[str, Any]) -> dict[str, np.ndarray]:
        if self.buffers is None:
            return outputs
        return {name: value.numpy() for name, value in outputs.items()}


_lock = threading.Lock()
_sessions: collections.OrderedDict[tuple[Any, ...], ModelSession] = collections.OrderedDict()


def get_session(manifest: Manifest, model_bytes: Any, payload: PayloadSettings, placement: Placement, settings: EngineSettings) -> ModelSession:
    """The worker's session for (model sha256, device), created and validated on first use.

    ``model_bytes`` is any holder whose ``.value`` is the ONNX bytes (a Broadcast); it is only
    read when the session has to be created.
    """
    key = (manifest.sha256, placement.device, placement.providers, placement.intra_op_threads, settings.gpu_mem_limit_bytes,
           settings.gpu_share, settings.allow_tf32, settings.allow_cpu_fallback, settings.tensorrt_cache_dir,
           settings.batch_size, settings.pipeline_depth)
    with _lock:
        cached = _sessions.get(key)
        if cached is not None:
            _sessions.move_to_end(key)
            return cached
        for old in [k for k in _sessions if _evicted_by(k, manifest, placement)]:
            del _sessions[old]
        created = _create(manifest, model_bytes.value, payload, placement, settings)
        _sessions[key] = created
        while len(_sessions) > MAX_SESSIONS:
            _sessions.popitem(last=False)
        return created


def _evicted_by(key: tuple[Any, ...], manifest: Manifest, placement: Placement) -> bool:
    """Whether creating a session for ``manifest`` at ``placement`` drops the cached session under ``key``.

    Older versions of the same model on the same device go; so does everything on another GPU,
    so that a worker holds arenas on one GPU only.
    """
    device = key[1]
    if device == placement.device:
        return _sessions[key].manifest.name == manifest.name
    return device != DEVICE_CPU and placement.device != DEVICE_CPU


def clear_sessions() -> None:
    """Drop every cached session of this worker (tests; a worker that must free GPU memory)."""
    with _lock:
        _sessions.clear()


def validate_model(manifest: Manifest, model_bytes: bytes, payload: PayloadSettings | None = None) -> None:
    """Load the model on CPU and check it against its manifest (and the payload settings, when given).

    Runs on the driver before a model version is served or added to the registry, and (through
    :func:`get_session`) in every executor session. Raises :class:`ModelError` naming what does
    not fit.
    """
    placement = Placement(DEVICE_CPU, None, (CPU_PROVIDER,), 1, "validation")
    _create(manifest, model_bytes, payload, placement, EngineSettings())


def _create(manifest: Manifest, model_bytes: bytes, payload: PayloadSettings | None, placement: Placement, settings: EngineSettings) -> ModelSession:
    ort = onnxruntime()
    label = f"{manifest.name}:{manifest.version}"
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != manifest.sha256:
        raise ModelError(label, f"model bytes have sha256 {digest}, manifest says {manifest.sha256}; republish the model")
    if payload is not None:
        make_decoder(manifest, payload)
    options = ort.SessionOptions()
    options.intra_op_num_threads = placement.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = set(ort.get_available_providers())
    providers = provider_options(placement, settings, available, manifest)
    try:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers or [CPU_PROVIDER])
    except Exception as exc:  # noqa: BLE001 -- ORT raises its own untyped errors for a bad model
        raise ModelError(label, f"ONNX Runtime cannot load the model: {exc}") from exc
    actual = tuple(session.get_providers())
    check_gpu_used(placement, actual, available, settings)
    on_gpu = any(p in actual for p in GPU_PROVIDERS) and placement.device_id is not None
    device = f"cuda:{placement.device_id}" if on_gpu else DEVICE_CPU
    _check_session(manifest, session, label)
    level = logging.WARNING if device != placement.device else logging.INFO
    log.log(
        level,
        "ONNX session for %s: requested %s (%s), asked ORT for %s, using %s with providers %s (ORT build offers %s), "
        "%d intra-op thread(s)",
        label,
        placement.device,
        placement.note,
        _described(placement, settings),
        device,
        list(actual),
        sorted(available),
        placement.intra_op_threads,
    )
    buffers = None
    if on_gpu and input_buffer_bytes(manifest, settings):
        buffers = InputBuffers(manifest.inputs, settings.batch_size, input_slots(settings, on_gpu), "cuda", placement.device_id)
    created = ModelSession(session, manifest, placement.device, device, placement.device_id, actual, buffers)
    _smoke_run(created, label)
    return created


def gpu_options(placement: Placement, settings: EngineSettings, manifest: Manifest | None = None) -> dict[str, Any]:
    """Options of the CUDA provider: the task's device, a bounded arena (what ``manifest``'s input buffers
    leave of the limit), TF32 only when allowed."""
    options: dict[str, Any] = {"device_id": placement.device_id, "use_tf32": int(settings.allow_tf32)}
    limit = arena_limit_bytes(placement, settings, manifest)
    if limit is not None:
        options["gpu_mem_limit"] = limit
        options["arena_extend_strategy"] = "kSameAsRequested"
    return options


def tensorrt_options(placement: Placement, settings: EngineSettings, manifest: Manifest | None = None) -> dict[str, Any]:
    """Options of the TensorRT provider: the task's device, an engine cache, and a shape profile from 1 to
    ``batch_size`` rows for every input (:func:`tensorrt_profiles`), so that a task's last, shorter batch
    runs on the engine already built instead of building another."""
    options: dict[str, Any] = {
        "device_id": placement.device_id,
        "trt_engine_cache_enable": 1,
        "trt_engine_cache_path": settings.tensorrt_cache_dir or os.path.join(tempfile.gettempdir(), TENSORRT_CACHE_DIR),
    }
    if manifest is not None:
        options.update(tensorrt_profiles(manifest, settings.batch_size))
    return options


def tensorrt_profiles(manifest: Manifest, batch_size: int) -> dict[str, str]:
    """``trt_profile_{min,opt,max}_shapes`` for the manifest's inputs: batch axis 1 / ``batch_size`` / ``batch_size``.

    Empty (TensorRT then sizes engines by the shapes it meets) when an input has another dynamic axis or a name
    the option's ``name:AxBxC,...`` syntax cannot carry.
    """
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    batch_size = max(batch_size, 2)  # the test run on zeros that checks every new session has 2 rows
    for spec in manifest.inputs:
        rest = tuple(spec.shape[1:])
        if any(dim < 1 for dim in rest) or any(c in spec.name for c in ":,"):
            log.info("input %r of %s: no TensorRT shape profile (shape %s)", spec.name, manifest.name, list(spec.shape))
            return {}
        for kind, rows in (("min", 1), ("opt", batch_size), ("max", batch_size)):
            shapes[kind].append(f"{spec.name}:" + "x".join(str(d) for d in (rows, *rest)))
    return {f"trt_profile_{kind}_shapes": ",".join(parts) for kind, parts in shapes.items()}


def provider_options(placement: Placement, settings: EngineSettings, available: set[str], manifest: Manifest | None = None) -> list[Any]:
    """What ORT is given as ``providers``: the placement's providers this build has, GPU ones with their options."""
    providers: list[Any] = []
    for name in placement.providers:
        if name not in available:
            continue
        if name == CUDA_PROVIDER:
            providers.append((name, gpu_options(placement, settings, manifest)))
        elif name == TENSORRT_PROVIDER:
            options = tensorrt_options(placement, settings, manifest)
            os.makedirs(options["trt_engine_cache_path"], exist_ok=True)
            providers.append((name, options))
        else:
            providers.append(name)
    return providers


def check_gpu_used(placement: Placement, actual: tuple[str, ...], available: Iterable[str], settings: EngineSettings) -> None:
    """Raise :class:`CpuFallbackError` when the task was assigned a GPU (``placement.device_id``) but the session's
    providers ``actual`` hold no GPU provider, unless ``settings.allow_cpu_fallback``."""
    if placement.device_id is None or any(p in GPU_PROVIDERS for p in actual) or settings.allow_cpu_fallback:
        return
    cause, fix = fallback_cause(placement.providers, available)
    raise CpuFallbackError(placement.device, actual, tuple(sorted(available)), cause, fix)


def fallback_cause(requested: Iterable[str], available: Iterable[str]) -> tuple[str, str]:
    """Why a session asked for ``requested`` providers got no GPU one, and the fix, from what the ORT build offers."""
    wanted = [p for p in requested if p in GPU_PROVIDERS]
    escape = "or set inference.allow_cpu_fallback = true to score on the CPU while holding the GPU"
    if not set(wanted) & set(available):
        return (
            f"this ONNX Runtime build has none of {wanted} (the CPU build 'onnxruntime' is installed, alone or over "
            "'onnxruntime-gpu')",
            f"pip uninstall -y onnxruntime onnxruntime-gpu, then pip install '{GPU_EXTRA}'; {escape}",
        )
    return (
        f"this ONNX Runtime build has {wanted} but could not load it (CUDA 13 or cuDNN 9 libraries not found; "
        "ONNX Runtime's own error is logged above)",
        f"pip install '{GPU_EXTRA}' (it brings the CUDA and cuDNN wheels) or put the CUDA 13 and cuDNN 9 libraries on "
        f"LD_LIBRARY_PATH; {escape}",
    )


def check_gpu_build(settings: EngineSettings, task_gpus: float, available: Iterable[str] | None = None) -> None:
    """On the driver, once at ``serve`` start: refuse to reserve GPUs (``spark.task_gpus``) that scoring would not use.

    ``available`` defaults to this interpreter's ONNX Runtime build; the executors are expected to run the
    same installation. Loading CUDA is left to the executors (a driver may have no GPU), where
    :func:`check_gpu_used` checks each session.
    """
    if task_gpus <= 0 or settings.allow_cpu_fallback:
        return
    wanted = [p for p in settings.providers if p in GPU_PROVIDERS]
    escape = "or set inference.allow_cpu_fallback = true to score on the CPU anyway"
    if not wanted:
        raise ConfigError(
            "inference.providers",
            f"lists no GPU provider ({list(settings.providers)}) while spark.task_gpus = {task_gpus} reserves GPUs",
            f'put "{CUDA_PROVIDER}" first, set spark.task_gpus = 0, {escape}',
        )
    if available is None:
        ort = onnxruntime()
        available, build = ort.get_available_providers(), f"onnxruntime {ort.__version__}"
    else:
        build = "ONNX Runtime"
    if not set(wanted) & set(available):
        raise ConfigError(
            "spark.task_gpus",
            f"is {task_gpus}, but this {build} build has none of {wanted} (it offers {sorted(available)})",
            f"install '{GPU_EXTRA}' (onnxruntime-gpu with its CUDA and cuDNN wheels, never next to 'onnxruntime'), "
            f"{escape}",
        )


def arena_limit_bytes(placement: Placement, settings: EngineSettings, manifest: Manifest | None = None, total: int | None = None) -> int | None:
    """The CUDA arena limit: the session's device budget (``gpu_mem_limit_bytes``, else the task's share of the
    device's memory) less what its :class:`InputBuffers` take, so arena and buffers together stay within the
    budget. None when the device's memory is unknown and no limit is set; a :class:`ConfigError` when the
    buffers alone exceed it."""
    if settings.gpu_mem_limit_bytes is not None:
        budget, key = settings.gpu_mem_limit_bytes, "inference.gpu_mem_limit_mb"
    else:
        total = device_memory_bytes(placement.device_id) if total is None else total
        if total is None:
            log.warning("GPU %s: memory size unknown (NVML not available); the ORT arena is not bounded", placement.device_id)
            return None
        budget, key = int(total * min(settings.gpu_share, 1.0) * ARENA_FRACTION), "spark.task_gpus"
    buffers = input_buffer_bytes(manifest, settings) if manifest is not None else 0
    if buffers >= budget:
        raise ConfigError(
            key,
            f"gives each session {budget / 2**20:.0f} MiB of GPU memory, and the input buffers of {manifest.name} "
            f"({input_slots(settings, True)} x {settings.batch_size} rows) alone take {buffers / 2**20:.0f} MiB",
            f"raise {key} or lower inference.batch_size",
        )
    return budget - buffers


def _described(placement: Placement, settings: EngineSettings) -> str:
    if placement.device_id is None:
        return repr(list(placement.providers))
    return f"{list(placement.providers)} with device_id {placement.device_id}"


def _check_session(manifest: Manifest, session: Any, label: str) -> None:
    """Raise :class:`ModelError` unless every manifest input and output is in the graph, typed and shaped alike."""
    model_inputs = {i.name: i for i in session.get_inputs()}
    wanted = {spec.name for spec in manifest.inputs}
    if set(model_inputs) != wanted:
        raise ModelError(label, f"model inputs {sorted(model_inputs)} differ from manifest inputs {sorted(wanted)}")
    for spec in manifest.inputs:
        _check_tensor("input", spec, model_inputs[spec.name], label)
    model_outputs = {o.name: o for o in session.get_outputs()}
    for spec in manifest.outputs:
        if spec.name not in model_outputs:
            raise ModelError(label, f"manifest output '{spec.name}' is not a model output (model has {sorted(model_outputs)})")
        _check_tensor("output", spec, model_outputs[spec.name], label)


def _check_tensor(role: str, spec: TensorSpec, actual: Any, label: str) -> None:
    if _ORT_DTYPES.get(actual.type) != spec.dtype:
        raise ModelError(label, f"{role} '{spec.name}' is {actual.type} in the model but {spec.dtype} in the manifest")
    if not _shape_fits(actual.shape, spec.shape):
        raise ModelError(label, f"{role} '{spec.name}' has shape {actual.shape} in the model but {list(spec.shape)} in the manifest")


def _shape_fits(model_shape: list[Any], manifest_shape: tuple[int, ...]) -> bool:
    if len(model_shape) != len(manifest_shape):
        return False
    return all(not isinstance(m, int) or m == d for m, d in zip(model_shape[1:], manifest_shape[1:]))


def zero_rows(spec: TensorSpec, n: int) -> np.ndarray:
    """``n`` rows of an input filled with zeros ("" for strings, False for bools)."""
    if spec.dtype == "string":
        return np.full((n, *spec.shape[1:]), "", dtype=object)
    return np.zeros((n, *spec.shape[1:]), dtype=numpy_dtype(spec.dtype))


def _smoke_run(model: ModelSession, label: str) -> None:
    """Run two zero rows through the session and check every output's rows and width."""
    inputs = {spec.name: zero_rows(spec, 2) for spec in model.manifest.inputs}
    try:
        outputs = model.to_host(model.compute(model.to_device(inputs)))
    except Exception as exc:  # noqa: BLE001 -- ORT raises its own untyped errors for a bad model
        raise ModelError(label, f"a test run on zeros failed: {exc}") from exc
    for spec in model.manifest.outputs:
        got = outputs[spec.name]
        if got.ndim == 0 or got.shape[0] != 2 or got.size != 2 * spec.width:
            raise ModelError(
                label,
                f"output '{spec.name}' has shape {list(got.shape)} for 2 rows; the manifest says {spec.width} value(s) per row",
            )
