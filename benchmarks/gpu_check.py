"""The GPU acceptance run: streamhydro's engine and trainer collectives on the GPUs of this host, without Spark.

Runs on a GPU machine (and, small, in CI), once, through ``bash benchmarks/gpu_check.sh`` (which sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, as streamhydro's Spark conf does for executors). Needs Python, numpy,
pyarrow, msgspec, onnx, ONNX Runtime (the GPU build where there is a GPU), nvidia-ml-py, pytest for the
GPU tests and, for the all-reduce, torch; it imports nothing that imports pyspark. Prints one JSON line:

* ``gpu``: whether NVML sees an NVIDIA GPU; ``ort_builds`` / ``ort_providers``: what ONNX Runtime is here.
* ``tasks``: for each GPU address (as Spark would hand it to a task) the device the engine asked for, the
  device and providers ONNX Runtime really used, and the provider options it got.
* ``models``: for the demo model (``models/breast_cancer/1``) and compute-bound models made here (wide MLPs
  whose hidden layers share one weight matrix: hundreds of MFLOP per row from a 64 MB file; one per
  ``--layers`` count), on the CPU and on GPU 0: rows/s sequential (``pipeline_depth`` 0) and pipelined (2), each after a warm-up at its
  own depth; seconds per engine stage (decode, h2d, compute, d2h, encode, from the engine's BatchStats);
  on the GPU its busy % and memory used before and at peak (NVML, whole device, sampled every 50 ms);
  ``overlap_ideal``, what pipelining buys when compute fully overlaps the host stages, from the sequential
  run's stage times (:func:`overlap_ideal`); ``gpu_over_cpu``; GPU vs CPU scores on the same rows against
  :func:`streamhydro.precision.score_tolerance`.
* ``gpu_tests``: ``pytest -m gpu`` on the test files that hold GPU tests.
* ``allreduce``: the trainer's nccl group (2 ranks, one GPU each) summing a tensor, when 2 GPUs exist.
* ``failures``: why the run failed, one line each; ``ok``: no failures.

Exits 1 when a GPU is present but a session did not run on it (CPU build of ONNX Runtime, CUDA libraries
missing), when GPU and CPU scores differ beyond the tolerance, or when the GPU tests fail. Without a GPU it
measures the CPU only, prints ``"gpu": false`` and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from streamhydro.devices import nvml_gpu_count as gpu_count  # noqa: E402 -- tests replace it to fake a GPU

CPU = ("CPUExecutionProvider",)
CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
DEPTHS = {"sequential": 0, "pipelined": 2}
REPORTED_STAGES = ("decode", "h2d", "compute", "d2h", "encode")
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_metrics_gpu.py")
GPU_TESTS_TIMEOUT_S = 200


def kafka_table(manifest: Any, rows: int, seed: int = 0) -> pa.Table:
    """Rows shaped like the Kafka source's, with JSON values of the model's features (no pandas: GPU hosts lack it)."""
    from streamhydro.payload import HEADERS_TYPE

    features = manifest.inputs[0].features
    matrix = np.random.default_rng(seed).normal(10, 5, size=(rows, len(features))).astype(np.float32)
    values = ["{" + ",".join(f'"{n}":{v!r}' for n, v in zip(features, row.tolist())) + "}" for row in matrix]
    return pa.table({
        "key": pa.array([f"user-{i}".encode() for i in range(rows)], pa.binary()),
        "value": pa.array(values).cast(pa.binary()),
        "topic": pa.array(["events"] * rows),
        "partition": pa.array(np.zeros(rows, np.int32)),
        "offset": pa.array(np.arange(rows), pa.int64()),
        "timestamp": pa.array(np.full(rows, 1_767_225_600_000_000), pa.timestamp("us", tz="UTC")),
        "timestampType": pa.array(np.zeros(rows, np.int32)),
        "headers": pa.array([[]] * rows, HEADERS_TYPE),
    })


def compute_bound_mlp(hidden: int, depth: int, seed: int = 0) -> tuple[bytes, Any, float]:
    """A 30-feature softmax MLP with ``depth`` tanh layers of width ``hidden`` that all use one weight matrix:
    ``2 * depth * hidden**2`` FLOP per row from one ``hidden**2`` matrix. Returns bytes, manifest, MFLOP per row."""
    from heavy_model import FEATURES, LABELS
    from onnx import TensorProto, helper, numpy_helper

    from streamhydro.registry import Manifest, TensorSpec, sha256_bytes

    rng = np.random.default_rng(seed)

    def weight(fan_in: int, fan_out: int, name: str) -> Any:
        return numpy_helper.from_array((rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32), name)

    zeros = lambda width, name: numpy_helper.from_array(np.zeros(width, np.float32), name)  # noqa: E731
    initializers = [weight(len(FEATURES), hidden, "W_in"), zeros(hidden, "b_in"), weight(hidden, hidden, "W"),
                    zeros(hidden, "b"), weight(hidden, len(LABELS), "W_out"), zeros(len(LABELS), "b_out")]
    nodes = [helper.make_node("Gemm", ["features", "W_in", "b_in"], ["g_in"]), helper.make_node("Tanh", ["g_in"], ["h0"])]
    for i in range(depth):
        nodes += [helper.make_node("Gemm", [f"h{i}", "W", "b"], [f"g{i}"]), helper.make_node("Tanh", [f"g{i}"], [f"h{i + 1}"])]
    nodes += [helper.make_node("Gemm", [f"h{depth}", "W_out", "b_out"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["scores"], axis=1)]
    graph = helper.make_graph(
        nodes, "compute_bound",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", len(FEATURES)])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", len(LABELS)])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    manifest = Manifest(
        name="compute_bound", version=1, sha256=sha256_bytes(data),
        inputs=(TensorSpec("features", "float32", (-1, len(FEATURES)), FEATURES),),
        outputs=(TensorSpec("scores", "float32", (-1, len(LABELS))),), labels=LABELS, created="1970-01-01T00:00:00Z",
        description=f"gpu_check MLP 30-{hidden}x{depth} (shared)-2, random weights (seed {seed})",
    )
    mflop = 2 * (len(FEATURES) * hidden + depth * hidden * hidden + hidden * len(LABELS)) / 1e6
    return data, manifest, mflop


def demo_model() -> tuple[bytes, Any, float | None]:
    from streamhydro.registry import Registry

    version = Registry(str(ROOT / "models")).get("breast_cancer", 1)
    return version.read_bytes(), version.manifest, None


def engine_run(data: bytes, manifest: Any, table: Any, providers: tuple[str, ...], address: str | None, depth: int,
               batch_size: int, allow_tf32: bool = False, arrow_rows: int | None = None,
               cpus: int | None = None) -> tuple[list[pa.RecordBatch], Any, float]:
    """Score ``table`` (in Arrow batches of ``arrow_rows``, default serve's maxRecordsPerBatch) through the
    engine as a scoring task with ``cpus`` CPUs (default: all) would; returns its output batches, stats, seconds."""
    from streamhydro.config import PayloadSettings
    from streamhydro.executor.engine import EngineSettings
    from streamhydro.executor.scoring import ScoringPlan, score_partition
    from streamhydro.executor.sessions import TaskResources
    from streamhydro.spark import STREAMING_CONF

    arrow_rows = arrow_rows or int(STREAMING_CONF["spark.sql.execution.arrow.maxRecordsPerBatch"])

    settings = EngineSettings(providers=providers, batch_size=batch_size, pipeline_depth=depth, allow_tf32=allow_tf32)
    plan = ScoringPlan(manifest, SimpleNamespace(value=data), PayloadSettings(), "out", "dlq", settings)
    stats: list[Any] = []
    resources = TaskResources((address,) if address is not None else (), cpus or os.cpu_count() or 1)
    started = time.perf_counter()
    out = list(score_partition(plan, iter(table.to_batches(max_chunksize=arrow_rows)), stats.append, resources=resources))
    seconds = time.perf_counter() - started
    return out, stats[0], seconds


def scores_of(out: list[pa.RecordBatch]) -> np.ndarray:
    """The prediction scores of an engine run's output, one row per prediction."""
    docs = [json.loads(v) for b in out for v in b.column("value").to_pylist()]
    return np.array([list(d["prediction"]["scores"].values()) for d in docs], dtype=np.float64)


class GpuSampler:
    """Mean NVML utilization and peak memory used of the GPU Spark would call ``address``, every 50 ms while running."""

    def __init__(self, address: str) -> None:
        import pynvml

        from streamhydro.devices import nvml_handle, spark_addresses

        self._nvml = pynvml
        pynvml.nvmlInit()
        device = dict(spark_addresses(pynvml.nvmlDeviceGetCount()))[address]
        self._handle = nvml_handle(pynvml, device)
        self._busy: list[int] = []
        self.memory_before_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        self.peak_memory_bytes = self.memory_before_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()

    @property
    def busy_percent(self) -> float | None:
        return round(sum(self._busy) / len(self._busy), 1) if self._busy else None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self._busy.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except self._nvml.NVMLError:
                pass  # a MIG slice reports no utilization
            self.peak_memory_bytes = max(self.peak_memory_bytes, int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used))


