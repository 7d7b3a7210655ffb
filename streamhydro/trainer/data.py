"""Reading the training data with Spark. Runs on the driver, once per run; the rows themselves are
read by executors and reach the trainer ranks partition by partition, never through the driver.

:func:`read` turns any supported source into one DataFrame, and :func:`prepare` gives it the shape
every rank expects. No job runs here beyond what the source needs to know its schema: the rows are
read once, by the barrier stage, and the ranks compute the feature statistics and check the class
indexes themselves (:mod:`streamhydro.trainer.rank.statistics`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from streamhydro.errors import ConfigError
from streamhydro.trainer.config import DataSettings

log = logging.getLogger(__name__)

LABEL = "_label"
HOLDOUT = "_holdout"

# Debian's JDBC drivers (libpostgresql-jdbc-java, libmariadb-java), by URL prefix.
JDBC_DRIVERS = {
    "jdbc:postgresql:": ("/usr/share/java/postgresql.jar", "org.postgresql.Driver"),
    "jdbc:mariadb:": ("/usr/share/java/mariadb-java-client.jar", "org.mariadb.jdbc.Driver"),
    "jdbc:mysql:": ("/usr/share/java/mariadb-java-client.jar", "org.mariadb.jdbc.Driver"),
}


def jdbc_jars(settings: DataSettings) -> tuple[str, ...]:
    """The jars the session needs on its classpath (``spark.jars``) to read ``settings``."""
    if settings.format != "jdbc":
        return ()
    if settings.jars:
        jars = settings.jars
    else:
        match = [jar for prefix, (jar, _) in JDBC_DRIVERS.items() if settings.url.startswith(prefix)]
        if not match:
            raise ConfigError("data.jars", f"no default driver for {settings.url.split('//')[0]}", "list the JDBC driver's jar in data.jars")
        jars = (match[0],)
    for jar in jars:
        if not Path(jar).is_file():
            raise ConfigError(
                "data.jars",
                f"JDBC driver {jar} does not exist",
                "install it (Debian: apt-get install libpostgresql-jdbc-java or libmariadb-java) or point data.jars at it",
            )
    return jars


def read(spark: SparkSession, settings: DataSettings) -> DataFrame:
    """The source as a DataFrame, as Spark reads it. Credentials go to the reader, not to logs."""
    options = dict(settings.options)
    if settings.format == "parquet":
        return spark.read.options(**options).parquet(settings.path)
    if settings.format == "csv":
        options = {"header": "true", "inferSchema": "true", **options}
        return spark.read.options(**options).csv(settings.path)
    if settings.format == "hive":
        return spark.table(settings.table)
    reader = spark.read.format("jdbc").option("url", settings.url).option("dbtable", settings.table)
    driver = next((cls for prefix, (_, cls) in JDBC_DRIVERS.items() if settings.url.startswith(prefix)), None)
    if driver:
        reader = reader.option("driver", driver)
    if settings.user:
        reader = reader.option("user", settings.user)
    if settings.password:
        reader = reader.option("password", settings.password)
    return reader.options(**options).load()


def prepare(frame: DataFrame, settings: DataSettings, seed: int) -> DataFrame:
    """Features as float32 in configured order, the class index, the held-out flag; rows with a
    null anywhere in those columns are dropped."""
    missing = [c for c in (*settings.features, settings.label) if c not in frame.columns]
    if missing:
        raise ConfigError(
            "data.features" if settings.label not in missing else "data.label",
            f"columns {missing} are not in the data, which has {frame.columns}",
            "name columns that exist (names are case-sensitive)",
        )
    numeric = (T.NumericType, T.BooleanType)
    for name in settings.features:
        if not isinstance(frame.schema[name].dataType, numeric):
            raise ConfigError("data.features", f"column {name!r} is {frame.schema[name].dataType.simpleString()}, not numeric", "list numeric columns only")
    return (
        frame.select(
            *[F.col(f).cast("float").alias(f) for f in settings.features],
            _class_index(frame, settings).alias(LABEL),
            _holdout(settings, seed).alias(HOLDOUT),
        )
        .na.drop()
    )


def _holdout(settings: DataSettings, seed: int) -> Column:
    """A hash of the row's values, not a random draw: the same rows are held out however the
    source is partitioned or ordered, in every job that reads it and in every stage attempt."""
    bucket = F.pmod(F.xxhash64(F.lit(seed), *[F.col(c) for c in (*settings.features, settings.label)]), F.lit(10_000))
    return bucket < F.lit(round(settings.validation_fraction * 10_000))


def _class_index(frame: DataFrame, settings: DataSettings) -> Column:
    label = F.col(settings.label)
    if isinstance(frame.schema[settings.label].dataType, T.StringType):
        known = F.array(*[F.lit(name) for name in settings.labels])
        return (F.array_position(known, label) - 1).cast("int")
    return label.cast("int")
