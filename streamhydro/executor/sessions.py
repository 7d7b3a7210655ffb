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
  both the requested and the actual device.

Cache caveats: sessions live in module state of the Python worker. With
``spark.python.worker.reuse=true`` (streamhydro's default) a worker serves many tasks, so later
tasks on the same model and device reuse the session; tasks that share a GPU through fractional
amounts run in different workers and each holds its own session and CUDA arena. A worker keeps
sessions on one GPU at a time: a task on another GPU evicts the sessions (and so the arenas) on
the old one; the CUDA context ORT opened there stays until the worker exits. Each CUDA arena is
bounded: by ``gpu_mem_limit_bytes``, or else by the task's share of the GPU's memory
(``gpu_share`` x total x :data:`ARENA_FRACTION`). At most ``MAX_SESSIONS`` sessions are kept;
creating a session for a new version of a model evicts that model's older versions on the same
device. Each session holds the model's weights (and, on CUDA, its arena) until evicted or the
worker exits.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import os
import threading
from typing import Any

import numpy as np

from streamhydro.devices import cuda_ordinal, device_memory_bytes
from streamhydro.config import PayloadSettings
from streamhydro.errors import ModelError, StreamhydroError
from streamhydro.executor.engine import EngineSettings
from streamhydro.payload.fields import numpy_dtype
from streamhydro.payload.formats import make_decoder
from streamhydro.registry import Manifest

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

_ORT_DTYPES = {
    "tensor(float)": np.dtype("float32"),
    "tensor(double)": np.dtype("float64"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(bool)": np.dtype(bool),
    "tensor(string)": np.dtype(object),
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
    return ort


@functools.cache
def _warn_if_both_builds() -> None:
    """Once per process: a warning when both ONNX Runtime distributions are installed."""
    from importlib import metadata

    installed = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
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


@dataclasses.dataclass
class ModelSession:
    """An ORT session bound to one device, with the three device-facing stages of the engine.

    On CUDA, inputs are copied host->device explicitly (:meth:`to_device`), the run is bound with
    IOBinding so its output stays on the device (:meth:`compute`), and :meth:`to_host` copies it back.
    On CPU the copies are no-ops and :meth:`compute` is a plain ``run``.
    """

    session: Any
    manifest: Manifest
    requested_device: str
    device: str
    device_id: int | None
    providers: tuple[str, ...]
    output_name: str

    @property
    def on_gpu(self) -> bool:
        return self.device != DEVICE_CPU

    def to_device(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        if not self.on_gpu:
            return inputs
        ort = onnxruntime()
        # String tensors have no CUDA form: they stay in host memory, bound as they are.
        return {
            name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *(("cpu", 0) if array.dtype == object else ("cuda", self.device_id)))
            for name, array in inputs.items()
        }

    def compute(self, staged: dict[str, Any]) -> Any:
        if not self.on_gpu:
            return self.session.run([self.output_name], staged)[0]
        binding = self.session.io_binding()
        for name, value in staged.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output_name, "cuda", self.device_id)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()[0]

    def to_host(self, output: Any) -> np.ndarray:
        return output if not self.on_gpu else output.numpy()


_lock = threading.Lock()
_sessions: collections.OrderedDict[tuple[Any, ...], ModelSession] = collections.OrderedDict()


def get_session(manifest: Manifest, model_bytes: Any, payload: PayloadSettings, placement: Placement, settings: EngineSettings) -> ModelSession:
    """The worker's session for (model sha256, device), created and validated on first use.

    ``model_bytes`` is any holder whose ``.value`` is the ONNX bytes (a Broadcast); it is only
    read when the session has to be created.
    """
    key = (manifest.sha256, placement.device, placement.providers, placement.intra_op_threads, settings.gpu_mem_limit_bytes,
           settings.gpu_share)
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


def validate_model(manifest: Manifest, model_bytes: bytes, payload: PayloadSettings) -> None:
    """Load the model on CPU and check it against its manifest and the payload settings.

    Runs on the driver before a model version is served, and (through :func:`get_session`) in
    every executor session. Raises :class:`ModelError` naming what does not fit.
    """
    placement = Placement(DEVICE_CPU, None, (CPU_PROVIDER,), 1, "validation")
    _create(manifest, model_bytes, payload, placement, EngineSettings())


def _create(manifest: Manifest, model_bytes: bytes, payload: PayloadSettings, placement: Placement, settings: EngineSettings) -> ModelSession:
    ort = onnxruntime()
    label = f"{manifest.name}:{manifest.version}"
    digest = hashlib.sha256(model_bytes).hexdigest()
    if digest != manifest.sha256:
        raise ModelError(label, f"model bytes have sha256 {digest}, manifest says {manifest.sha256}; republish the model")
    make_decoder(manifest, payload)
    options = ort.SessionOptions()
    options.intra_op_num_threads = placement.intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    available = set(ort.get_available_providers())
    providers = provider_options(placement, settings, available)
    try:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers or [CPU_PROVIDER])
    except Exception as exc:  # noqa: BLE001 -- ORT raises its own untyped errors for a bad model
        raise ModelError(label, f"ONNX Runtime cannot load the model: {exc}") from exc
    actual = tuple(session.get_providers())
    on_gpu = any(p in actual for p in GPU_PROVIDERS) and placement.device_id is not None
    device = f"cuda:{placement.device_id}" if on_gpu else DEVICE_CPU
    output_name = _check_session(manifest, session, label)
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
    created = ModelSession(session, manifest, placement.device, device, placement.device_id, actual, output_name)
    _smoke_run(created, label)
    return created


def gpu_options(placement: Placement, settings: EngineSettings) -> dict[str, Any]:
    """Provider options of a GPU provider: the task's device and a bounded arena."""
    options: dict[str, Any] = {"device_id": placement.device_id}
    limit = arena_limit_bytes(placement, settings)
    if limit is not None:
        options["gpu_mem_limit"] = limit
        options["arena_extend_strategy"] = "kSameAsRequested"
    return options


def provider_options(placement: Placement, settings: EngineSettings, available: set[str]) -> list[Any]:
    """What ORT is given as ``providers``: the placement's providers this build has, GPU ones with their options."""
    providers: list[Any] = []
    for name in placement.providers:
        if name not in available:
            continue
        if name == CUDA_PROVIDER:
            providers.append((name, gpu_options(placement, settings)))
        elif name == TENSORRT_PROVIDER:
            providers.append((name, {"device_id": placement.device_id}))
        else:
            providers.append(name)
    return providers


def arena_limit_bytes(placement: Placement, settings: EngineSettings, total: int | None = None) -> int | None:
    """The CUDA arena limit: the configured one, else the task's share of the device's memory (None when unknown)."""
    if settings.gpu_mem_limit_bytes is not None:
        return settings.gpu_mem_limit_bytes
    total = device_memory_bytes(placement.device_id) if total is None else total
    if total is None:
        log.warning("GPU %s: memory size unknown (NVML not available); the ORT arena is not bounded", placement.device_id)
        return None
    return int(total * min(settings.gpu_share, 1.0) * ARENA_FRACTION)


def _described(placement: Placement, settings: EngineSettings) -> str:
    if placement.device_id is None:
        return repr(list(placement.providers))
    return f"{list(placement.providers)} with device_id {placement.device_id}"


def _check_session(manifest: Manifest, session: Any, label: str) -> str:
    model_inputs = {i.name: i for i in session.get_inputs()}
    wanted = {spec.name for spec in manifest.inputs}
    if set(model_inputs) != wanted:
        raise ModelError(label, f"model inputs {sorted(model_inputs)} differ from manifest inputs {sorted(wanted)}")
    for spec in manifest.inputs:
        actual = model_inputs[spec.name]
        dtype = _ORT_DTYPES.get(actual.type)
        if dtype is None or dtype != numpy_dtype(spec.dtype):
            raise ModelError(label, f"input '{spec.name}' is {actual.type} in the model but {spec.dtype} in the manifest")
        if not _shape_fits(actual.shape, spec.shape):
            raise ModelError(label, f"input '{spec.name}' has shape {actual.shape} in the model but {list(spec.shape)} in the manifest")
    scores = manifest.scores_output
    outputs = {o.name: o for o in session.get_outputs()}
    if scores.name not in outputs:
        raise ModelError(label, f"manifest output '{scores.name}' is not a model output (model has {sorted(outputs)})")
    if scores.width != len(manifest.labels):
        raise ModelError(label, f"output '{scores.name}' has width {scores.width} but the manifest lists {len(manifest.labels)} labels")
    if not _shape_fits(outputs[scores.name].shape, scores.shape):
        raise ModelError(label, f"output '{scores.name}' has shape {outputs[scores.name].shape} in the model but {list(scores.shape)} in the manifest")
    return scores.name


def _shape_fits(model_shape: list[Any], manifest_shape: tuple[int, ...]) -> bool:
    if len(model_shape) != len(manifest_shape):
        return False
    return all(not isinstance(m, int) or m == d for m, d in zip(model_shape[1:], manifest_shape[1:]))


def _smoke_run(model: ModelSession, label: str) -> None:
    """Run two zero rows through the session and check the scores' shape."""
    inputs = {spec.name: np.zeros((2, *spec.shape[1:]), dtype=numpy_dtype(spec.dtype)) for spec in model.manifest.inputs}
    inputs.update({name: np.full(array.shape, "", dtype=object) for name, array in inputs.items() if array.dtype == object})
    try:
        scores = model.to_host(model.compute(model.to_device(inputs)))
    except Exception as exc:  # noqa: BLE001 -- ORT raises its own untyped errors for a bad model
        raise ModelError(label, f"a test run on zeros failed: {exc}") from exc
    if scores.reshape(2, -1).shape[1] != len(model.manifest.labels):
        raise ModelError(label, f"scores have shape {list(scores.shape)} for 2 rows; expected {len(model.manifest.labels)} per row")
