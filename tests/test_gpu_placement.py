"""GPU placement defects, each shown without a GPU: fake NVML, monkeypatched ONNX Runtime providers, fake nvidia-smi.

No pyspark: these run where the engine runs (executors, GPU hosts without Spark).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from _inference_models import Holder, feature_spec, softmax_model
from streamhydro import devices
from streamhydro.config import PayloadSettings
from streamhydro.devices import DeviceError, cuda_ordinal
from streamhydro.errors import ConfigError
from streamhydro.executor import sessions
from streamhydro.executor.engine import EngineSettings
from streamhydro.executor.sessions import Placement, TaskResources
from streamhydro.registry import TensorSpec

DISCOVERY = Path(__file__).parent.parent / "deploy" / "gpu" / "get_gpus_resources.sh"
PCI = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
HOST_UUIDS = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
# The fake GPU build below runs every session on the CPU: these tests look at the options asked for, so the
# fallback that follows is allowed (tests/test_gpu_fallback.py covers refusing it).
GPU_SETTINGS = EngineSettings(
    providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"), allow_cpu_fallback=True
)


def test_ordinals_need_pci_order():
    with pytest.raises(DeviceError) as caught:
        cuda_ordinal("1", environ={})
    assert "CUDA_DEVICE_ORDER" in caught.value.problem and "PCI_BUS_ID" in caught.value.fix
    with pytest.raises(DeviceError):
        cuda_ordinal("1", environ={"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert cuda_ordinal("1", environ=PCI) == 1


def test_uuid_and_mig_addresses_map_to_ordinals():
    assert cuda_ordinal("GPU-cccc", environ=PCI, uuids=lambda: HOST_UUIDS) == 2
    hidden = {**PCI, "CUDA_VISIBLE_DEVICES": "2,0"}
    assert cuda_ordinal("GPU-cccc", environ=hidden, uuids=lambda: HOST_UUIDS) == 0
    assert cuda_ordinal("GPU-aaaa", environ=hidden, uuids=lambda: HOST_UUIDS) == 1
    with pytest.raises(DeviceError, match="hides it"):
        cuda_ordinal("GPU-bbbb", environ=hidden, uuids=lambda: HOST_UUIDS)
    with pytest.raises(DeviceError, match="no GPU of this host"):
        cuda_ordinal("GPU-ffff", environ=PCI, uuids=lambda: HOST_UUIDS)
    mig = {**PCI, "CUDA_VISIBLE_DEVICES": "MIG-1111,MIG-2222"}
    assert cuda_ordinal("MIG-2222", environ=mig) == 1
    with pytest.raises(DeviceError) as caught:
        cuda_ordinal("MIG-3333", environ=PCI)
    assert "CUDA_VISIBLE_DEVICES" in caught.value.fix
    with pytest.raises(DeviceError, match="neither"):
        cuda_ordinal("gpu0", environ=PCI)


def test_placement_of_a_uuid_address_is_an_ordinal_not_a_value_error(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "nvml_uuids", lambda: HOST_UUIDS)
    placement = sessions.place(GPU_SETTINGS, TaskResources(gpu_addresses=("GPU-bbbb",), cpus=1))
    assert (placement.device, placement.device_id) == ("cuda:1", 1)


@pytest.mark.parametrize(("visible", "expected"), [("", "[]"), ("3,1", '["0","1"]'), ("GPU-a", '["0"]')])
def test_discovery_script_reads_cuda_visible_devices(tmp_path, visible, expected):
    """Set but empty CUDA_VISIBLE_DEVICES means no GPU, not every GPU nvidia-smi lists."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n3\\n'\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": visible}
    done = subprocess.run(["bash", str(DISCOVERY)], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == '{"name":"gpu","addresses":' + expected + "}"
    unset = subprocess.run(["bash", str(DISCOVERY)], capture_output=True, text=True, env={"PATH": env["PATH"]}, check=True)
    assert unset.stdout.strip() == '{"name":"gpu","addresses":["0","1","2","3"]}'


class RecordingOrt:
    """Stands in for ``onnxruntime.InferenceSession``: records the providers asked for, runs on the real CPU build."""

    def __init__(self, real):
        self.real = real
        self.asked = []

    def __call__(self, model, sess_options=None, providers=None):
        self.asked.append(providers)
        return self.real(model, sess_options=sess_options, providers=["CPUExecutionProvider"])


@pytest.fixture
def gpu_build(monkeypatch):
    """ONNX Runtime that claims the TensorRT and CUDA providers; sessions actually run on its CPU provider."""
    ort = pytest.importorskip("onnxruntime")
    recorder = RecordingOrt(ort.InferenceSession)
    monkeypatch.setattr(ort, "InferenceSession", recorder)
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_SETTINGS.providers))
    monkeypatch.setattr(sessions, "device_memory_bytes", lambda ordinal: 80 << 30)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    sessions.clear_sessions()
    yield recorder
    sessions.clear_sessions()