def measure(data: bytes, manifest: Any, table: pa.Table, providers: tuple[str, ...], address: str | None, batch_size: int,
            allow_tf32: bool) -> tuple[dict[str, Any], np.ndarray]:
    """Sequential and pipelined runs of ``table`` on one device; the pipelined run's scores.

    Each timed run follows a warm-up at its own depth: sessions are cached per depth and a worker keeps one
    session per model and device, so without it a run would also time creating its session (a second and
    more for the compute-bound model), and the comparison would be between session creations."""
    warm_up = table.slice(0, batch_size if address is not None else 64)  # session, CUDA context, first kernels
    result: dict[str, Any] = {"rows": table.num_rows}
    outputs: list[pa.RecordBatch] = []
    for name, depth in DEPTHS.items():
        engine_run(data, manifest, warm_up, providers, address, depth, batch_size, allow_tf32)
        sampler = GpuSampler(address) if address is not None else None
        with sampler or contextlib.nullcontext():
            outputs, stats, seconds = engine_run(data, manifest, table, providers, address, depth, batch_size, allow_tf32)
        result[name] = {
            "rows_per_s": round(table.num_rows / seconds, 1),
            "seconds": round(seconds, 4),
            "stage_seconds": {stage: round(stats.stage_seconds[stage], 4) for stage in REPORTED_STAGES},
            "device": stats.device,
        }
        if sampler is not None:
            result[name]["gpu_busy_percent"] = sampler.busy_percent
            result[name]["memory_used_before_bytes"] = sampler.memory_before_bytes
            result[name]["peak_memory_used_bytes"] = sampler.peak_memory_bytes
    result["pipelined_over_sequential"] = round(result["pipelined"]["rows_per_s"] / result["sequential"]["rows_per_s"], 3)
    result["overlap_ideal"] = overlap_ideal(result["sequential"]["stage_seconds"])
    return result, scores_of(outputs)


