"""Trainer metrics: pushed to a real Pushgateway (Debian's prometheus-pushgateway), or served by the rank."""

from __future__ import annotations

import pytest

from conftest import free_port, get, samples
from streamhydro.metrics.trainer import DEFAULT_JOB, TrainerReporter


def test_ranks_push_to_the_pushgateway_without_overwriting_each_other(pushgateway: str) -> None:
    for rank in range(2):
        with TrainerReporter(rank, 2, pushgateway=pushgateway) as report:
            assert report.url is None
            for step in range(3):
                report.step(loss=1.0 / (step + 1 + rank), samples=32)
            report.epoch_end(0, samples_per_second=1000.0 + rank)
    pushed = [s for s in samples(get(f"http://{pushgateway}/metrics")) if s.labels.get("job") == DEFAULT_JOB]
    by_rank = {}
    for s in pushed:
        by_rank.setdefault(s.labels["rank"], {})[s.name] = s.value
    assert set(by_rank) == {"0", "1"}
    assert by_rank["0"]["streamhydro_trainer_samples_total"] == 96
    assert by_rank["1"]["streamhydro_trainer_samples_per_second"] == 1001.0
    assert by_rank["1"]["streamhydro_trainer_loss"] == pytest.approx(1 / 4)
    assert by_rank["0"]["streamhydro_trainer_ranks"] == 2
    assert by_rank["1"]["streamhydro_trainer_steps_total"] == 3


def test_an_unreachable_pushgateway_does_not_stop_training(caplog: pytest.LogCaptureFixture) -> None:
    with TrainerReporter(0, 1, pushgateway=f"127.0.0.1:{free_port()}") as report:
        report.step(loss=0.5, samples=8)
        report.epoch_end(0, samples_per_second=10.0)
    assert any("could not push" in r.getMessage() for r in caplog.records)


def test_without_a_pushgateway_each_rank_serves_while_training() -> None:
    reports = [TrainerReporter(rank, 2, port=0) for rank in range(2)]
    try:
        for rank, report in enumerate(reports):
            report.step(loss=0.25, samples=16)
            report.epoch_end(3, samples_per_second=500.0)
        values = [{s.name: s.value for s in samples(get(r.url))} for r in reports]
    finally:
        for report in reports:
            report.close()
    assert reports[0].url != reports[1].url
    assert [v["streamhydro_trainer_rank"] for v in values] == [0, 1]
    assert all(v["streamhydro_trainer_epoch"] == 3 and v["streamhydro_trainer_samples_total"] == 16 for v in values)