def _by_name(providers: list) -> dict:
    """ORT's ``providers`` argument as {name: options or None}."""
    return {entry[0]: entry[1] for entry in providers if isinstance(entry, tuple)} | {
        entry: None for entry in providers if isinstance(entry, str)
    }


def _placement(address: str, settings: EngineSettings = GPU_SETTINGS) -> Placement:
    return sessions.place(settings, TaskResources(gpu_addresses=(address,), cpus=1))


def test_every_gpu_provider_gets_the_tasks_device(gpu_build):
    data, manifest = softmax_model([feature_spec("x", 4)])
    sessions.validate_model(manifest, data, PayloadSettings())
    gpu_build.asked.clear()
    sessions._create(manifest, data, PayloadSettings(), _placement("1"), GPU_SETTINGS)
    (asked,) = gpu_build.asked
    options = _by_name(asked)
    assert options["TensorrtExecutionProvider"]["device_id"] == 1
    assert options["CUDAExecutionProvider"]["device_id"] == 1
    assert "CPUExecutionProvider" in options


def test_arena_defaults_to_the_tasks_share_of_the_gpu(gpu_build):
    data, manifest = softmax_model([feature_spec("x", 4)])
    quarter = dataclasses.replace(GPU_SETTINGS, gpu_share=0.25)
    sessions._create(manifest, data, PayloadSettings(), _placement("0", quarter), quarter)
    cuda = _by_name(gpu_build.asked[-1])["CUDAExecutionProvider"]
    # The input buffers (auto depth on a GPU: 2 queued + staging + computing = 4 sets of 4096 rows x 4 floats)
    # come out of the same budget.
    buffers = 4 * 4096 * 4 * 4
    assert sessions.input_buffer_bytes(manifest, quarter) == buffers
    assert cuda["gpu_mem_limit"] == int((80 << 30) * 0.25 * sessions.ARENA_FRACTION) - buffers
    fixed = dataclasses.replace(GPU_SETTINGS, gpu_mem_limit_bytes=1 << 30)
    sessions._create(manifest, data, PayloadSettings(), _placement("0", fixed), fixed)
    assert _by_name(gpu_build.asked[-1])["CUDAExecutionProvider"]["gpu_mem_limit"] == (1 << 30) - buffers


def test_input_buffers_larger_than_the_budget_are_refused_naming_the_keys():
    _, manifest = softmax_model([feature_spec("x", 1000)])
    settings = dataclasses.replace(GPU_SETTINGS, gpu_mem_limit_bytes=64 << 20, batch_size=8192)
    with pytest.raises(ConfigError) as caught:
        sessions.arena_limit_bytes(Placement("cuda:0", 0, settings.providers, 1, "assigned"), settings, manifest)
    assert caught.value.key == "inference.gpu_mem_limit_mb" and "inference.batch_size" in caught.value.fix
    assert "125 MiB" in caught.value.problem  # 4 sets x 8192 rows x 1000 floats
    _, strings = softmax_model([TensorSpec("s", "string", (-1, 1))])
    assert sessions.input_buffer_bytes(strings, settings) == 0, "string inputs stay on the host"


