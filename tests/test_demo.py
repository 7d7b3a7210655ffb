"""``streamhydro demo`` as the README runs it: its own Apache Kafka, local Spark, the shipped model.

The last line is the JSON summary a newcomer reads: every event accounted for, the cold start, the
steady rate of the unthrottled events and the latency of the live phase that follows them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamhydro.driver.demo import LIVE_RATE, LIVE_SECONDS

REPO = Path(__file__).parent.parent
EVENTS = 20_000


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
def test_the_demo_scores_every_event_and_reports_rate_and_live_latency(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "SPARK_LOCAL_IP": "127.0.0.1"}
    done = subprocess.run(
        [sys.executable, "-m", "streamhydro", "--log-dir", str(tmp_path), "demo", "--events", str(EVENTS),
         "--bad-fraction", "0.01", "--metrics-port", "0"],
        capture_output=True, text=True, env=environment, cwd=REPO, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["events"] == EVENTS + LIVE_RATE * LIVE_SECONDS
    assert summary["predictions"] + summary["dead_letters"] == summary["events"]
    assert summary["dead_letters"] == summary["bad_sent"] > 0
    assert summary["broker"] == "kafka" and summary["connector"] in ("builtin", "python")
    assert summary["steady_events_per_s"] > 0 and summary["cold_start_s"] > 0
    assert summary["latency_rate_per_s"] == LIVE_RATE
    assert 0 < summary["latency_p50_ms"] <= summary["latency_p99_ms"]
    assert "lag" in done.stderr and "latency p50" in done.stderr, "the progress line shows lag and latency"

    # A quiet console: Spark's log4j lines, librdkafka's (%N|...) and Kafka's warnings went to the log file.
    console = done.stdout + done.stderr
    chatter = [line for line in console.splitlines() if re.search(r"\bWARN\b|^%\d\|", line)]
    assert chatter == [], chatter[:5]
    logged = (tmp_path / "streamhydro-demo.log").read_text(errors="replace")
    assert "Spark" in logged and str(tmp_path / "streamhydro-demo.log") in done.stderr


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
def test_the_demo_serves_a_users_skl2onnx_model_on_avro_events(tmp_path):
    """``demo --model MODEL.onnx --payload avro``: a scikit-learn pipeline the user converted with skl2onnx
    (a categorical string column, ZipMap probabilities) is added to a scratch registry and served."""
    import _converted_models

    model = tmp_path / "churn.onnx"
    model.write_bytes(_converted_models.sklearn_pipeline().onnx)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "SPARK_LOCAL_IP": "127.0.0.1"}
    done = subprocess.run(
        [sys.executable, "-m", "streamhydro", "--log-dir", str(tmp_path), "demo", "--model", str(model), "--payload", "avro",
         "--events", "2000", "--bad-fraction", "0.01", "--metrics-port", "0"],
        capture_output=True, text=True, env=environment, cwd=REPO, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["model"] == "churn:1"
    assert summary["predictions"] + summary["dead_letters"] == summary["events"] == 2000 + LIVE_RATE * LIVE_SECONDS
    assert summary["dead_letters"] == summary["bad_sent"] > 0
    assert "city    string" in done.stderr, "the demo shows how the model's inputs are mapped"
    prediction = json.loads(done.stderr.split("a prediction: ", 1)[1].splitlines()[0])
    assert set(prediction["prediction"]["scores"]) == {"high", "low", "mid"}
