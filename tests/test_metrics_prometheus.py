"""A real Prometheus scrapes a running ``streamhydro serve`` fed through a real Kafka-protocol broker.

``serve`` runs as a subprocess with a TOML config (local[2] Spark), events are produced with
kafka-python (the users' own client), and every assertion goes through Prometheus' HTTP query API:
rates, counts and lag move as events flow; executor-side histograms (multiprocess files of the
Python workers) arrive through the driver's endpoint. Needs Debian's ``prometheus`` package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from streamhydro.kafka.admin import ensure_topics
from streamhydro.producer import JSON_BAD_KINDS, corrupt, make_values
from conftest import client, free_port, get, send

pytestmark = [pytest.mark.spark, pytest.mark.broker, pytest.mark.slow]

START_SECONDS = 180  # serve: Spark start, Python workers, model warm-up
FLOW_SECONDS = 120
GOOD, BAD = 12_000, 60
PER_TRIGGER = 1000


class Prometheus:
    """A Prometheus server on a free loopback port with its own config and data directory."""

    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found: install Debian's prometheus package (apt-get install prometheus)")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: streamhydro-driver\n    scrape_interval: 1s\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.address}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self._ready(), 30, lambda: f"Prometheus did not start:\n{self.log_path.read_text()[-3000:]}")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"Prometheus exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
        try:
            get(f"http://{self.address}/-/ready")
        except OSError:
            return False
        return True

    def query(self, promql: str) -> float | None:
        """The single value of an instant query (summed if it has several series), None when empty."""
        url = f"http://{self.address}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        answer = json.loads(get(url))
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        if not result:
            return None
        return sum(float(series["value"][1]) for series in result)

    def targets_health(self) -> str:
        answer = json.loads(get(f"http://{self.address}/api/v1/targets"))
        return "; ".join(f"{t['scrapeUrl']} {t['health']} {t['lastError']}" for t in answer["data"]["activeTargets"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._log.close()


def wait_until(condition: Callable[[], bool], seconds: float, explain: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(explain())
        time.sleep(0.5)


class Serve:
    """``streamhydro serve --config FILE`` as a subprocess; its stdout names the metrics URL."""

    def __init__(self, workdir: Path, config: str) -> None:
        path = workdir / "serve.toml"
        path.write_text(config)
        self.out_path, self.err_path = workdir / "serve.out", workdir / "serve.err"
        self._out, self._err = self.out_path.open("w"), self.err_path.open("w")
        env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamhydro", "serve", "--config", str(path)],
            cwd=workdir, env=env, stdout=self._out, stderr=self._err,
        )

    def log_tail(self) -> str:
        return f"serve stdout:\n{self.out_path.read_text()[-2000:]}\nserve stderr:\n{self.err_path.read_text()[-5000:]}"

    def metrics_url(self) -> str:
        found: list[str] = []

        def printed() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode}\n{self.log_tail()}")
            found.extend(re.findall(r"metrics at (\S+)", self.out_path.read_text()))
            return bool(found)

        wait_until(printed, START_SECONDS, lambda: f"serve printed no metrics URL\n{self.log_tail()}")
        return found[0]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._out.close()
            self._err.close()
        return code


@pytest.fixture
def topics(kafka_bootstrap: str, topic_name: str) -> dict[str, str]:
    names = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {names["input"]: 2, names["output"]: 1, names["dlq"]: 1})
    return names


def events(manifest, seed: int) -> list[bytes]:
    import numpy as np

    good = make_values(manifest, "json", GOOD, np.random.default_rng(seed))
    bad = [corrupt(good[i], JSON_BAD_KINDS[i % len(JSON_BAD_KINDS)], manifest) for i in range(BAD)]
    return good + bad


def test_prometheus_sees_rates_counts_lag_and_executor_histograms(
    kafka_bootstrap: str, topics: dict[str, str], model_registry, tmp_path: Path
) -> None:
    manifest = model_registry.get("iris_like", "latest").manifest
    serve = Serve(tmp_path, f"""
[spark]
master = "local[2]"
checkpoint_location = "{tmp_path / 'checkpoint'}"
trigger_interval = "0 seconds"

[kafka]
bootstrap_servers = "{kafka_bootstrap}"
subscribe = "{topics['input']}"
output_topic = "{topics['output']}"
dead_letter_topic = "{topics['dlq']}"
source = "python"
max_offsets_per_trigger = {PER_TRIGGER}