def _bound_on_cpu(data: bytes, manifest, rows: int, slots: int) -> sessions.ModelSession:
    """A session whose runs go through the engine's input buffers and IOBinding, on the CPU device: the same
    code path a GPU session takes, with ``"cpu"`` where it has ``"cuda"``."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    buffers = sessions.InputBuffers(manifest.inputs, rows, slots, "cpu", 0)
    return sessions.ModelSession(session, manifest, "cpu", "cpu", 0, ("CPUExecutionProvider",), buffers)


@pytest.mark.parametrize(("slots_short_by", "matches"), [(0, True), (1, False)])
def test_input_buffers_are_reused_round_robin_and_never_overwritten_in_flight(slots_short_by, matches):
    import time

    import numpy as np

    from streamhydro.executor.engine import run_pipeline

    data, manifest = softmax_model([feature_spec("x", 4), feature_spec("y", 2)])
    depth, rows = 2, 64
    model = _bound_on_cpu(data, manifest, rows, sessions.input_slots(EngineSettings(pipeline_depth=depth), True) - slots_short_by)
    rng = np.random.default_rng(3)
    sizes = [rows] * 9 + [17]  # the rebatcher's full batches, then a task's shorter last one
    batches = [{"x": rng.normal(size=(n, 4)).astype(np.float32), "y": rng.normal(size=(n, 2)).astype(np.float32)} for n in sizes]
    expected = [model.session.run(None, batch)[0] for batch in batches]
    pointers = set()

    def stage(items):
        for batch in items:
            staged = model.to_device(batch)
            pointers.add(staged.buffers["x"].data_ptr())
            yield staged

    def slow_compute(staged):
        time.sleep(0.05)  # the front fills the queue and stages one more meanwhile
        return model.compute(staged)

    got = list(run_pipeline(batches, stage, slow_compute, lambda outputs: [model.to_host(outputs)], depth))
    assert len(pointers) == model.buffers.slots, "every set of buffers is used, and no other memory"
    same = all(np.allclose(g[manifest.outputs[0].name], e, atol=1e-6) for g, e in zip(got, expected))
    assert [len(g[manifest.outputs[0].name]) for g in got] == sizes
    assert same is matches, "one set fewer than a task holds in flight must overwrite an input before it is computed"


def test_a_worker_keeps_sessions_on_one_gpu_only(gpu_build):
    data, manifest = softmax_model([feature_spec("x", 4)])
    on_zero = sessions.get_session(manifest, Holder(data), PayloadSettings(), _placement("0"), GPU_SETTINGS)
    cpu = sessions.place(EngineSettings(), TaskResources(cpus=1))
    sessions.get_session(manifest, Holder(data), PayloadSettings(), cpu, EngineSettings())
    sessions.get_session(manifest, Holder(data), PayloadSettings(), _placement("1"), GPU_SETTINGS)
    assert sorted(key[1] for key in sessions._sessions) == ["cpu", "cuda:1"]
    assert on_zero not in sessions._sessions.values()


def test_missing_onnx_runtime_names_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    data, manifest = softmax_model([feature_spec("x", 4)])
    with pytest.raises(sessions.OnnxRuntimeMissing) as caught:
        sessions.validate_model(manifest, data, PayloadSettings())
    assert "streamhydro[cpu]" in str(caught.value) and "streamhydro[gpu]" in str(caught.value)


def test_trainer_refuses_more_than_one_gpu_per_rank():
    from streamhydro.errors import ConfigError
    from streamhydro.trainer.config import from_mapping

    raw = {"data": {"format": "csv", "path": "x.csv", "features": ["a", "b"], "label": "y", "labels": ["n", "p"]},
           "training": {"ranks": 2}, "spark": {"gpus_per_rank": 2}}
    with pytest.raises(ConfigError) as caught:
        from_mapping(raw, {})
    assert caught.value.key == "spark.gpus_per_rank" and "training.ranks to 4" in caught.value.fix
    raw["spark"].update(gpus_per_rank=1, master="spark://host:7077")
    assert from_mapping(raw, {}).spark.gpus_per_rank == 1


def test_gpu_extra_does_not_bring_the_cpu_build():
    """Both builds write the package ``onnxruntime``: the base dependencies must not name either."""
    import re
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    name = lambda requirement: re.split(r"[\[<>=~ ;]", requirement)[0]  # noqa: E731
    assert [name(d) for d in extras["cpu"]] == ["onnxruntime"]
    assert [name(d) for d in extras["gpu"] if name(d).startswith("onnxruntime")] == ["onnxruntime-gpu"]


def test_gpu_extra_brings_the_cuda_and_cudnn_wheels():
    """onnxruntime-gpu's own extras ``cuda`` and ``cudnn`` carry the CUDA runtime and cuDNN; cuBLAS comes with cuDNN."""
    import tomllib

    gpu = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    (ort,) = [d for d in gpu if d.startswith("onnxruntime-gpu")]
    assert ort.startswith("onnxruntime-gpu[cuda,cudnn]")
    assert any(d.startswith("nvidia-cublas") for d in gpu)


