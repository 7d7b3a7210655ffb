"""What the pipelined engine overlaps, on a machine without a GPU: compute played by a stand-in device.

    python benchmarks/pipeline_overlap.py [--rows 122880] [--rounds 3] [--factors 0,0.5,1,2]

A GPU task's compute thread launches the model and waits for the device, holding neither a core nor the
GIL, while the task's other threads decode and encode. Here compute is the demo model's ONNX Runtime run on
the CPU (one thread; a few percent of the work) followed by a fixed wait per model batch in which the
thread sleeps: a stand-in for the device. The wait is ``factor`` times the host stages' time per model
batch (decode, h2d, d2h, encode), measured first without it; factor 0 is a task on the CPU as serve runs
it there (one ONNX Runtime thread per task). This measures the engine's overlap, not a GPU:
``benchmarks/gpu_check.sh`` is the GPU run.

For each factor and each input Arrow batch size (``--arrow-rows``: one model batch, 4,096 rows, and
serve's ``maxRecordsPerBatch``, 20,000), four variants take turns on the same rows (``--rounds`` rounds):

- ``sequential`` and ``pipelined``: ``pipeline_depth`` 0 and 2, the engine as it is: the front decodes an
  input batch a model batch at a time (``scoring._slices``);
- ``sequential_whole`` and ``pipelined_whole``: the same with each input batch decoded whole before any of
  it is staged, as the engine did before (``scoring._slices`` replaced for the run).

Each (factor, Arrow batch size) row reports the median rows/s of each variant, ``pipelined_over_sequential``
for both fronts, ``overlap_ideal`` (what full overlap would buy, from the sequential run's stage seconds:
``gpu_check.overlap_ideal``) and the share of it the pipelined run got. Prints one line per round on
stderr, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from gpu_check import CPU, REPORTED_STAGES, demo_model, engine_run, kafka_table, overlap_ideal  # noqa: E402
from streamhydro.executor import scoring, sessions  # noqa: E402
from streamhydro.spark import STREAMING_CONF  # noqa: E402

MODEL_BATCH = 4096
SERVE_ARROW_ROWS = int(STREAMING_CONF["spark.sql.execution.arrow.maxRecordsPerBatch"])
VARIANTS = {"sequential": (0, True), "pipelined": (2, True), "sequential_whole": (0, False), "pipelined_whole": (2, False)}


@contextlib.contextmanager
def stand_in_device(wait_s: float) -> Iterator[None]:
    """Every model run followed by ``wait_s`` of sleep in the compute thread (no core, no GIL)."""
    compute = sessions.ModelSession.compute

    def waiting(self: sessions.ModelSession, staged: Any) -> dict[str, Any]:
        outputs = compute(self, staged)
        time.sleep(wait_s)
        return outputs

    sessions.ModelSession.compute = waiting  # type: ignore[method-assign]
    try:
        yield
    finally:
        sessions.ModelSession.compute = compute  # type: ignore[method-assign]


@contextlib.contextmanager
def front(sliced: bool) -> Iterator[None]:
    """The engine's front as it is (``sliced``), or decoding each input batch whole (as before)."""
    slices = scoring._slices
    if not sliced:
        scoring._slices = lambda batches, rows: batches
    try:
        yield
    finally:
        scoring._slices = slices


def run(data: bytes, manifest: Any, table: Any, arrow_rows: int, depth: int, sliced: bool) -> tuple[float, Any]:
    """Seconds to score ``table`` (in Arrow batches of ``arrow_rows``) through one single-CPU task, and its stats."""
    with front(sliced):
        _, stats, seconds = engine_run(data, manifest, table, CPU, None, depth, MODEL_BATCH, arrow_rows=arrow_rows, cpus=1)
    return seconds, stats


def host_seconds_per_batch(stats: Any) -> float:
    return sum(stats.stage_seconds[s] for s in REPORTED_STAGES if s != "compute") / len(stats.batch_sizes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30 * MODEL_BATCH, help="rows per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--factors", default="0,0.5,1,2", help="device wait per model batch, in host-stage times")
    parser.add_argument("--arrow-rows", default=f"{MODEL_BATCH},{SERVE_ARROW_ROWS}", help="input Arrow batch sizes")
    args = parser.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    arrow_sizes = [int(n) for n in args.arrow_rows.split(",")]

    data, manifest, _ = demo_model()
    table = kafka_table(manifest, args.rows)
    for depth in (0, 2):  # sessions (one per depth), first kernels
        run(data, manifest, table.slice(0, MODEL_BATCH), MODEL_BATCH, depth, True)
    host_s = statistics.median(
        host_seconds_per_batch(run(data, manifest, table, MODEL_BATCH, 0, True)[1]) for _ in range(3))
    print(f"host stages: {host_s * 1000:.1f} ms per model batch of {MODEL_BATCH}", file=sys.stderr, flush=True)

    results = []
    for factor in factors:
        wait_s = factor * host_s
        for arrow_rows in arrow_sizes:
            rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
            ideals: list[float] = []
            with stand_in_device(wait_s):
                for round_ in range(args.rounds):
                    for name, (depth, sliced) in VARIANTS.items():
                        seconds, stats = run(data, manifest, table, arrow_rows, depth, sliced)
                        rates[name].append(args.rows / seconds)
                        if name == "sequential":
                            ideals.append(overlap_ideal({s: stats.stage_seconds[s] for s in REPORTED_STAGES}))
                    print(f"factor {factor} arrow_rows {arrow_rows} round {round_ + 1}: "
                          + ", ".join(f"{n} {r[-1]:,.0f}" for n, r in rates.items()), file=sys.stderr, flush=True)
            medians = {name: round(statistics.median(r)) for name, r in rates.items()}
            ideal = statistics.median(ideals)
            ratio = medians["pipelined"] / medians["sequential"]
            results.append({
                "factor": factor, "device_wait_ms": round(wait_s * 1000, 2), "arrow_rows": arrow_rows,
                "median_rows_per_s": medians, "rows_per_s": rates,
                "pipelined_over_sequential": round(ratio, 3),
                "pipelined_over_sequential_whole": round(medians["pipelined_whole"] / medians["sequential_whole"], 3),
                "overlap_ideal": round(ideal, 3), "share_of_ideal": round(ratio / ideal, 3),
            })
    print(json.dumps({
        "benchmark": "pipeline_overlap", "rows": args.rows, "rounds": args.rounds, "model_batch": MODEL_BATCH,
        "host_ms_per_model_batch": round(host_s * 1000, 2), "machine": platform.machine(), "python": platform.python_version(),
        "results": results,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
