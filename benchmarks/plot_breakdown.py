"""Draw where a micro-batch's time goes, from the JSON ``benchmarks/breakdown.py`` printed.

    python benchmarks/plot_breakdown.py docs/measurements/breakdown.json docs/performance-breakdown.png

Needs matplotlib (``pip install '.[bench]'``). One horizontal bar per connector and phase, in milliseconds
per micro-batch, left to right in the order the time passes: the gap before the batch starts, the
driver's offset planning and write-ahead log, query planning, the Spark job (its tasks' stages, the
delivery wait, the job's scheduling and JVM<->Python hand-off), the commit, the rest of the driver's
trigger. The tasks of one micro-batch run in parallel, so the task segments are one task's means.
"""

from __future__ import annotations

import json
import sys

SEGMENTS = (
    ("gap_ms", "gap before the batch", "#dddddd"),
    ("latestOffset_ms", "offset planning", "#8c564b"),
    ("walCommit_ms", "offset WAL", "#c49c94"),
    ("queryPlanning_ms", "query planning", "#e377c2"),
    ("read_ms", "task: read", "#1f77b4"),
    ("decode_ms", "task: decode", "#aec7e8"),
    ("compute_ms", "task: ONNX Runtime", "#2ca02c"),
    ("encode_ms", "task: encode", "#98df8a"),
    ("write_ms", "task: write", "#ff7f0e"),
    ("delivery_wait_ms", "task: delivery wait", "#ffbb78"),
    ("task_other_ms", "task: other", "#bcbd22"),
    ("job_and_handoff_ms", "job scheduling & hand-off", "#d62728"),
    ("commitOffsets_ms", "commit", "#9467bd"),
    ("driver_rest_ms", "driver: rest of trigger", "#7f7f7f"),
)


def segments(row: dict) -> dict[str, float]:
    """The bar's segments of one phase (ms per micro-batch)."""
    values = {key: float(row.get(key) or 0.0) for key, _, _ in SEGMENTS}
    values["compute_ms"] += float(row.get("h2d_ms") or 0.0) + float(row.get("d2h_ms") or 0.0)
    values["job_and_handoff_ms"] = max(0.0, float(row.get("addBatch_ms") or 0.0) - float(row.get("task_ms") or 0.0))
    values["driver_rest_ms"] = max(0.0, float(row.get("driver_other_ms") or 0.0) + float(row.get("getBatch_ms") or 0.0))
    return values


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    source, target = sys.argv[1], sys.argv[2]
    with open(source) as f:
        result = json.load(f)
    bars = [
        (f"{connector} connector, {phase} ({row.get('events_per_batch', 0):,.0f} events/batch)", segments(row))
        for connector in ("python", "builtin")
        for phase, row in result[connector].items()
    ]
    fig, ax = plt.subplots(figsize=(12, 1.1 + 0.55 * len(bars)))
    for y, (_, values) in enumerate(bars):
        left = 0.0
        for key, label, color in SEGMENTS:
            width = values[key]
            ax.barh(y, width, left=left, color=color, label=label if y == 0 else None, edgecolor="white", linewidth=0.5)
            left += width
    ax.set_yticks(range(len(bars)), [name for name, _ in bars])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds per micro-batch (means)")
    ax.set_title(f"Where a micro-batch's time goes: serve on local[2], {result['cpus']} cores, Apache Kafka, demo model")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(bars) < 6 else -0.18), ncol=5, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    print(target)


if __name__ == "__main__":
    main()
