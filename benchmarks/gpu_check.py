"""The GPU check: streamhydro's engine and trainer collectives on the GPUs of this host, without Spark.

Runs on a GPU machine, once, through ``bash benchmarks/gpu_check.sh`` (which sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, as streamhydro's Spark conf does for executors). Needs Python,
numpy, pyarrow, onnx, the ONNX Runtime GPU build, nvidia-ml-py and, for the all-reduce, torch; it
imports nothing that imports pyspark. Prints one JSON line:

* ``tasks``: for each GPU address (as Spark would hand it to a task) the device the engine asked
  for, the device and providers ONNX Runtime really used, and the provider options it got.
* ``matches_cpu`` / ``max_abs_diff``: the GPU's scores against the CPU provider's, same rows.
* ``heavy``: rows/s of the heavy MLP through the engine, pipelined and sequential, and the GPU's
  busy percentage (NVML) while the pipelined run went.
* ``allreduce``: the trainer's nccl group (2 ranks, one GPU each) summing a tensor, when 2 GPUs exist.

Without a GPU (or without CUDA in ONNX Runtime) the same keys are printed with ``"gpu": false``
and null measurements, and it exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
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

CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
TOLERANCE = 1e-4


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


def gpu_count() -> int:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def engine_run(data: bytes, manifest: Any, table: Any, providers: tuple[str, ...], address: str | None, depth: int,
               batch_size: int) -> tuple[np.ndarray, Any, float]:
    """Score ``table`` through the engine as a scoring task would; returns scores, stats, seconds."""
    from streamhydro.config import PayloadSettings
    from streamhydro.executor.engine import EngineSettings
    from streamhydro.executor.scoring import ScoringPlan, score_partition
    from streamhydro.executor.sessions import TaskResources

    settings = EngineSettings(providers=providers, batch_size=batch_size, pipeline_depth=depth)
    plan = ScoringPlan(manifest, SimpleNamespace(value=data), PayloadSettings(), "out", "dlq", settings)
    stats: list[Any] = []
    resources = TaskResources((address,) if address is not None else (), 4)
    started = time.perf_counter()
    out = list(score_partition(plan, iter(table.to_batches(max_chunksize=20_000)), stats.append, resources=resources))
    seconds = time.perf_counter() - started
    docs = [json.loads(v) for b in out for v in b.column("value").to_pylist()]
    scores = np.array([list(d["prediction"]["scores"].values()) for d in docs], dtype=np.float64)
    return scores, stats[0], seconds


class BusySampler:
    """Mean NVML utilization of one GPU, sampled every 100 ms while running."""

    def __init__(self, index: int) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()

    @property
    def percent(self) -> float | None:
        return round(sum(self._samples) / len(self._samples), 1) if self._samples else None

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heavy-rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--allreduce-mb", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

    from heavy_model import mlp

    from streamhydro.executor.sessions import onnxruntime

    ort = onnxruntime()
    count = gpu_count()
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    report: dict[str, Any] = {
        "gpu": bool(count and cuda), "gpus": count, "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "cuda_device_order": os.environ["CUDA_DEVICE_ORDER"],
        "tasks": [], "matches_cpu": None, "max_abs_diff": None, "heavy": None, "allreduce": None,
    }
    if report["gpu"]:
        small, small_manifest = mlp("check_mlp", 64, 1, seed=1)
        table = kafka_table(small_manifest, 5000)
        cpu_scores, _, _ = engine_run(small, small_manifest, table, ("CPUExecutionProvider",), None, 0, 1024)
        worst = 0.0
        for address in [str(i) for i in range(min(count, 8))]:
            scores, stats, _ = engine_run(small, small_manifest, table, CUDA, address, 2, 1024)
            from streamhydro.executor import sessions

            cached = [s for s in sessions._sessions.values() if s.device == stats.device and s.device != "cpu"]
            options = cached[0].session.get_provider_options().get("CUDAExecutionProvider", {}) if cached else {}
            report["tasks"].append({"address": address, "requested": stats.requested_device, "device": stats.device,
                                    "providers": list(stats.providers), "device_id": options.get("device_id"),
                                    "gpu_mem_limit": options.get("gpu_mem_limit")})
            worst = max(worst, float(np.abs(scores - cpu_scores).max()))
        report["max_abs_diff"] = worst
        report["matches_cpu"] = worst <= TOLERANCE
        heavy, heavy_manifest = mlp("heavy_mlp", args.hidden, args.layers)
        table = kafka_table(heavy_manifest, args.heavy_rows)
        engine_run(heavy, heavy_manifest, table.slice(0, 20_000), CUDA, "0", 2, args.batch_size)
        with BusySampler(0) as busy:
            _, _, pipelined = engine_run(heavy, heavy_manifest, table, CUDA, "0", 2, args.batch_size)
        _, _, sequential = engine_run(heavy, heavy_manifest, table, CUDA, "0", 0, args.batch_size)
        report["heavy"] = {"rows": args.heavy_rows, "hidden": args.hidden, "layers": args.layers,
                           "pipelined_rows_per_s": round(args.heavy_rows / pipelined), "sequential_rows_per_s":
                           round(args.heavy_rows / sequential), "gpu_busy_percent_pipelined": busy.percent}
        if count >= 2:
            report["allreduce"] = allreduce(args.allreduce_mb)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