[model]
registry = "{model_registry.root}"
name = "iris_like"
version = "latest"

[inference]
providers = ["CPUExecutionProvider"]
batch_size = 500

[metrics]
host = "127.0.0.1"
port = 0
multiprocess_dir = "{tmp_path / 'metrics'}"
""")
    prometheus = None
    try:
        url = serve.metrics_url()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        prometheus = Prometheus(tmp_path, urllib.parse.urlparse(url).netloc)

        def explain(what: str, promql: str) -> Callable[[], str]:
            return lambda: (f"{what}: {promql} = {prometheus.query(promql)}\ntargets: {prometheus.targets_health()}\n"
                            f"{serve.log_tail()}")

        def eventually(what: str, promql: str, condition: Callable[[float], bool], seconds: float = FLOW_SECONDS) -> float:
            seen: list[float] = []

            def holds() -> bool:
                value = prometheus.query(promql)
                if value is not None and condition(value):
                    seen.append(value)
                    return True
                return False

            wait_until(holds, seconds, explain(what, promql))
            return seen[0]

        eventually("the driver is scraped", 'up{job="streamhydro-driver"}', lambda v: v == 1, 30)
        eventually("the model in use", 'streamhydro_model_info{model="iris_like",version="1"}', lambda v: v == 1, 30)
        # serve's warm-up job scores a made-up row per core while the query starts; it is not an event
        # and is not counted.
        eventually("the query started", 'sum(streamhydro_query_state{state=~"active|idle"})', lambda v: v == 1, START_SECONDS)

        total = GOOD + BAD
        for burst in (1, 2):
            started = time.monotonic()
            send(kafka_bootstrap, topics["input"], events(manifest, seed=burst))
            eventually(f"rows read (burst {burst})", "sum(streamhydro_input_rows_total)", lambda v: v >= burst * total)
            eventually(f"lag back to zero (burst {burst})", "sum(streamhydro_kafka_lag_records)", lambda v: v == 0)
            window = f"{int(time.monotonic() - started) + 2}s"
            assert prometheus.query(f"max(max_over_time(streamhydro_kafka_lag_records[{window}]))") > 0, "lag never rose"
            assert prometheus.query(f"max_over_time(sum(rate(streamhydro_input_rows_total[5s]))[{window}:1s])") > 0
            assert prometheus.query(f"max(max_over_time(streamhydro_processed_rows_per_second[{window}]))") > 0
            assert prometheus.query("sum(streamhydro_input_rows_total)") == burst * total
            eventually(f"rows scored (burst {burst})", "sum(streamhydro_inference_rows_total)", lambda v: v >= burst * GOOD)
            eventually(f"dead letters (burst {burst})", "sum(streamhydro_dead_letters_total)", lambda v: v >= burst * BAD)
            assert prometheus.query('sum(streamhydro_inference_rows_total{model="iris_like",version="1"})') == burst * GOOD
            assert prometheus.query("sum(streamhydro_dead_letters_total)") == burst * BAD

        batches = prometheus.query("sum(streamhydro_batches_total)")
        assert batches >= 2 * total / PER_TRIGGER
        assert prometheus.query("sum(streamhydro_batch_rows_count)") == batches
        assert prometheus.query(
            'histogram_quantile(0.99, sum by (le) (rate(streamhydro_batch_duration_seconds_bucket{phase="triggerExecution"}[2m])))'
        ) > 0
        for stage in ("read", "decode", "compute", "encode", "write"):
            assert prometheus.query(f'sum(streamhydro_inference_stage_duration_seconds_count{{stage="{stage}"}})') > 0, stage
        assert prometheus.query("sum(streamhydro_delivery_wait_seconds_count)") > 0
        assert prometheus.query(
            'histogram_quantile(0.5, sum by (le) (rate(streamhydro_inference_stage_duration_seconds_bucket{stage="compute"}[2m])))'
        ) > 0
        assert prometheus.query('sum(streamhydro_inference_batch_rows_count{device="cpu"})') > 0
        assert prometheus.query("count(streamhydro_dead_letters_total > 0)") >= 1
        assert prometheus.query("max(streamhydro_query_last_progress_age_seconds)") < 60
    finally:
        if prometheus is not None:
            prometheus.stop()
        code = serve.stop()
    assert code == 0, serve.log_tail()
