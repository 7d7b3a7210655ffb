"""Driver metrics: progress -> metrics (pure, fresh registry per test), the HTTP(S) endpoint, and the
listener on a real streaming query."""

from __future__ import annotations

import json
import os
import math
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from streamhydro.config import MetricsSettings
from streamhydro.errors import ConfigError
from streamhydro.metrics.definitions import DriverMetricSet
from streamhydro.metrics.driver import DriverMetrics
from streamhydro.metrics.endpoint import Endpoint
from streamhydro.metrics.listener import ProgressRecorder, kafka_lag, kafka_offsets, records_read
from streamhydro.metrics.multiprocess import EXECUTOR_ENV_KEY, clean, executor_conf


def progress(batch: int, rows: int, latest: dict, start: dict | None, end: dict, name: str = "serve") -> dict:
    """The shape of ``StreamingQueryProgress.json`` for a Kafka source (offsets as objects or JSON text)."""
    return {
        "id": "4f1c0000-0000-0000-0000-000000000001",
        "runId": "r",
        "name": name,
        "batchId": batch,
        "numInputRows": rows,
        "inputRowsPerSecond": rows / 2.0,
        "processedRowsPerSecond": "NaN" if rows == 0 else rows / 0.5,
        "durationMs": {"triggerExecution": 500, "addBatch": 400, "walCommit": 40, "latestOffset": 3},
        "sources": [{"description": "kafka", "startOffset": start, "endOffset": json.dumps(end), "latestOffset": latest,
                     "numInputRows": rows}],
        "sink": {"description": "foreachBatch"},
    }


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_kafka_offsets_parse_dicts_and_json_and_reject_other_sources() -> None:
    assert kafka_offsets({"t": {"0": 5, "1": 7}}) == {("t", "0"): 5, ("t", "1"): 7}
    assert kafka_offsets('{"t": {"0": 5}}') == {("t", "0"): 5}
    assert kafka_offsets(42) == {}  # the rate source
    assert kafka_offsets("not json") == {}
    assert kafka_offsets({"t": 5}) == {}
    assert kafka_offsets(None) == {}


def test_kafka_lag_is_latest_minus_processed_per_partition() -> None:
    assert kafka_lag({"t": {"0": 100, "1": 50}}, {"t": {"0": 40}}) == {("t", "0"): 60, ("t", "1"): 50}
    assert kafka_lag({"t": {"0": 10}}, {"t": {"0": 10}}) == {("t", "0"): 0}
    assert kafka_lag(None, {"t": {"0": 10}}) == {}


def test_progress_sets_rates_counts_phases_and_lag(registry: CollectorRegistry) -> None:
    recorder = ProgressRecorder(DriverMetricSet(registry))
    recorder.started("4f1c0000-0000-0000-0000-000000000001", "serve")
    # The first batch has no start offset: everything up to latest was waiting.
    recorder.progress(progress(0, 1000, {"ev": {"0": 5000, "1": 3000}}, None, {"ev": {"0": 600, "1": 400}}))
    assert value(registry, "streamhydro_kafka_lag_records", query="serve", topic="ev", partition="0") == 5000
    recorder.progress(progress(1, 3000, {"ev": {"0": 5000, "1": 3000}}, {"ev": {"0": 600, "1": 400}}, {"ev": {"0": 2000, "1": 2000}}))
    assert value(registry, "streamhydro_batches_total", query="serve") == 2
    assert value(registry, "streamhydro_input_rows_total", query="serve") == 4000
    assert value(registry, "streamhydro_input_rows_per_second", query="serve") == 1500
    assert value(registry, "streamhydro_processed_rows_per_second", query="serve") == 6000
    assert value(registry, "streamhydro_batch_rows_count", query="serve") == 2
    assert value(registry, "streamhydro_batch_rows_sum", query="serve") == 4000
    assert value(registry, "streamhydro_batch_duration_seconds_sum", query="serve", phase="triggerExecution") == 1.0
    assert value(registry, "streamhydro_batch_duration_seconds_count", query="serve", phase="walCommit") == 2
    assert value(registry, "streamhydro_kafka_lag_records", query="serve", topic="ev", partition="0") == 4400
    assert value(registry, "streamhydro_kafka_lag_records", query="serve", topic="ev", partition="1") == 2600
    assert value(registry, "streamhydro_query_state", query="serve", state="active") == 1
    assert value(registry, "streamhydro_query_state", query="serve", state="failed") == 0


