"""Configuration of ``streamhydro train``: a TOML file, checked in full before Spark starts.

Runs on the driver, once per run. It is read with the serve configuration's loader
(:func:`streamhydro.config.build_sections`), so the same rules hold: unknown keys are errors with a
did-you-mean, any string may be ``"${NAME}"`` (the environment variable NAME, e.g. a JDBC
password), and any scalar key can be overridden by ``STREAMHYDRO_<SECTION>_<KEY>``, e.g.
``STREAMHYDRO_TRAINING_EPOCHS=5``. Secrets are masked in ``repr`` and never logged.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from streamhydro.config import Masked, MetricsSection, SparkSection, build_sections, doc, read_toml
from streamhydro.errors import ConfigError

FORMATS = ("parquet", "csv", "hive", "jdbc")
_INJECT = re.compile(r"^(\d+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    format: str = doc("Where the training data is: parquet | csv | hive | jdbc.", default="csv")
    path: str = doc("File or directory for parquet and csv (any path Spark reads: local, hdfs://, s3a://).", default="")
    table: str = doc("Hive table (db.table) for hive; table or '(SELECT ...) AS t' for jdbc.", default="")
    url: str = doc("JDBC URL for jdbc, e.g. jdbc:postgresql://host:5432/db or jdbc:mariadb://host:3306/db.", default="")
    user: str = doc("JDBC user; may be \"${PGUSER}\".", default="")
    password: str = doc("JDBC password; write \"${NAME}\" to take it from the environment. Never logged.", default="", repr=False)
    jars: tuple[str, ...] = doc(
        "JDBC driver jars; empty = Debian's /usr/share/java/postgresql.jar or mariadb-java-client.jar, chosen from the URL.",
        default=(),
    )
    options: Mapping[str, str] = doc("Extra reader options passed as is (e.g. fetchsize, numPartitions, header).", default_factory=Masked)
    features: tuple[str, ...] = doc("Feature columns, in the order the model takes them. Numeric.", default=())
    label: str = doc("Label column: an integer class index, or strings naming entries of data.labels.", default="label")
    labels: tuple[str, ...] = doc("Class names, in class-index order; the model outputs one score per entry.", default=())
    validation_fraction: float = doc("Share of rows held out for validation and the ONNX check.", default=0.2)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    name: str = doc("Model name in the registry.", default="model")
    registry: str = doc("Registry directory the model is published into (on the driver's filesystem).", default="models")
    hidden: tuple[int, ...] = doc("Widths of the MLP's hidden layers; its depth is their count.", default=(32, 16))
    description: str = doc("One line for the manifest.", default="")


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    ranks: int = doc("Number of trainer ranks (barrier tasks), each training on one partition.", default=2)
    epochs: int = doc("Passes over the training data.", default=30)
    batch_size: int = doc("Rows per step on each rank; the global batch is ranks * batch_size.", default=32)
    learning_rate: float = doc("Adam learning rate.", default=0.01)
    seed: int = doc("Seed for the split, initial weights and shuffling.", default=7)
    checkpoint_dir: str = doc(
        "Where ranks checkpoint every epoch (a directory per run). On a cluster: a path every executor sees.",
        default="var/checkpoints/train",
    )
    rebalance: bool = doc(
        "Shuffle the rows into training.ranks equal partitions. false keeps the source's partitions when there are "
        "exactly training.ranks of them (no shuffle; ranks then train on uneven shares).",
        default=True,
    )
    max_attempts: int = doc("Attempts of the barrier stage; a retry resumes from the last checkpoint.", default=3)
    timeout_seconds: int = doc(
        "How long a rank waits for the others (rendezvous, collectives, barrier()) before failing the stage.", default=300
    )
    slots_wait_seconds: int = doc("How long to wait for enough executors to register before refusing to start.", default=60)
    tolerance: float = doc("Largest allowed difference between ONNX Runtime and PyTorch scores.", default=1e-5)
    inject_failure: str = doc(
        "For testing retries: 'RANK:EPOCH' kills that rank's process at the start of that epoch, in the first attempt only.",
        default="",
    )


@dataclasses.dataclass(frozen=True)
class SparkSettings(SparkSection):
    master: str = doc(
        "Spark master; local[N] becomes local[N,F] so a failed barrier stage can be retried; empty = spark-submit's --master.",
        default="local[2]",
    )
    app_name: str = doc("Spark application name.", default="streamhydro-train")
    gpus_per_rank: int = doc(
        "GPUs each rank asks for through a ResourceProfile (stage-level scheduling): 1 = one GPU per rank, 0 = train "
        "on CPU. DDP trains one GPU per process; for more GPUs raise training.ranks.",
        default=0,
    )

    def gpus(self) -> tuple[str, float]:
        return "spark.gpus_per_rank", self.gpus_per_rank


@dataclasses.dataclass(frozen=True)
class MetricsSettings(MetricsSection):
    host: str = doc("Address a rank's endpoint binds when there is no Pushgateway.", default="127.0.0.1")
    port: int = doc("Port of rank 0's endpoint, rank r uses port + r; 0 = any free port (logged by each rank).", default=0)
    pushgateway: str = doc(
        "Pushgateway every rank pushes its training metrics to (host:port, reachable from the executors); "
        "empty = each rank serves its own endpoint while it trains.",
        default="",
    )

    def check(self, ports: int = 1) -> None:
        if self.pushgateway and not _is_host_port(self.pushgateway):
            raise ConfigError(
                "metrics.pushgateway", f"{self.pushgateway!r} is not host:port", 'e.g. "127.0.0.1:9091", or "" to serve from each rank'
            )
        super().check(ports)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    training: TrainingSettings = dataclasses.field(default_factory=TrainingSettings)
    spark: SparkSettings = dataclasses.field(default_factory=SparkSettings)
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)

    @property
    def injected_failure(self) -> tuple[int, int] | None:
        """(rank, epoch) from ``training.inject_failure``, or None."""
        match = _INJECT.match(self.training.inject_failure)
        return (int(match.group(1)), int(match.group(2))) if match else None

    def source_description(self) -> dict[str, str]:
        """Where the data came from, for the manifest: never the user or password."""
        d = self.data
        where = {"parquet": d.path, "csv": d.path, "hive": d.table, "jdbc": f"{d.url} {d.table}"}[d.format]
        return {"format": d.format, "location": where.strip()}


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Read the file, apply environment overrides, check every value."""
    environ = os.environ if environ is None else environ
    return from_mapping(read_toml(path), environ)


