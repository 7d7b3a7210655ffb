"""GPU metrics read from NVML (pynvml, from nvidia-ml-py) at scrape time. Runs in the process that
serves metrics for a machine: the driver in local mode, the per-node exporter in cluster mode.

On a host without an NVIDIA driver the collector exports nothing and says so in one log line; a
GPU that fails one query (a field it does not support, say) loses that sample only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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
    """Utilization, memory used/total, temperature and power per device. :meth:`close` shuts NVML down."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
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
        for index in range(self.count):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            labels = [str(index), _text(nvml.nvmlDeviceGetName(handle))]
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
                    log.debug("GPU %d: %s not available (%s)", index, spec[0], exc)
                    continue
                families[spec].add_metric(labels, float(value))
        yield from families.values()

    def close(self) -> None:
        if self._initialized:
            self._nvml.nvmlShutdown()
            self._initialized = False
            self.count = 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
