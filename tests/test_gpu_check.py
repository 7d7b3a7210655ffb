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
SMALL = ["--rows", "1000", "--cpu-heavy-rows", "32", "--hidden", "256", "--layers", "1,2", "--batch-size", "256"]


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
    assert list(report["models"]) == ["demo", "compute_bound_1_layers", "compute_bound_2_layers"]
    for entry in report["models"].values():
        assert entry["gpu"] is None and entry["matches_cpu"] is None
        for variant in ("sequential", "pipelined"):
            run = entry["cpu"][variant]
            assert run["rows_per_s"] > 0 and run["device"] == "cpu"
            assert set(run["stage_seconds"]) == {"decode", "h2d", "compute", "d2h", "encode"}
        assert 1 <= entry["cpu"]["overlap_ideal"] <= 2
    for layers in (1, 2):
        mflop = report["models"][f"compute_bound_{layers}_layers"]["mflop_per_row"]
        assert mflop == pytest.approx(2 * (30 * 256 + layers * 256 * 256 + 256 * 2) / 1e6)


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


def test_timed_runs_do_not_create_sessions(gpu_check, monkeypatch):
    """Each variant's timed run finds its session warm: timing a session's creation would skew the ratio."""
    from streamhydro.executor import sessions

    created: list[str] = []
    create = sessions._create
    monkeypatch.setattr(sessions, "_create", lambda manifest, *args: (created.append(manifest.name), create(manifest, *args))[1])
    runs: list[tuple[int, int]] = []
    engine_run = gpu_check.engine_run

    def counted(*args, **kwargs):
        before = len(created)
        result = engine_run(*args, **kwargs)
        runs.append((args[5], len(created) - before))
        return result

    monkeypatch.setattr(gpu_check, "engine_run", counted)
    data, manifest, _ = gpu_check.compute_bound_mlp(64, 2)
    result, scores = gpu_check.measure(data, manifest, gpu_check.kafka_table(manifest, 300), gpu_check.CPU, None, 128, False)
    sessions.clear_sessions()
    assert runs == [(0, 1), (0, 0), (2, 1), (2, 0)]
    assert scores.shape == (300, 2) and result["sequential"]["device"] == result["pipelined"]["device"] == "cpu"


def test_the_overlap_ideal_is_what_hiding_the_shorter_side_buys(gpu_check):
    stages = {"decode": 0.3, "h2d": 0.05, "compute": 1.0, "d2h": 0.05, "encode": 0.1}
    assert gpu_check.overlap_ideal(stages) == 1.5
    assert gpu_check.overlap_ideal({**stages, "compute": 0.5}) == 2.0
    assert gpu_check.overlap_ideal({**stages, "compute": 0.25}) == 1.5
    assert gpu_check.overlap_ideal(dict.fromkeys(stages, 0.0)) is None


def test_layer_counts_are_positive_integers(gpu_check):
    import argparse

    assert gpu_check.layer_counts("4,8,16") == (4, 8, 16)
    for bad in ("0", "4,-1", "4,,8", "many"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            gpu_check.layer_counts(bad)
