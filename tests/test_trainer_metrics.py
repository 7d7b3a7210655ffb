"""The trainer's ``[metrics]``: the config section, and 2-rank training on real Spark that pushes every
rank's loss, epoch, samples/s and world size to a real Pushgateway (Debian's prometheus-pushgateway).

The Pushgateway fixture and the demo config come from the tests that own them
(``test_metrics_trainer.py``, ``test_trainer_spark.py``).
"""

from __future__ import annotations

import math

import pytest
from conftest import free_port, get, samples
from test_trainer_spark import demo_config

from streamhydro.errors import ConfigError
from streamhydro.metrics.trainer import DEFAULT_JOB
from streamhydro.registry import Registry
from streamhydro.trainer.launch import train

EPOCHS = 3


def test_metrics_default_to_a_served_endpoint_on_any_free_port(tmp_path):
    metrics = demo_config(tmp_path).metrics
    assert (metrics.pushgateway, metrics.host, metrics.port) == ("", "127.0.0.1", 0)


def test_metrics_come_from_the_environment(tmp_path):
    metrics = demo_config(tmp_path, metrics_pushgateway="gateway.example:9091", metrics_port="9200").metrics
    assert (metrics.pushgateway, metrics.port) == ("gateway.example:9091", 9200)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"metrics_pushgateway": "gateway.example"}, "metrics.pushgateway"),
        ({"metrics_pushgateway": "ftp://gateway.example:9091"}, "metrics.pushgateway"),
        ({"metrics_pushgateway": "gateway.example:99999"}, "metrics.pushgateway"),
        ({"metrics_host": ""}, "metrics.host"),
        ({"metrics_port": "65535"}, "metrics.port"),
        ({"metrics_port": "-1"}, "metrics.port"),
    ],
)
def test_bad_metrics_settings_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as err:
        demo_config(tmp_path, **overrides)
    assert err.value.key == key


def test_an_http_pushgateway_url_is_accepted(tmp_path):
    assert demo_config(tmp_path, metrics_pushgateway="https://gateway.example:9091").metrics.pushgateway == "https://gateway.example:9091"


@pytest.mark.spark
@pytest.mark.slow
def test_every_rank_pushes_loss_epoch_samples_per_second_and_ranks(spark, tmp_path, pushgateway):
    config = demo_config(tmp_path, metrics_pushgateway=pushgateway, training_epochs=str(EPOCHS))
    result = train(spark, config, command="test")

    by_rank: dict[str, dict[str, float]] = {}
    for s in samples(get(f"http://{pushgateway}/metrics")):
        if s.labels.get("job") == DEFAULT_JOB and s.name.startswith("streamhydro_trainer_"):
            by_rank.setdefault(s.labels["rank"], {})[s.name] = s.value
    assert set(by_rank) == {"0", "1"}
    steps = result.report["steps_per_epoch"]
    for rank, values in by_rank.items():
        assert values["streamhydro_trainer_rank"] == int(rank)
        assert values["streamhydro_trainer_ranks"] == 2
        assert values["streamhydro_trainer_epoch"] == EPOCHS
        assert values["streamhydro_trainer_steps_total"] == EPOCHS * steps
        assert values["streamhydro_trainer_samples_total"] == EPOCHS * steps * config.training.batch_size
        assert values["streamhydro_trainer_samples_per_second"] > 0
        assert math.isfinite(values["streamhydro_trainer_loss"]) and values["streamhydro_trainer_loss"] > 0
    assert by_rank["0"]["streamhydro_trainer_loss"] != by_rank["1"]["streamhydro_trainer_loss"], "each rank reports its own loss"


@pytest.mark.spark
@pytest.mark.slow
def test_an_unreachable_pushgateway_does_not_fail_training(spark, tmp_path):
    config = demo_config(tmp_path, metrics_pushgateway=f"127.0.0.1:{free_port()}", training_epochs="1")
    result = train(spark, config, command="test")
    assert result.report["epochs"] == 1
    assert Registry(config.model.registry).versions("breast_cancer") == [1]
