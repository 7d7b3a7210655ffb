"""The engine on a real NVIDIA GPU. No pyspark (GPU hosts have none).

Skips cleanly on a host without an NVIDIA GPU, and on one without onnxruntime-gpu. Fails, rather than skips,
where a GPU is present and onnxruntime-gpu is installed but the imported ``onnxruntime`` has no CUDA provider:
the CPU build shadows the GPU build, and serving there would silently score on the CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from _inference_models import Holder, feature_spec, json_values, kafka_batch, softmax_model
from streamhydro.devices import nvml_gpu_count

pytestmark = pytest.mark.gpu
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")



def verdict(gpus: int, installed: list[str], providers: list[str] | None) -> tuple[str, str]:
    """("skip" | "fail" | "run", why) for a host with ``gpus`` GPUs, these ONNX Runtime distributions installed, and
    the imported onnxruntime offering ``providers`` (None: onnxruntime does not import)."""
    if not gpus:
        return "skip", "no NVIDIA GPU on this host"
    if providers is None or not any(build.startswith("onnxruntime-gpu ") for build in installed):
        return "skip", f"onnxruntime-gpu is not installed (found {installed or 'no ONNX Runtime'}): pip install 'streamhydro[gpu]'"
    if "CUDAExecutionProvider" not in providers:
        return "fail", (
            f"{gpus} GPU(s) and onnxruntime-gpu are here, but the imported onnxruntime offers {providers}: the CPU build "
            f"shadows the GPU build (installed: {installed}). Fix: pip uninstall -y onnxruntime onnxruntime-gpu, then "
            "pip install 'streamhydro[gpu]'"
        )
    return "run", ""


@pytest.fixture(scope="module")
def gpu_count() -> int:
    from streamhydro.executor.sessions import installed_builds

    count = nvml_gpu_count()
    try:
        import onnxruntime as ort
    except ImportError:
        providers = None
    else:
        providers = ort.get_available_providers()
    action, why = verdict(count, installed_builds(), providers)
    if action == "skip":
        pytest.skip(why)
    if action == "fail":
        pytest.fail(why)
    return count


@pytest.fixture(autouse=True)
def pci_order(monkeypatch):
    """Spark executors get CUDA_DEVICE_ORDER=PCI_BUS_ID from streamhydro's GPU conf; this process needs it too."""
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def _score(providers, addresses, depth, allow_tf32=False):
    from streamhydro.config import PayloadSettings
    from streamhydro.executor.engine import EngineSettings
    from streamhydro.executor.scoring import ScoringPlan, score_partition
    from streamhydro.executor.sessions import TaskResources

    data, manifest = softmax_model([feature_spec("x", 16)], seed=4)
    rows = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    batches = [kafka_batch(json_values(manifest, rows[i : i + 700]), first_offset=i) for i in range(0, 5000, 700)]
    settings = EngineSettings(providers=providers, batch_size=512, pipeline_depth=depth, gpu_mem_limit_bytes=1 << 30,
                              allow_tf32=allow_tf32)
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", settings)
    stats = []
    out = list(score_partition(plan, iter(batches), stats.append, resources=TaskResources(addresses, 2)))
    docs = [json.loads(v) for b in out for v in b.column("value").to_pylist()]
    assert [d["source"]["offset"] for d in docs] == list(range(5000))
    return np.array([list(d["prediction"]["scores"].values()) for d in docs]), stats[0]


@pytest.mark.parametrize(("depth", "allow_tf32"), [(0, False), (2, False), (2, True)])
def test_cuda_provider_is_used_on_the_requested_device_and_matches_cpu(gpu_count, depth, allow_tf32):
    from streamhydro.executor import sessions
    from streamhydro.precision import score_tolerance

    device = str(gpu_count - 1)
    gpu_scores, gpu_stats = _score(CUDA, (device,), depth, allow_tf32)
    cpu_scores, cpu_stats = _score(("CPUExecutionProvider",), (), depth)
    assert gpu_stats.providers[0] == "CUDAExecutionProvider"
    assert gpu_stats.requested_device == gpu_stats.device == f"cuda:{device}"
    assert cpu_stats.device == "cpu"
    cached = [s for s in sessions._sessions.values() if s.device == f"cuda:{device}"]
    options = cached[-1].session.get_provider_options()["CUDAExecutionProvider"]
    assert options["device_id"] == device and options["use_tf32"] == str(int(allow_tf32))
    tolerance = score_tolerance(allow_tf32)
    worst = float(np.abs(gpu_scores - cpu_scores).max())
    assert tolerance.excess(gpu_scores, cpu_scores) <= 0, f"max |GPU - CPU| = {worst:.3g} beyond {tolerance}"


def test_no_assignment_stays_off_the_gpu(gpu_count):
    _, stats = _score(CUDA, (), 2)
    assert stats.device == "cpu" and "CUDAExecutionProvider" not in stats.providers


def test_a_session_that_lost_the_gpu_fails_the_task(gpu_count, monkeypatch):
    """A GPU task whose session ends up on the CPU (here: only the CPU provider offered) fails by default."""
    import onnxruntime as ort

    from streamhydro.errors import CpuFallbackError
    from streamhydro.executor import sessions

    sessions.clear_sessions()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(CpuFallbackError):
        _score(CUDA, ("0",), 0)
