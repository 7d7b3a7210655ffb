"""Spark's built-in Kafka connector for ``serve``: records come from Spark's JVM Kafka source into ``mapInArrow``
(:mod:`streamhydro.executor.scoring`) and go to Spark's JVM Kafka sink. Runs on the driver."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from streamhydro.driver.connectors import Batch, ServeConnector
from streamhydro.errors import ConfigError
from streamhydro.internals import jvm, load_jvm_class

log = logging.getLogger(__name__)

FORMAT = "kafka"
PROVIDER = "org.apache.spark.sql.kafka010.KafkaSourceProvider"
KAFKA_PACKAGE = "org.apache.spark:spark-sql-kafka-0-10_2.13:<your Spark version>"
# Spark settings that put jars on the classpath: the connector may already be there through them.
JARS = "spark.jars"
PACKAGES = "spark.jars.packages"


class BuiltinConnector(ServeConnector):
    described = "Spark's built-in"

    def spark_conf(self, conf: Mapping[str, str]) -> dict[str, str]:
        return connector_conf(conf)

    def check(self, spark: Any) -> None:
        """The connector must be on the classpath, and the ``kafka.*`` client settings must be ones the Java
        client knows: the connector would otherwise ignore them without a word."""
        from streamhydro.kafka.options import check_jvm_options

        if not load_jvm_class(spark, PROVIDER):
            raise ConfigError(
                "kafka.source",
                "Spark's built-in Kafka connector is not on the classpath",
                f"run `streamhydro jars`, start Spark with --packages {KAFKA_PACKAGE}, or set source = \"python\"",
            )
        check_jvm_options(self.config.kafka.client_options(), _java_client_settings(spark))
        log.info("Kafka connector: Spark's built-in (JVM)")

    def stream(self, spark: Any) -> Any:
        return spark.readStream.format(FORMAT).options(**self.config.kafka.source_options()).load()

    def process(self, batch: Batch) -> None:
        from streamhydro.executor.scoring import OUTPUT_SCHEMA, score_batches

        scored = batch.frame.mapInArrow(score_batches(batch.plan), OUTPUT_SCHEMA, profile=batch.profile)
        scored.write.format(FORMAT).mode("append").options(**self.config.kafka.client_options()).save()
        return None


def connector_conf(conf: Mapping[str, str]) -> dict[str, str]:
    """``spark.jars`` with Spark's Kafka connector (resolved from Maven when the jar cache lacks it); nothing
    when ``conf`` already brings the connector."""
    from streamhydro import jars

    if "spark-sql-kafka" in conf.get(JARS, "") + conf.get(PACKAGES, ""):
        return {}
    found = jars.resolve(jars.spark_kafka_connector())
    return {JARS: ",".join(filter(None, [conf.get(JARS, ""), *map(str, found)]))}


def _java_client_settings(spark: Any) -> set[str]:
    """Every setting name the Java Kafka consumer, producer and admin client know."""
    clients = jvm(spark).org.apache.kafka.clients
    names: set[str] = set()
    for config in (clients.consumer.ConsumerConfig, clients.producer.ProducerConfig, clients.admin.AdminClientConfig):
        names.update(config.configNames())
    return names
