"""Metric names follow Prometheus conventions; deploy/'s Prometheus and Grafana files are valid
and reference only metrics streamhydro declares. Needs Debian's ``prometheus`` package (promtool)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from streamhydro.metrics.definitions import GPU_FAMILIES, DriverMetricSet, ExecutorMetricSet, TrainerMetricSet, declared_names

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "streamhydro-dashboard.json"
METRIC = re.compile(r"\bstreamhydro_[a-z0-9_]+\b")
UNITS = ("_seconds", "_bytes", "_rows", "_items", "_ratio", "_celsius", "_watts", "_records", "_per_second")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install prometheus)")
    return path


def families() -> list:
    registry = CollectorRegistry()
    DriverMetricSet(registry)
    ExecutorMetricSet(registry)
    TrainerMetricSet(registry)
    return list(registry.collect())


def test_each_group_declares_into_a_fresh_registry_twice() -> None:
    for _ in range(2):
        assert len(families()) > 20


def test_names_follow_prometheus_conventions() -> None:
    for family in families():
        assert family.name.startswith("streamhydro_"), family.name
        if family.type == "histogram":
            assert family.name.endswith(UNITS), f"{family.name}: a histogram needs a unit suffix"
        if family.type == "gauge" and not family.name.endswith("_info") and family.name not in ("streamhydro_query_state", "streamhydro_trainer_epoch",
                                                          "streamhydro_trainer_loss", "streamhydro_trainer_rank",
                                                          "streamhydro_trainer_ranks"):
            assert family.name.endswith(UNITS), f"{family.name}: a gauge needs a unit suffix"
        assert family.documentation, family.name
    for name, help_text in GPU_FAMILIES:
        assert name.startswith("streamhydro_gpu_") and name.endswith(UNITS) and help_text


def test_counter_samples_end_in_total() -> None:
    counters = [f for f in families() if f.type == "counter"]
    assert counters
    names = declared_names()
    for family in counters:
        assert f"{family.name}_total" in names


def referenced(text: str) -> set[str]:
    return set(METRIC.findall(text))


def test_alert_rules_reference_only_declared_metrics() -> None:
    used = referenced(RULES.read_text())
    assert {"streamhydro_kafka_lag_records", "streamhydro_query_state", "streamhydro_dead_letters_total",
            "streamhydro_gpu_memory_used_bytes"} <= used
    assert used - declared_names() == set()


def test_dashboard_references_only_declared_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = set().union(*(referenced(e) for e in exprs))
    for needed in ("streamhydro_input_rows_total", "streamhydro_inference_stage_duration_seconds_bucket",
                   "streamhydro_kafka_lag_records", "streamhydro_dead_letters_total", "streamhydro_gpu_utilization_ratio",
                   "streamhydro_gpu_memory_used_bytes", "streamhydro_model_info"):
        assert needed in used, needed
    assert used - declared_names() == set()


def test_the_reference_check_catches_a_typo() -> None:
    assert referenced("rate(streamhydro_input_row_total[1m])") - declared_names() == {"streamhydro_input_row_total"}


def test_promtool_accepts_the_scrape_config() -> None:
    result = subprocess.run([promtool(), "check", "config", str(CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 rules found" in result.stdout
