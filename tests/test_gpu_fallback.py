"""No silent CPU fallback, and the tolerance GPU scores are held to, shown on the CPU build of ONNX Runtime.

A task is "assigned a GPU" by handing the engine the resources Spark would (``TaskResources(("0",))``);
ONNX Runtime's CPU build then cannot give the session the CUDA provider, exactly as onnxruntime-gpu
cannot when its CUDA libraries fail to load. No pyspark, no GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from _inference_models import Holder, feature_spec, json_values, kafka_batch, softmax_model
from streamhydro.config import PayloadSettings
from streamhydro import config
from streamhydro.errors import ConfigError, CpuFallbackError
from streamhydro.executor import sessions
from streamhydro.executor.engine import EngineSettings
from streamhydro.executor.scoring import ScoringPlan, score_partition
from streamhydro.executor.sessions import TaskResources
from streamhydro.metrics.definitions import ExecutorMetricSet
from streamhydro.metrics.executor import record
from streamhydro.precision import FLOAT32, TF32, score_tolerance

ort = pytest.importorskip("onnxruntime")
CUDA_FIRST = EngineSettings(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), batch_size=100, pipeline_depth=2)


@pytest.fixture(autouse=True)
def fresh_sessions(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setattr(sessions, "device_memory_bytes", lambda ordinal: 8 << 30)
    sessions.clear_sessions()
    yield
    sessions.clear_sessions()


@pytest.fixture
def cpu_build(monkeypatch):
    """The CPU build, whatever is installed: no GPU provider offered."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