def test_only_one_onnx_runtime_build_is_installed():
    """onnxruntime and onnxruntime-gpu install the same package; with both, the last installed wins silently."""
    installed = sessions.installed_builds()
    assert len(installed) <= 1, f"both ONNX Runtime builds are installed ({installed}): pip uninstall -y onnxruntime onnxruntime-gpu, then install one"


def test_tf32_is_off_unless_allowed(gpu_build):
    data, manifest = softmax_model([feature_spec("x", 4)])
    sessions._create(manifest, data, PayloadSettings(), _placement("0"), GPU_SETTINGS)
    assert _by_name(gpu_build.asked[-1])["CUDAExecutionProvider"]["use_tf32"] == 0
    tf32 = dataclasses.replace(GPU_SETTINGS, allow_tf32=True)
    sessions._create(manifest, data, PayloadSettings(), _placement("0", tf32), tf32)
    assert _by_name(gpu_build.asked[-1])["CUDAExecutionProvider"]["use_tf32"] == 1


def test_tensorrt_gets_an_engine_cache_and_one_profile_up_to_the_batch_size(gpu_build, tmp_path):
    data, manifest = softmax_model([feature_spec("x", 4), TensorSpec("img", "float32", (-1, 2, 3))])
    settings = dataclasses.replace(GPU_SETTINGS, batch_size=512, tensorrt_cache_dir=str(tmp_path / "engines" / "trt"))
    sessions._create(manifest, data, PayloadSettings(), _placement("1", settings), settings)
    trt = _by_name(gpu_build.asked[-1])["TensorrtExecutionProvider"]
    assert trt == {
        "device_id": 1,
        "trt_engine_cache_enable": 1,
        "trt_engine_cache_path": str(tmp_path / "engines" / "trt"),
        "trt_profile_min_shapes": "x:1x4,img:1x2x3",
        "trt_profile_opt_shapes": "x:512x4,img:512x2x3",
        "trt_profile_max_shapes": "x:512x4,img:512x2x3",
    }
    assert (tmp_path / "engines" / "trt").is_dir()