def overlap_ideal(stage_seconds: dict[str, float]) -> float | None:
    """The speed-up over the sequential run whose stages took ``stage_seconds`` when compute fully overlaps the
    host stages (decode, h2d, d2h, encode) and those run one after another, as one interpreter runs them:
    ``(host + compute) / max(host, compute)``. Host stages that release the GIL can overlap one another too, and
    timing noise moves both runs, so a pipelined run can come out a few percent above it."""
    compute = stage_seconds["compute"]
    host = sum(seconds for stage, seconds in stage_seconds.items() if stage != "compute")
    return round((host + compute) / max(host, compute), 3) if max(host, compute) > 0 else None


def gpu_tests() -> dict[str, Any]:
    """``pytest -m gpu`` on the files that hold GPU tests (the others import pyspark, which GPU hosts lack)."""
    if importlib.util.find_spec("pytest") is None:
        return {"ran": False, "reason": "pytest is not installed"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TEST_FILES]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=GPU_TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"ran": True, "exit_code": None, "summary": f"timed out after {GPU_TESTS_TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"ran": True, "exit_code": done.returncode, "summary": lines[-1] if lines else done.stderr.strip()[-300:]}


def allreduce(megabytes: int) -> dict[str, Any] | None:
    """Two ranks, one GPU each, joined the way the trainer joins them; the sum and its bandwidth."""
    try:
        import torch.multiprocessing as mp
    except ImportError:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        results = mp.get_context("spawn").Manager().dict()
        mp.start_processes(_rank, args=(2, megabytes, f"{work}/store", results), nprocs=2, join=True, start_method="spawn")
        return dict(results[0])