def test_records_come_from_offsets_when_spark_counts_one_row_per_range(registry: CollectorRegistry) -> None:
    recorder = ProgressRecorder(DriverMetricSet(registry))
    ranges = progress(3, 2, {"ev": {"0": 900, "1": 900}}, {"ev": {"0": 100, "1": 200}}, {"ev": {"0": 900, "1": 900}})
    recorder.progress(ranges)
    assert records_read(ranges) == 1500
    assert value(registry, "streamhydro_input_rows_total", query="serve") == 1500
    assert value(registry, "streamhydro_batch_rows_sum", query="serve") == 1500
    assert value(registry, "streamhydro_processed_rows_per_second", query="serve") == 3000
    assert value(registry, "streamhydro_input_rows_per_second", query="serve") == 750
    assert records_read(progress(0, 7, {"ev": {"0": 9}}, None, {"ev": {"0": 9}})) == 7, "no start offsets: Spark's count"


def test_a_first_micro_batch_of_ranges_counts_the_records_the_driver_saw(registry: CollectorRegistry) -> None:
    """Spark reports no start offsets for a query's first micro-batch and counts streamhydro's ranges as
    rows: the records come from the ranges the tasks reported (998 of 1,000 went uncounted before)."""
    recorder = ProgressRecorder(DriverMetricSet(registry))
    recorder.ranges_read(0, 1000)
    recorder.progress(progress(0, 2, {"ev": {"0": 506, "1": 494}}, None, {"ev": {"0": 506, "1": 494}}))
    recorder.progress(progress(1, 2, {"ev": {"0": 1012, "1": 988}}, {"ev": {"0": 506, "1": 494}}, {"ev": {"0": 1012, "1": 988}}))
    assert value(registry, "streamhydro_input_rows_total", query="serve") == 2000


def test_an_empty_batch_reports_zero_rates_not_nan(registry: CollectorRegistry) -> None:
    recorder = ProgressRecorder(DriverMetricSet(registry))
    recorder.progress(progress(0, 0, {"ev": {"0": 0}}, {"ev": {"0": 0}}, {"ev": {"0": 0}}))
    rate = value(registry, "streamhydro_processed_rows_per_second", query="serve")
    assert rate == 0 and not math.isnan(rate)


def test_state_follows_idle_and_termination(registry: CollectorRegistry) -> None:
    recorder = ProgressRecorder(DriverMetricSet(registry))
    recorder.started("id-1", None)
    recorder.progress({**progress(0, 10, {"ev": {"0": 10}}, {"ev": {"0": 0}}, {"ev": {"0": 10}}), "id": "id-1", "name": None})
    assert value(registry, "streamhydro_kafka_lag_records", query="id-1", topic="ev", partition="0") == 10
    recorder.idle("id-1")
    assert value(registry, "streamhydro_kafka_lag_records", query="id-1", topic="ev", partition="0") == 0
    assert value(registry, "streamhydro_query_state", query="id-1", state="idle") == 1
    assert value(registry, "streamhydro_query_state", query="id-1", state="active") == 0
    recorder.terminated("id-1", None)
    assert value(registry, "streamhydro_query_state", query="id-1", state="stopped") == 1
    recorder.started("id-2", "named")
    recorder.terminated("id-2", "java.lang.RuntimeException: boom")
    assert value(registry, "streamhydro_query_state", query="named", state="failed") == 1
    assert value(registry, "streamhydro_query_state", query="named", state="idle") == 0


def test_age_of_last_progress_grows_until_the_next_event(registry: CollectorRegistry) -> None:
    clock = Clock()
    recorder = ProgressRecorder(DriverMetricSet(registry), clock=clock)
    recorder.started("id-1", "q")
    clock.now += 42
    assert value(registry, "streamhydro_query_last_progress_age_seconds", query="q") == 42
    recorder.idle("id-1")
    assert value(registry, "streamhydro_query_last_progress_age_seconds", query="q") == 0


def test_model_info_and_refusals_without_an_endpoint() -> None:
    metrics = DriverMetrics(spark=None, settings=MetricsSettings(enabled=False))
    assert metrics.url is None
    metrics.set_model("breast_cancer", 1)
    metrics.set_model("breast_cancer", 2)
    metrics.model_refused("breast_cancer", 3, "checksum mismatch")
    r = metrics.registry
    assert value(r, "streamhydro_model_info", model="breast_cancer", version="2") == 1
    assert value(r, "streamhydro_model_info", model="breast_cancer", version="1") is None
    assert value(r, "streamhydro_model_refusals_total", model="breast_cancer", version="3") == 1
    assert value(r, "streamhydro_model_last_refusal_info", model="breast_cancer", version="3", reason="checksum mismatch") == 1
    metrics.model_refused("breast_cancer", 4, "inputs do not fit")
    assert value(r, "streamhydro_model_last_refusal_info", model="breast_cancer", version="3", reason="checksum mismatch") is None


def test_no_model_series_before_a_model_is_known() -> None:
    metrics = DriverMetrics(spark=None, settings=MetricsSettings(enabled=False))
    names = {s.name for f in metrics.registry.collect() for s in f.samples}
    assert "streamhydro_model_info" not in names and "streamhydro_model_last_refusal_info" not in names
    metrics.close()