@pytest.fixture
def cuda_that_fails_to_load(monkeypatch):
    """A build that offers CUDA, whose provider then does not load: the real CPU build handed the CUDA provider
    (it warns and falls back to the CPU, as onnxruntime-gpu does without its CUDA libraries)."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a working CUDA provider: it would load")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _gpu_task(settings: EngineSettings) -> sessions.Placement:
    return sessions.place(settings, TaskResources(gpu_addresses=("0",), cpus=1))


def test_a_gpu_task_without_a_gpu_provider_in_the_build_fails_naming_cause_and_fix(cpu_build):
    data, manifest = softmax_model([feature_spec("x", 4)])
    with pytest.raises(CpuFallbackError) as caught:
        sessions.get_session(manifest, Holder(data), PayloadSettings(), _gpu_task(CUDA_FIRST), CUDA_FIRST)
    error = caught.value
    assert error.requested_device == "cuda:0" and error.providers == ("CPUExecutionProvider",)
    assert "has none of ['CUDAExecutionProvider']" in error.cause
    assert "streamhydro[gpu]" in error.fix and "inference.allow_cpu_fallback = true" in error.fix
    assert "\n" not in str(error) and str(error).startswith("task assigned cuda:0")
    assert not sessions._sessions


def test_a_cuda_provider_that_fails_to_load_fails_the_task(cuda_that_fails_to_load):
    data, manifest = softmax_model([feature_spec("x", 4)])
    with pytest.raises(CpuFallbackError) as caught:
        sessions.get_session(manifest, Holder(data), PayloadSettings(), _gpu_task(CUDA_FIRST), CUDA_FIRST)
    assert "could not load it" in caught.value.cause and "LD_LIBRARY_PATH" in caught.value.fix


def test_no_gpu_assigned_is_not_a_fallback(cuda_that_fails_to_load):
    data, manifest = softmax_model([feature_spec("x", 4)])
    cpu = sessions.place(CUDA_FIRST, TaskResources(cpus=1))
    assert sessions.get_session(manifest, Holder(data), PayloadSettings(), cpu, CUDA_FIRST).device == "cpu"


def _score(settings: EngineSettings, rows: np.ndarray, manifest, data):
    batches = [kafka_batch(json_values(manifest, rows[i : i + 70]), first_offset=i) for i in range(0, len(rows), 70)]
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", settings)
    stats = []
    out = list(score_partition(plan, iter(batches), stats.append, resources=TaskResources(("0",), 1)))
    docs = [json.loads(v) for b in out for v in b.column("value").to_pylist()]
    return np.array([list(d["prediction"]["scores"].values()) for d in docs]), stats[0]


def test_allowed_fallback_warns_and_counts_every_batch(cuda_that_fails_to_load, caplog):
    data, manifest = softmax_model([feature_spec("x", 4)])
    rows = np.random.default_rng(0).normal(size=(350, 4)).astype(np.float32)
    allowed = dataclasses.replace(CUDA_FIRST, allow_cpu_fallback=True)
    with caplog.at_level(logging.WARNING):
        scores, stats = _score(allowed, rows, manifest, data)
    assert scores.shape == (350, 3)
    assert (stats.requested_device, stats.device) == ("cuda:0", "cpu") and len(stats.batch_sizes) == 4
    per_batch = [r for r in caplog.records if "inference.allow_cpu_fallback = true" in r.getMessage()]
    assert len(per_batch) == 4 and "not on the task's cuda:0" in per_batch[0].getMessage()
    registry = CollectorRegistry()
    record(ExecutorMetricSet(registry), stats)
    labels = {"requested": "cuda:0", "device": "cpu"}
    assert registry.get_sample_value("streamhydro_inference_cpu_fallback_batches_total", labels) == 4


def test_serve_refuses_gpus_this_build_cannot_use():
    cpu_only = ["CPUExecutionProvider"]
    sessions.check_gpu_build(CUDA_FIRST, 0.0, cpu_only)
    sessions.check_gpu_build(CUDA_FIRST, 0.5, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    sessions.check_gpu_build(dataclasses.replace(CUDA_FIRST, allow_cpu_fallback=True), 0.5, cpu_only)
    with pytest.raises(ConfigError) as caught:
        sessions.check_gpu_build(CUDA_FIRST, 0.5, cpu_only)
    assert caught.value.key == "spark.task_gpus"
    assert "streamhydro[gpu]" in caught.value.fix and "inference.allow_cpu_fallback = true" in caught.value.fix
    with pytest.raises(ConfigError) as caught:
        sessions.check_gpu_build(EngineSettings(providers=("CPUExecutionProvider",)), 1, cpu_only)
    assert caught.value.key == "inference.providers"


def test_serve_check_reads_the_installed_build(cpu_build):
    with pytest.raises(ConfigError, match="onnxruntime "):
        sessions.check_gpu_build(CUDA_FIRST, 1)


def test_settings_reach_the_engine():
    from streamhydro.driver.models import engine_settings

    defaults = engine_settings(config.Config())
    assert (defaults.allow_tf32, defaults.allow_cpu_fallback, defaults.tensorrt_cache_dir) == (False, False, "")
    raw = {"inference": {"allow_tf32": True, "tensorrt_cache_dir": "/var/cache/trt"}}
    environ = {"STREAMHYDRO_INFERENCE_ALLOW_CPU_FALLBACK": "true"}
    engine = engine_settings(config.from_mapping(raw, environ))
    assert (engine.allow_tf32, engine.allow_cpu_fallback, engine.tensorrt_cache_dir) == (True, True, "/var/cache/trt")


def _tf32(array: np.ndarray) -> np.ndarray:
    """float32 rounded to TF32's 10 mantissa bits (round to nearest), as the CUDA provider's matrix products see it."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def test_tf32_differences_need_the_tf32_tolerance_and_float32_ones_do_not():
    """The GPU test's model, emulated: TF32 products miss the float32 tolerance, float32 products keep it."""
    import onnx
    from onnx import numpy_helper

    data, manifest = softmax_model([feature_spec("x", 16)], seed=4)
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(data).graph.initializer}
    rows = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    cpu = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": rows})[0]

    def softmax(logits):
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    exact = softmax(rows.astype(np.float64) @ weights["W"].astype(np.float64) + weights["b"])
    tf32 = softmax(_tf32(rows).astype(np.float64) @ _tf32(weights["W"]).astype(np.float64) + weights["b"])
    assert score_tolerance(False) is FLOAT32 and score_tolerance(True) is TF32
    assert FLOAT32.close(exact, cpu).all()
    assert not FLOAT32.close(tf32, cpu).all()
    assert TF32.close(tf32, cpu).all() and TF32.excess(tf32, cpu) <= 0 < FLOAT32.excess(tf32, cpu)


def test_a_session_made_under_other_gpu_settings_is_not_reused(cuda_that_fails_to_load):
    data, manifest = softmax_model([feature_spec("x", 4)])
    allowed = dataclasses.replace(CUDA_FIRST, allow_cpu_fallback=True)
    first = sessions.get_session(manifest, Holder(data), PayloadSettings(), _gpu_task(allowed), allowed)
    tf32 = dataclasses.replace(allowed, allow_tf32=True)
    assert sessions.get_session(manifest, Holder(data), PayloadSettings(), _gpu_task(tf32), tf32) is not first
    with pytest.raises(CpuFallbackError):
        sessions.get_session(manifest, Holder(data), PayloadSettings(), _gpu_task(CUDA_FIRST), CUDA_FIRST)
