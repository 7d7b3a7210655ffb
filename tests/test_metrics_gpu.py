"""GPU metrics: absent without error (and said once) on hosts without NVIDIA; real readings on a GPU host."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from streamhydro.metrics.definitions import GPU_FAMILIES
from streamhydro.metrics.gpu import GpuCollector


def nvml_available() -> bool:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_no_nvidia_host_exports_nothing_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    if nvml_available():
        pytest.skip("this host has an NVIDIA driver; test_gpu_readings covers it")
    caplog.set_level(logging.INFO, logger="streamhydro.metrics.gpu")
    registry = CollectorRegistry()
    collector = GpuCollector()
    registry.register(collector)
    for _ in range(3):
        assert [f for f in registry.collect() if f.name.startswith("streamhydro_gpu_")] == []
    collector.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "streamhydro.metrics.gpu"]
    assert len(lines) == 1 and "no GPU metrics" in lines[0]


@pytest.mark.gpu
def test_gpu_readings() -> None:
    if not nvml_available():
        pytest.skip("no NVIDIA driver on this host")
    registry = CollectorRegistry()
    collector = GpuCollector()
    registry.register(collector)
    try:
        assert collector.count >= 1
        families = {f.name: f for f in registry.collect()}
    finally:
        collector.close()
    assert {name for name, _ in GPU_FAMILIES} <= set(families)
    used = {s.labels["gpu"]: s.value for s in families["streamhydro_gpu_memory_used_bytes"].samples}
    total = {s.labels["gpu"]: s.value for s in families["streamhydro_gpu_memory_total_bytes"].samples}
    assert set(used) == {str(i) for i in range(collector.count)}
    assert all(0 < used[g] <= total[g] for g in used)
    assert all(0 <= s.value <= 1 for s in families["streamhydro_gpu_utilization_ratio"].samples)


class FakeNvml:
    """Just enough of pynvml for the collector: GPUs by index and UUID, and one that fails every call."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, uuids: list[str], broken: set[str]) -> None:
        self.uuids = uuids
        self.broken = broken

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index >= len(self.uuids):
            raise self.NVMLError("invalid argument")
        return self.uuids[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return self.uuids[self.uuids.index(uuid)]

    def _check(self, handle: str) -> None:
        if handle in self.broken:
            raise self.NVMLError("GPU is lost")

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        self._check(handle)
        return b"Fake H200"

    def nvmlDeviceGetUtilizationRates(self, handle: str):
        self._check(handle)
        return type("Rates", (), {"gpu": 50})()

    def nvmlDeviceGetMemoryInfo(self, handle: str):
        self._check(handle)
        return type("Memory", (), {"used": 1 << 30, "total": 8 << 30})()

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        self._check(handle)
        return 40

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self._check(handle)
        return 100_000


def _memory_by_gpu(collector: GpuCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    families = {f.name: f for f in registry.collect()}
    return {s.labels["gpu"]: s.value for s in families["streamhydro_gpu_memory_total_bytes"].samples}


def test_one_failing_gpu_does_not_fail_the_scrape() -> None:
    nvml = FakeNvml(["GPU-a", "GPU-b", "GPU-c"], broken={"GPU-b"})
    assert _memory_by_gpu(GpuCollector(nvml=nvml, environ={})) == {"0": 8 << 30, "2": 8 << 30}


def test_gpu_label_is_the_spark_address() -> None:
    """With CUDA_VISIBLE_DEVICES=2,0 the discovery script calls NVML's GPU 2 "0" and GPU 0 "1"; so must the metrics."""
    nvml = FakeNvml(["GPU-a", "GPU-b", "GPU-c"], broken={"GPU-a"})
    assert _memory_by_gpu(GpuCollector(nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "2,0"})) == {"0": 8 << 30}
    by_uuid = GpuCollector(nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "GPU-c,GPU-b"})
    assert _memory_by_gpu(by_uuid) == {"0": 8 << 30, "1": 8 << 30}
    assert _memory_by_gpu(GpuCollector(nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": ""})) == {}
