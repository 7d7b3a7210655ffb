"""GPU metrics read from NVML (pynvml, from nvidia-ml-py) at scrape time. Runs in the process that
serves metrics for a machine: the driver in local mode, the per-node exporter in cluster mode.

On a host without an NVIDIA driver the collector exports nothing and says so in one log line. A GPU
that fails an NVML call loses only what failed: its other readings, and every other GPU, are still
exported (a GPU fallen off the bus fails every call and is logged once per scrape). The ``gpu``
label is the address Spark knows the GPU by, numbered as the discovery script numbers it
(:func:`streamhydro.devices.spark_addresses`: the nvidia-smi index, or the position in
``CUDA_VISIBLE_DEVICES`` when that is set), so it matches ``TaskContext.resources()["gpu"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from streamhydro.devices import nvml_handle, spark_addresses
from streamhydro.metrics.definitions import (
    GPU_LABELS,
    GPU_MEMORY_TOTAL,
    GPU_MEMORY_USED,
    GPU_POWER,
    GPU_TEMPERATURE,
    GPU_UTILIZATION,
)

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    """Utilization, memory used/total, temperature and power per device. :meth:`close` shuts NVML down.

    ``nvml`` is the pynvml module (a fake in tests); ``environ`` decides the Spark addresses.
    """

    def __init__(self, nvml: Any = None, environ: Mapping[str, str] | None = None) -> None:
        if nvml is None:
            import pynvml as nvml
        self._nvml = nvml
        self._environ = environ
        try:
            nvml.nvmlInit()
            self.count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            log.info("no GPU metrics on this host: NVML is not available (%s)", exc)
            self.count = 0
            self._initialized = False
        else:
            self._initialized = True
            log.info("GPU metrics for %d device(s) from NVML", self.count)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.count:
            return
        nvml = self._nvml
        families = {spec: GaugeMetricFamily(spec[0], spec[1], labels=GPU_LABELS) for spec in
                    (GPU_UTILIZATION, GPU_MEMORY_USED, GPU_MEMORY_TOTAL, GPU_TEMPERATURE, GPU_POWER)}
        for address, device in spark_addresses(self.count, self._environ):
            try:
                handle = nvml_handle(nvml, device)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except (nvml.NVMLError, LookupError) as exc:
                log.warning("GPU %s (NVML %s): no readings this scrape (%s)", address, device, exc)
                continue
            readings = {
                GPU_UTILIZATION: lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
                GPU_MEMORY_USED: lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used,
                GPU_MEMORY_TOTAL: lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total,
                GPU_TEMPERATURE: lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
                GPU_POWER: lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            }
            for spec, read in readings.items():
                try:
                    value = read()
                except nvml.NVMLError as exc:
                    log.debug("GPU %s: %s not available (%s)", address, spec[0], exc)
                    continue
                families[spec].add_metric([address, name], float(value))
        yield from families.values()

    def close(self) -> None:
        if self._initialized:
            self._nvml.nvmlShutdown()
            self._initialized = False
            self.count = 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