def scrape(url: str, context: ssl.SSLContext | None = None) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        text = response.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_endpoint_serves_its_registry_on_a_free_loopback_port(registry: CollectorRegistry) -> None:
    metrics = DriverMetricSet(registry)
    metrics.batches.labels("q").inc(3)
    endpoint = Endpoint(registry, "127.0.0.1", 0)
    try:
        assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
        assert endpoint.port > 0
        families = scrape(endpoint.url)
        assert families["streamhydro_batches"][0].value == 3
    finally:
        endpoint.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(endpoint.url, timeout=2)


def test_endpoint_refuses_a_busy_port(registry: CollectorRegistry) -> None:
    first = Endpoint(registry, "127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match="metrics.port"):
            Endpoint(registry, "127.0.0.1", first.port)
    finally:
        first.close()


def test_endpoint_over_tls(tmp_path: Path, registry: CollectorRegistry) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    DriverMetricSet(registry).batches.labels("q").inc()
    endpoint = Endpoint(registry, "127.0.0.1", 0, str(cert), str(key))
    try:
        assert endpoint.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        assert scrape(endpoint.url, context)["streamhydro_batches"][0].value == 1
        with pytest.raises(OSError):  # plain HTTP gets no metrics
            urllib.request.urlopen(endpoint.url.replace("https", "http"), timeout=5)
    finally:
        endpoint.close()


@pytest.mark.spark
def test_listener_on_a_real_query(spark, tmp_path: Path) -> None:
    """The listener registered by DriverMetrics sees a real query's progress and termination."""
    settings = MetricsSettings(port=0, multiprocess_dir=str(tmp_path / "mp"))
    metrics = DriverMetrics(spark, settings)
    try:
        stream = spark.readStream.format("rate").option("rowsPerSecond", 50).load()
        query = (stream.writeStream.queryName("rate_q").format("noop").trigger(processingTime="200 milliseconds")
                 .option("checkpointLocation", str(tmp_path / "ckpt")).start())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (value(metrics.registry, "streamhydro_batches_total", query="rate_q") or 0) >= 3:
            time.sleep(0.2)
        families = scrape(metrics.url)
        query.stop()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and value(metrics.registry, "streamhydro_query_state", query="rate_q", state="stopped") != 1:
            time.sleep(0.1)
    finally:
        metrics.close()
    assert {s.labels["query"] for s in families["streamhydro_batches"]} == {"rate_q"}
    assert sum(s.value for s in families["streamhydro_batches"]) >= 3
    assert "streamhydro_batch_duration_seconds" in families
    assert value(metrics.registry, "streamhydro_input_rows_total", query="rate_q") > 0
    assert value(metrics.registry, "streamhydro_query_state", query="rate_q", state="stopped") == 1
    assert (tmp_path / "mp").is_dir()


def test_executor_conf_points_workers_at_an_absolute_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = MetricsSettings(multiprocess_dir="var/metrics")
    assert executor_conf(settings, "local[2]") == {EXECUTOR_ENV_KEY: str(tmp_path / "var" / "metrics")}
    assert executor_conf(settings, "local-cluster[2,1,1024]") == {EXECUTOR_ENV_KEY: str(tmp_path / "var" / "metrics")}
    assert executor_conf(MetricsSettings(enabled=False), "local[2]") == {}
    absolute = MetricsSettings(multiprocess_dir="/var/lib/streamhydro/metrics")
    assert executor_conf(absolute, "spark://master:7077") == {EXECUTOR_ENV_KEY: "/var/lib/streamhydro/metrics"}


def test_a_relative_directory_on_a_cluster_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="metrics.multiprocess_dir") as caught:
        executor_conf(MetricsSettings(multiprocess_dir="var/metrics"), "yarn")
    assert "absolute path" in str(caught.value)


def test_clean_deletes_only_metric_files(tmp_path: Path) -> None:
    (tmp_path / "counter_12.db").write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("not ours")
    assert clean(tmp_path / "new") == tmp_path / "new" and (tmp_path / "new").is_dir()
    clean(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "new"]


def test_multiprocess_variable_in_the_driver_is_refused(tmp_path: Path) -> None:
    """The driver's own metrics must not go to files the same endpoint also merges."""
    script = (
        "from streamhydro.config import MetricsSettings\n"
        "from streamhydro.errors import ConfigError\n"
        "from streamhydro.metrics.driver import DriverMetrics\n"
        "try:\n"
        "    DriverMetrics(spark=None, settings=MetricsSettings())\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert "unset PROMETHEUS_MULTIPROC_DIR" in result.stdout, result.stdout + result.stderr
