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
