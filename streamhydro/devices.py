"""Spark GPU addresses -> CUDA device ordinals and NVML devices. Runs in executor Python workers (scoring
tasks), trainer ranks and the process that serves GPU metrics; no pyspark import.

Spark hands a task the addresses its discovery script printed. ``deploy/gpu/get_gpus_resources.sh``
prints nvidia-smi indices, which number GPUs in PCI bus order; when a cluster manager has set
``CUDA_VISIBLE_DEVICES`` (YARN, the Kubernetes device plugin) it prints the positions 0..n-1 in
that list instead, which are what the process sees. Other scripts may print GPU UUIDs
(``GPU-...``) or MIG instance UUIDs (``MIG-...``).

CUDA numbers devices fastest-first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; only with PCI order
is nvidia-smi index *i* CUDA ordinal *i*. :func:`cuda_ordinal` therefore refuses any other
order (the executors get ``PCI_BUS_ID`` from :func:`streamhydro.spark.gpu_conf`). NVML always
enumerates in PCI order and ignores ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from streamhydro.errors import StreamhydroError

ORDER_VAR = "CUDA_DEVICE_ORDER"
PCI_ORDER = "PCI_BUS_ID"
VISIBLE_VAR = "CUDA_VISIBLE_DEVICES"

# NVML's UUIDs of the host's GPUs, in NVML (PCI) index order. Injected so tests can fake NVML.
UuidLister = Callable[[], Sequence[str]]


class DeviceError(StreamhydroError):
    """A GPU address that cannot be turned into a CUDA device of this process."""

    def __init__(self, address: str, problem: str, fix: str) -> None:
        self.address = address
        self.problem = problem
        self.fix = fix
        super().__init__(f"GPU address {address!r}: {problem}. Fix: {fix}")


def visible_entries(environ: Mapping[str, str]) -> list[str] | None:
    """The entries of CUDA_VISIBLE_DEVICES, [] when it is set but empty (no GPU), None when unset (all GPUs)."""
    if VISIBLE_VAR not in environ:
        return None
    return [entry.strip() for entry in environ[VISIBLE_VAR].split(",") if entry.strip()]


def cuda_ordinal(address: str, environ: Mapping[str, str] | None = None, uuids: UuidLister | None = None) -> int:
    """The CUDA ordinal, in this process, of the GPU Spark gave the task as ``address``."""
    environ = os.environ if environ is None else environ
    order = environ.get(ORDER_VAR, "")
    if order != PCI_ORDER:
        raise DeviceError(
            address, f"{ORDER_VAR} is {order or 'unset'}, so CUDA ordinals need not match nvidia-smi's numbering",
            f"set {ORDER_VAR}={PCI_ORDER} in the executors' environment (spark.executorEnv.{ORDER_VAR}; streamhydro's "
            "GPU settings do) before CUDA starts",
        )
    visible = visible_entries(environ)
    if address.isdigit():
        ordinal = int(address)
        if visible is not None and ordinal >= len(visible):
            raise DeviceError(address, f"{VISIBLE_VAR}={environ[VISIBLE_VAR]!r} shows {len(visible)} GPU(s)",
                              "let the discovery script number the visible GPUs (deploy/gpu/get_gpus_resources.sh)")
        return ordinal
    if address.startswith("MIG-"):
        if visible is not None and address in visible:
            return visible.index(address)
        raise DeviceError(
            address, "a MIG instance is reachable only through CUDA_VISIBLE_DEVICES, and this process's does not list it",
            "give each executor its MIG instance through CUDA_VISIBLE_DEVICES (Kubernetes device plugin, MIG strategy "
            "single or mixed) and let the discovery script print 0..n-1",
        )
    if address.startswith("GPU-"):
        host = list((uuids or nvml_uuids)())
        if address not in host:
            raise DeviceError(address, f"no GPU of this host has that UUID (NVML lists {host})", "check the discovery script")
        if visible is None:
            return host.index(address)
        as_uuids = [host[int(entry)] if entry.isdigit() and int(entry) < len(host) else entry for entry in visible]
        if address not in as_uuids:
            raise DeviceError(address, f"{VISIBLE_VAR}={environ[VISIBLE_VAR]!r} hides it from this process",
                              "make the discovery script report only GPUs the executor can see")
        return as_uuids.index(address)
    raise DeviceError(address, "is neither an nvidia-smi index, a GPU UUID (GPU-...) nor a MIG UUID (MIG-...)",
                      "use deploy/gpu/get_gpus_resources.sh or a script that prints one of those")


def nvml_gpu_count() -> int:
    """GPUs NVML lists on this host; 0 where there is no NVIDIA driver."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def nvml_uuids() -> list[str]:
    """The host's GPU UUIDs in NVML (PCI) order."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return [_text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def device_memory_bytes(ordinal: int, environ: Mapping[str, str] | None = None, nvml: Any = None) -> int | None:
    """Total memory of CUDA device ``ordinal`` of this process, read through NVML; None without NVML.

    A MIG instance is measured on its own NVML handle (:func:`nvml_handle`), not on its parent GPU's.
    """
    if nvml is None:
        import pynvml as nvml

    environ = os.environ if environ is None else environ
    visible = visible_entries(environ)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return None
    try:
        entry: int | str = ordinal if visible is None else visible[ordinal]
        if isinstance(entry, str) and entry.isdigit():
            entry = int(entry)
        return int(nvml.nvmlDeviceGetMemoryInfo(nvml_handle(nvml, entry)).total)
    except (nvml.NVMLError, IndexError, LookupError):
        return None
    finally:
        nvml.nvmlShutdown()


def nvml_handle(nvml: Any, device: int | str) -> Any:
    """The NVML handle of ``device``: an NVML index, a GPU UUID, or a MIG instance UUID (``MIG-...``).

    A MIG instance's handle comes from its parent's MIG device list, matched by UUID: that handle reports the
    slice's memory, where a lookup by UUID may answer with the parent GPU. Raises LookupError for a MIG UUID
    no GPU of this host holds.
    """
    if isinstance(device, int):
        return nvml.nvmlDeviceGetHandleByIndex(device)
    if not device.startswith("MIG-"):
        return nvml.nvmlDeviceGetHandleByUUID(device)
    for index in range(nvml.nvmlDeviceGetCount()):
        parent = nvml.nvmlDeviceGetHandleByIndex(index)
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(parent)
        except nvml.NVMLError:
            continue
        for slot in range(slots):
            try:
                instance = nvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, slot)
            except nvml.NVMLError:
                continue
            if _text(nvml.nvmlDeviceGetUUID(instance)) == device:
                return instance
    raise LookupError(f"no GPU of this host has MIG instance {device}")


def spark_addresses(count: int, environ: Mapping[str, str] | None = None) -> list[tuple[str, int | str]]:
    """(address Spark uses, NVML index or UUID) for each GPU this host's executors see, as the discovery script numbers them.

    ``count`` is NVML's device count. Unset CUDA_VISIBLE_DEVICES: every GPU, address = NVML index.
    Set: the listed GPUs in list order, address = position; set but empty: none.
    """
    environ = os.environ if environ is None else environ
    visible = visible_entries(environ)
    if visible is None:
        return [(str(i), i) for i in range(count)]
    return [(str(position), int(entry) if entry.isdigit() else entry) for position, entry in enumerate(visible)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