def _rank(rank: int, world: int, megabytes: int, store_path: str, results: Any) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    sys.path[:0] = [str(ROOT)]
    from streamhydro.devices import cuda_ordinal
    from streamhydro.trainer.rank.rendezvous import Group

    index = cuda_ordinal(str(rank))
    torch.cuda.set_device(index)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        group = Group(rank, world, torch.device("cuda", index), attempt=1)
        assert group.all_reduce([float(rank + 1)]) == [3.0]
        tensor = torch.ones(megabytes * 1024 * 1024 // 4, device=group.device)
        dist.all_reduce(tensor)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(tensor)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 5
        if rank == 0:
            results[0] = {"ranks": world, "backend": "nccl", "sum_ok": bool(tensor[0].item() == 2.0 ** 6),
                          "megabytes": megabytes, "seconds": round(seconds, 5),
                          "algbw_gb_s": round(megabytes / 1024 / seconds, 1)}
    finally:
        dist.destroy_process_group()


def check_tasks(count: int, allow_tf32: bool, failures: list[str]) -> list[dict[str, Any]]:
    """A small model on every GPU address (up to 8) as a task assigned it would run; each must run there."""
    from heavy_model import mlp

    from streamhydro.executor import sessions

    data, manifest = mlp("check_mlp", 64, 1, seed=1)
    table = kafka_table(manifest, 2000)
    tasks = []
    for address in [str(i) for i in range(min(count, 8))]:
        _, stats, _ = engine_run(data, manifest, table, CUDA, address, 2, 512, allow_tf32)
        cached = [s for s in sessions._sessions.values() if s.device == stats.device and s.device != "cpu"]
        options = cached[-1].session.get_provider_options().get("CUDAExecutionProvider", {}) if cached else {}
        tasks.append({"address": address, "requested": stats.requested_device, "device": stats.device,
                      "providers": list(stats.providers), "device_id": options.get("device_id"),
                      "gpu_mem_limit": options.get("gpu_mem_limit"), "use_tf32": options.get("use_tf32")})
        if stats.device != stats.requested_device:
            failures.append(f"GPU address {address}: the session ran on {stats.device}, not {stats.requested_device}")
    return tasks


def layer_counts(text: str) -> tuple[int, ...]:
    """``--layers``: comma-separated positive layer counts."""
    counts = tuple(int(part) for part in text.split(","))
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"layer counts must be positive integers, got {text!r}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="demo-model rows per run (CPU and GPU)")
    parser.add_argument("--heavy-rows", type=int, default=200_000, help="compute-bound model rows per GPU run")
    parser.add_argument("--cpu-heavy-rows", type=int, default=500, help="compute-bound model rows per CPU run")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096, help="width of the compute-bound model")
    parser.add_argument("--layers", type=layer_counts, default=(4, 8, 16),
                        help="hidden layers of the compute-bound models, one model per count (comma-separated)")
    parser.add_argument("--allow-tf32", action="store_true", help="run the GPU with TF32 (and its tolerance)")
    parser.add_argument("--allreduce-mb", type=int, default=256)
    parser.add_argument("--no-gpu-tests", action="store_true", help="do not run pytest -m gpu")
    args = parser.parse_args()
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

    from streamhydro.errors import StreamhydroError
    from streamhydro.executor.sessions import installed_builds, onnxruntime
    from streamhydro.precision import score_tolerance

    ort = onnxruntime()
    count = gpu_count()
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    tolerance = score_tolerance(args.allow_tf32)
    failures: list[str] = []
    report: dict[str, Any] = {
        "gpu": count > 0, "gpus": count, "onnxruntime": ort.__version__, "ort_builds": installed_builds(),
        "ort_providers": ort.get_available_providers(), "cuda_device_order": os.environ["CUDA_DEVICE_ORDER"],
        "allow_tf32": args.allow_tf32, "tolerance": {"rtol": tolerance.rtol, "atol": tolerance.atol},
        "tasks": [], "matches_cpu": None, "models": {}, "gpu_tests": None, "allreduce": None,
    }
    use_gpu = count > 0 and cuda
    if count and not cuda:
        failures.append(
            f"{count} GPU(s) present but this onnxruntime {ort.__version__} ({installed_builds()}) has no CUDA provider: "
            "pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'streamhydro[gpu]'"
        )
    try:
        if use_gpu:
            report["tasks"] = check_tasks(count, args.allow_tf32, failures)
        models = [("demo", demo_model, args.rows, args.rows)] + [
            (f"compute_bound_{layers}_layers", functools.partial(compute_bound_mlp, args.hidden, layers), args.heavy_rows,
             args.cpu_heavy_rows)
            for layers in args.layers
        ]
        agree = []
        for name, make, gpu_rows, cpu_rows in models:
            data, manifest, mflop = make()
            table = kafka_table(manifest, max(gpu_rows, cpu_rows) if use_gpu else cpu_rows)
            entry: dict[str, Any] = {"model": f"{manifest.name}:{manifest.version}", "mflop_per_row": mflop,
                                     "batch_size": args.batch_size}
            entry["cpu"], cpu_scores = measure(data, manifest, table.slice(0, cpu_rows), CPU, None, args.batch_size, False)
            entry["gpu"] = entry["gpu_over_cpu"] = entry["max_abs_diff"] = entry["matches_cpu"] = None
            if use_gpu:
                entry["gpu"], gpu_scores = measure(data, manifest, table.slice(0, gpu_rows), CUDA, "0", args.batch_size,
                                                   args.allow_tf32)
                entry["gpu_over_cpu"] = round(entry["gpu"]["pipelined"]["rows_per_s"] / entry["cpu"]["pipelined"]["rows_per_s"], 2)
                rows = min(len(cpu_scores), len(gpu_scores))
                entry["max_abs_diff"] = float(np.abs(gpu_scores[:rows] - cpu_scores[:rows]).max())
                entry["matches_cpu"] = bool(tolerance.excess(gpu_scores[:rows], cpu_scores[:rows]) <= 0)
                agree.append(entry["matches_cpu"])
                if not entry["matches_cpu"]:
                    failures.append(f"{name}: GPU scores differ from the CPU's by up to {entry['max_abs_diff']:.3g}, "
                                    f"beyond rtol {tolerance.rtol:g} / atol {tolerance.atol:g}")
                for variant in DEPTHS:
                    if entry["gpu"][variant]["device"] == "cpu":
                        failures.append(f"{name}: the {variant} GPU run scored on the CPU")
            report["models"][name] = entry
        report["matches_cpu"] = all(agree) if agree else None
    except StreamhydroError as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    if not args.no_gpu_tests:
        report["gpu_tests"] = gpu_tests()
        tests = report["gpu_tests"]
        if count and not tests["ran"]:
            failures.append(f"GPU tests did not run: {tests['reason']}")
        elif tests["ran"] and tests["exit_code"] != 0:
            failures.append(f"GPU tests failed: {tests['summary']}")
    if use_gpu and count >= 2:
        report["allreduce"] = allreduce(args.allreduce_mb)
    report["failures"] = failures
    report["ok"] = not failures
    print(json.dumps(report), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
