"""benchmarks/gpu_check.sh, the GPU acceptance run, in its CPU mode (as CI runs it), and its verdicts when a GPU
is present but unused, faked on the CPU. Small row counts: about 15 s in all."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamhydro.devices import nvml_gpu_count

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--rows", "1000", "--cpu-heavy-rows", "32", "--hidden", "256", "--depth", "2", "--batch-size", "256"]


@pytest.fixture(scope="module")
def no_gpu() -> None:
    if nvml_gpu_count():
        pytest.skip("this host has a GPU: run bash benchmarks/gpu_check.sh itself, it is the GPU acceptance run")


@pytest.fixture
def gpu_check(monkeypatch):
    """benchmarks/gpu_check.py as a module, for faking what it finds."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return module


def test_cpu_mode_says_no_gpu_measures_the_cpu_and_passes(no_gpu):
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", *SMALL], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["gpu"] is False and report["ok"] is True and report["failures"] == []
    assert report["tolerance"] == {"rtol": 1e-4, "atol": 1e-5}
    assert report["gpu_tests"]["ran"] and report["gpu_tests"]["exit_code"] == 0 and "skipped" in report["gpu_tests"]["summary"]
    for name in ("demo", "compute_bound"):
        entry = report["models"][name]
        assert entry["gpu"] is None and entry["matches_cpu"] is None
        for variant in ("sequential", "pipelined"):
            run = entry["cpu"][variant]
            assert run["rows_per_s"] > 0 and run["device"] == "cpu"
            assert set(run["stage_seconds"]) == {"decode", "h2d", "compute", "d2h", "encode"}
    assert report["models"]["compute_bound"]["mflop_per_row"] == pytest.approx(2 * (30 * 256 + 2 * 256 * 256 + 256 * 2) / 1e6)


def test_a_gpu_that_onnx_runtime_cannot_use_fails_the_run(gpu_check, monkeypatch, capsys):
    """A GPU is present, but the installed ONNX Runtime is the CPU build."""
    monkeypatch.setattr(gpu_check, "gpu_count", lambda: 1)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *SMALL, "--no-gpu-tests"])
    assert gpu_check.main() == 1
    report = json.loads(capsys.readouterr().out)
    assert report["gpu"] is True and report["ok"] is False
    assert "has no CUDA provider" in report["failures"][0] and "streamhydro[gpu]" in report["failures"][0]


def test_a_cuda_provider_that_does_not_load_fails_the_run(gpu_check, monkeypatch, capsys):
    """A GPU is present and the build offers CUDA, but the provider does not load: sessions fall back to the CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(gpu_check, "gpu_count", lambda: 1)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *SMALL, "--no-gpu-tests"])
    assert gpu_check.main() == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["failures"][0].startswith("CpuFallbackError: task assigned cuda:0")