def test_tensorrt_cache_defaults_under_the_temp_dir_and_skips_profiles_it_cannot_state(monkeypatch, tmp_path):
    monkeypatch.setattr(sessions.tempfile, "gettempdir", lambda: str(tmp_path))
    _, manifest = softmax_model([feature_spec("x", 4)])
    placement = Placement("cuda:0", 0, GPU_SETTINGS.providers, 1, "test")
    assert sessions.tensorrt_options(placement, GPU_SETTINGS)["trt_engine_cache_path"] == str(tmp_path / "streamhydro-tensorrt")
    ragged = dataclasses.replace(manifest, inputs=(TensorSpec("x", "float32", (-1, -1)),))
    assert sessions.tensorrt_profiles(ragged, 64) == {}
    assert sessions.tensorrt_profiles(dataclasses.replace(manifest, inputs=(TensorSpec("a:b", "float32", (-1, 4)),)), 64) == {}


class MigNvml:
    """Fake pynvml: GPU 0 whole, GPU 1 split into two MIG slices; a lookup by UUID answers with the parent GPU."""

    class NVMLError(Exception):
        pass

    GPUS = {"GPU-0": 80 << 30, "GPU-1": 80 << 30}
    SLICES = {"GPU-1": {0: ("MIG-aaaa", 10 << 30), 2: ("MIG-bbbb", 20 << 30)}}

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return list(self.GPUS)[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return next((gpu for gpu, slices in self.SLICES.items() if any(s[0] == uuid for s in slices.values())), uuid)

    def nvmlDeviceGetMaxMigDeviceCount(self, handle):
        if handle not in self.SLICES:
            raise self.NVMLError("not supported")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, index):
        if index not in self.SLICES[handle]:
            raise self.NVMLError("not found")
        return self.SLICES[handle][index]

    def nvmlDeviceGetUUID(self, handle):
        return handle[0].encode() if isinstance(handle, tuple) else handle.encode()

    def nvmlDeviceGetMemoryInfo(self, handle):
        total = handle[1] if isinstance(handle, tuple) else self.GPUS[handle]
        return type("Memory", (), {"total": total, "used": 0})()


def test_a_mig_slice_is_sized_from_the_slice_not_its_gpu():
    nvml = MigNvml()
    mig = {"CUDA_VISIBLE_DEVICES": "MIG-bbbb,MIG-aaaa"}
    assert devices.device_memory_bytes(0, mig, nvml=nvml) == 20 << 30
    assert devices.device_memory_bytes(1, mig, nvml=nvml) == 10 << 30
    assert devices.device_memory_bytes(0, {"CUDA_VISIBLE_DEVICES": "MIG-ffff"}, nvml=nvml) is None
    assert devices.device_memory_bytes(1, {}, nvml=nvml) == 80 << 30


def test_preload_runs_once_before_sessions_on_cuda_builds_only(caplog):
    calls = []

    class FakeOrt:
        def __init__(self, providers):
            self.providers = providers

        def get_available_providers(self):
            return self.providers

        def preload_dlls(self):
            calls.append(self)
            print("Failed to load libcudnn.so.9: not found")

    cuda, cpu = FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"]), FakeOrt(["CPUExecutionProvider"])
    with caplog.at_level("WARNING", logger="streamhydro.executor.sessions"):
        sessions._preload_gpu_libraries(cuda)
        sessions._preload_gpu_libraries(cuda)
        sessions._preload_gpu_libraries(cpu)
    assert calls == [cuda]
    assert "libcudnn.so.9" in caplog.text


def test_gpu_tests_skip_without_a_gpu_or_the_gpu_build_and_fail_when_the_cpu_build_shadows_it():
    from test_gpu import verdict

    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert verdict(0, ["onnxruntime-gpu 1.31.1"], cuda)[0] == "skip"
    assert verdict(1, ["onnxruntime 1.32.0"], ["CPUExecutionProvider"])[0] == "skip"
    assert verdict(1, [], None)[0] == "skip"
    action, why = verdict(2, ["onnxruntime 1.32.0", "onnxruntime-gpu 1.31.1"], ["CPUExecutionProvider"])
    assert action == "fail" and "shadows" in why and "streamhydro[gpu]" in why
    assert verdict(1, ["onnxruntime-gpu 1.31.1"], cuda) == ("run", "")
