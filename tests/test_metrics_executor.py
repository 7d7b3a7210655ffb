"""Executor metrics: BatchStats -> metrics (fresh registry), and multiprocess files written by real
separate and forked processes, merged the way the driver and the node exporter read them."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from streamhydro.executor.engine import BatchStats
from streamhydro.metrics.definitions import ExecutorMetricSet
from streamhydro.metrics.executor import record
from streamhydro.metrics.exporter import NodeExporter
from streamhydro.metrics.multiprocess import ENV_VAR

STATS = BatchStats(
    model="breast_cancer",
    version=2,
    partition_id=0,
    requested_device="cuda:0",
    device="cpu",
    providers=("CPUExecutionProvider",),
    rows_in=1003,
    rows_scored=1000,
    dead_letters={"DecodeError": 2, "ShapeError": 1},
    stage_seconds={"decode": 0.004, "h2d": 0.0, "compute": 0.02, "d2h": 0.0, "encode": 0.003},
    batch_sizes=(500, 500),
    pipeline_depth=2,
    queue_mean={"staged": 1.5, "computed": 0.5},
    queue_max={"staged": 2, "computed": 1},
    wall_seconds=0.03,
)


def test_record_puts_one_partition_into_every_metric() -> None:
    registry = CollectorRegistry()
    record(ExecutorMetricSet(registry), STATS)
    get = registry.get_sample_value
    assert get("streamhydro_inference_rows_total", {"model": "breast_cancer", "version": "2", "device": "cpu"}) == 1000
    assert get("streamhydro_dead_letters_total", {"error_class": "DecodeError"}) == 2
    assert get("streamhydro_dead_letters_total", {"error_class": "ShapeError"}) == 1
    assert get("streamhydro_inference_stage_duration_seconds_count", {"stage": "compute", "device": "cpu"}) == 1
    assert get("streamhydro_inference_stage_duration_seconds_sum", {"stage": "compute", "device": "cpu"}) == 0.02
    assert get("streamhydro_inference_stage_duration_seconds_bucket", {"stage": "compute", "device": "cpu", "le": "0.025"}) == 1
    assert get("streamhydro_inference_stage_duration_seconds_bucket", {"stage": "compute", "device": "cpu", "le": "0.01"}) == 0
    assert get("streamhydro_inference_batch_rows_count", {"device": "cpu"}) == 2
    assert get("streamhydro_inference_batch_rows_sum", {"device": "cpu"}) == 1000
    assert get("streamhydro_inference_queue_items_sum", {"queue": "staged"}) == 1.5
    assert get("streamhydro_inference_partitions_total", {"device": "cpu"}) == 1
    assert get("streamhydro_inference_partition_duration_seconds_count", {"device": "cpu"}) == 1
    assert get("streamhydro_inference_device_fallbacks_total", {"requested": "cuda:0", "device": "cpu"}) == 1


def test_no_fallback_counted_when_the_requested_device_was_used() -> None:
    registry = CollectorRegistry()
    record(ExecutorMetricSet(registry), dataclasses.replace(STATS, requested_device="cpu"))
    assert registry.get_sample_value("streamhydro_inference_device_fallbacks_total", {"requested": "cpu", "device": "cpu"}) is None


WORKER = textwrap.dedent(
    """
    import dataclasses, os, sys
    sys.path.insert(0, {tests!r})
    from test_metrics_executor import STATS
    from streamhydro.metrics.executor import observe_batch

    observe_batch(STATS)
    # PySpark's daemon forks its workers: a forked child must write its own file, not its parent's.
    pid = os.fork()
    if pid == 0:
        observe_batch(dataclasses.replace(STATS, rows_scored=10, dead_letters={{}}))
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    observe_batch(STATS)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


def run_worker(env: dict[str, str]) -> None:
    script = WORKER.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def merged(directory: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


def test_worker_processes_and_their_forks_merge_in_the_multiprocess_directory(tmp_path: Path) -> None:
    env = {**os.environ, ENV_VAR: str(tmp_path)}
    run_worker(env)
    run_worker(env)
    # Two processes and two forked children, each with its own files.
    assert len({path.name.split("_")[-1] for path in tmp_path.glob("*.db")}) == 4
    get = merged(tmp_path).get_sample_value
    assert get("streamhydro_inference_rows_total", {"model": "breast_cancer", "version": "2", "device": "cpu"}) == 2 * (1000 + 10 + 1000)
    assert get("streamhydro_dead_letters_total", {"error_class": "DecodeError"}) == 2 * 2 * 2
    assert get("streamhydro_inference_stage_duration_seconds_count", {"stage": "decode", "device": "cpu"}) == 6
    assert get("streamhydro_inference_partitions_total", {"device": "cpu"}) == 6


def test_nothing_is_written_without_the_multiprocess_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["TMPDIR"] = str(tmp_path)
    run_worker(env)
    assert list(tmp_path.iterdir()) == []


def test_node_exporter_serves_the_directory(tmp_path: Path) -> None:
    run_worker({**os.environ, ENV_VAR: str(tmp_path)})
    exporter = NodeExporter(tmp_path, "127.0.0.1", 0, clean=False)
    try:
        with urllib.request.urlopen(exporter.url, timeout=10) as response:
            text = response.read().decode()
    finally:
        exporter.close()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "le" not in sample.labels:
                totals[sample.name] = totals.get(sample.name, 0) + sample.value
    assert totals["streamhydro_dead_letters_total"] == 2 * (2 + 1)
    assert totals["streamhydro_inference_partitions_total"] == 3
    assert totals["streamhydro_inference_stage_duration_seconds_count"] == 3 * 5


def test_node_exporter_clean_removes_earlier_files(tmp_path: Path) -> None:
    run_worker({**os.environ, ENV_VAR: str(tmp_path)})
    keep = tmp_path / "notes.txt"
    keep.write_text("not a metric file")
    exporter = NodeExporter(tmp_path, "127.0.0.1", 0, clean=True)
    exporter.close()
    assert list(tmp_path.iterdir()) == [keep]
