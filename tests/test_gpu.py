"""The engine on a real NVIDIA GPU. Skips cleanly without one; needs no pyspark (GPU hosts have none)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from _inference_models import Holder, feature_spec, json_values, kafka_batch, softmax_model

pytestmark = pytest.mark.gpu
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")


@pytest.fixture(scope="module")
def gpu_count() -> int:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a GPU host)")
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi: no NVIDIA GPU on this host")
    listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
    if listed.returncode != 0 or not listed.stdout.split():
        pytest.skip("nvidia-smi lists no GPU")
    return len(listed.stdout.split())


@pytest.fixture(autouse=True)
def pci_order(monkeypatch):
    """Spark executors get CUDA_DEVICE_ORDER=PCI_BUS_ID from streamhydro's GPU conf; this process needs it too."""
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def _score(providers, addresses, depth):
    from streamhydro.config import PayloadSettings
    from streamhydro.executor.engine import EngineSettings
    from streamhydro.executor.scoring import ScoringPlan, score_partition
    from streamhydro.executor.sessions import TaskResources

    data, manifest = softmax_model([feature_spec("x", 16)], seed=4)
    rows = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    batches = [kafka_batch(json_values(manifest, rows[i : i + 700]), first_offset=i) for i in range(0, 5000, 700)]
    settings = EngineSettings(providers=providers, batch_size=512, pipeline_depth=depth, gpu_mem_limit_bytes=1 << 30)
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", settings)
    stats = []
    out = list(score_partition(plan, iter(batches), stats.append, resources=TaskResources(addresses, 2)))
    docs = [json.loads(v) for b in out for v in b.column("value").to_pylist()]
    assert [d["source"]["offset"] for d in docs] == list(range(5000))
    return np.array([list(d["prediction"]["scores"].values()) for d in docs]), stats[0]


@pytest.mark.parametrize("depth", [0, 2])
def test_cuda_provider_is_used_on_the_requested_device_and_matches_cpu(gpu_count, depth):
    from streamhydro.executor import sessions

    device = str(gpu_count - 1)
    gpu_scores, gpu_stats = _score(CUDA, (device,), depth)
    cpu_scores, cpu_stats = _score(("CPUExecutionProvider",), (), depth)
    assert gpu_stats.providers[0] == "CUDAExecutionProvider"
    assert gpu_stats.requested_device == gpu_stats.device == f"cuda:{device}"
    assert cpu_stats.device == "cpu"
    cached = [s for s in sessions._sessions.values() if s.device == f"cuda:{device}"]
    assert cached and cached[0].session.get_provider_options()["CUDAExecutionProvider"]["device_id"] == device
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-4, atol=1e-6)


def test_no_assignment_stays_off_the_gpu(gpu_count):
    _, stats = _score(CUDA, (), 2)
    assert stats.device == "cpu" and "CUDAExecutionProvider" not in stats.providers