def from_mapping(raw: Mapping[str, Any], environ: Mapping[str, str]) -> TrainConfig:
    return _validated(TrainConfig(**build_sections(TrainConfig, raw, environ)))


def _validated(config: TrainConfig) -> TrainConfig:
    d, m, t, s = config.data, config.model, config.training, config.spark
    if d.format not in FORMATS:
        raise ConfigError("data.format", f"unknown format {d.format!r}", f"use one of {', '.join(FORMATS)}")
    if d.format in ("parquet", "csv") and not d.path:
        raise ConfigError("data.path", f"is empty while data.format is {d.format}", "give the file or directory to read")
    if d.format in ("hive", "jdbc") and not d.table:
        raise ConfigError("data.table", f"is empty while data.format is {d.format}", "give the table to read")
    if d.format == "jdbc" and not d.url.startswith("jdbc:"):
        raise ConfigError("data.url", f"{d.url!r} is not a JDBC URL", "e.g. jdbc:postgresql://127.0.0.1:5432/warehouse")
    if not d.features:
        raise ConfigError("data.features", "is empty", 'list the feature columns, e.g. ["age", "income"]')
    if len(set(d.features)) != len(d.features) or d.label in d.features:
        raise ConfigError("data.features", "names a column twice, or names the label", "list each feature column once, without data.label")
    if len(d.labels) < 2:
        raise ConfigError("data.labels", f"needs at least two classes, got {list(d.labels)}", 'e.g. ["negative", "positive"]')
    if not 0 < d.validation_fraction < 1:
        raise ConfigError("data.validation_fraction", f"must be between 0 and 1, got {d.validation_fraction}", "e.g. 0.2")
    if not m.name or "/" in m.name or m.name.startswith("."):
        raise ConfigError("model.name", f"{m.name!r} cannot name a registry directory", "use letters, digits, _ and -")
    if not m.hidden or min(m.hidden) < 1:
        raise ConfigError("model.hidden", f"{list(m.hidden)} is not a list of layer widths", "e.g. [32, 16]")
    for key, value, example in (
        ("training.ranks", t.ranks, 2),
        ("training.epochs", t.epochs, 30),
        ("training.batch_size", t.batch_size, 32),
        ("training.max_attempts", t.max_attempts, 3),
        ("training.timeout_seconds", t.timeout_seconds, 300),
    ):
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}", f"e.g. {example}")
    if t.learning_rate <= 0:
        raise ConfigError("training.learning_rate", f"must be > 0, got {t.learning_rate}", "e.g. 0.01")
    if t.inject_failure and not _INJECT.match(t.inject_failure):
        raise ConfigError("training.inject_failure", f"{t.inject_failure!r} is not RANK:EPOCH", 'e.g. "1:2", or "" for none')
    if config.injected_failure and config.injected_failure[0] >= t.ranks:
        raise ConfigError("training.inject_failure", f"rank {config.injected_failure[0]} does not exist with {t.ranks} ranks", "name a rank below training.ranks")
    if s.gpus_per_rank not in (0, 1):
        raise ConfigError(
            "spark.gpus_per_rank", f"must be 0 or 1, got {s.gpus_per_rank}: each rank is one DDP process on one GPU",
            f"set it to 1 and training.ranks to {t.ranks * max(s.gpus_per_rank, 1)} to use that many GPUs, or 0 for CPU",
        )
    s.check()
    config.metrics.check(ports=t.ranks)
    return config


def _is_host_port(address: str) -> bool:
    """``host:port``, optionally with an http:// or https:// scheme, as prometheus_client's push takes it."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = parts.port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port is not None and parts.path in ("", "/")
