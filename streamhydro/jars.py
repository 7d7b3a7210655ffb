"""JVM jars from Maven Central: Apache Kafka for the local broker, Spark's Kafka connector for ``serve``.

Runs on the driver machine: once at set-up (``streamhydro jars``, which ``deploy/bootstrap.sh`` runs),
and again only when a bundle is missing from the cache. Each :class:`Bundle` is a set of Maven
coordinates resolved with their runtime dependencies by ``mvn dependency:copy-dependencies`` into
``<cache>/<bundle name>/``; the folder is filled under a temporary name and renamed when complete, so
a half-resolved bundle is never used. The cache is ``$STREAMHYDRO_JAR_CACHE``, else
``~/.cache/streamhydro/jars``.

Spark's connector must match the running Spark exactly (it links against Spark internals), so its
version is pyspark's own. Jars that pyspark already ships (Scala, Hadoop client, slf4j...) are left
out of the connector bundle: two copies of one library on a classpath is how class conflicts start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamhydro.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "STREAMHYDRO_JAR_CACHE"
KAFKA_VERSION = "4.4.0"
# Kafka logs through slf4j 1.7; this binding routes it to the log4j2 that Kafka ships.
LOG4J_SLF4J = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.25.5")
_MVN_TIMEOUT_S = 900


@dataclass(frozen=True)
class Bundle:
    """Maven coordinates (group, artifact, version) resolved together into one cache folder."""

    name: str
    coordinates: tuple[tuple[str, str, str], ...]
    skip_pyspark_jars: bool = False


def kafka_broker() -> Bundle:
    """Apache Kafka's broker (KRaft), its tools (storage format) and a log binding."""
    return Bundle(f"kafka-{KAFKA_VERSION}", (("org.apache.kafka", "kafka_2.13", KAFKA_VERSION), LOG4J_SLF4J))


def spark_kafka_connector() -> Bundle:
    """``spark-sql-kafka-0-10`` for the installed pyspark, without the jars pyspark already has."""
    import pyspark

    version = pyspark.__version__
    return Bundle(
        f"spark-sql-kafka-{version}",
        (("org.apache.spark", "spark-sql-kafka-0-10_2.13", version),),
        skip_pyspark_jars=True,
    )


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamhydro" / "jars")


def cached(bundle: Bundle) -> list[Path] | None:
    """The bundle's jars when it was resolved before, else None. No network."""
    folder = cache_dir() / bundle.name
    jars = sorted(folder.glob("*.jar")) if folder.is_dir() else []
    return jars or None


def resolve(bundle: Bundle) -> list[Path]:
    """The bundle's jars, resolved from Maven Central into the cache when they are not there yet."""
    jars = cached(bundle)
    if jars is not None:
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ConfigError(
            "jars",
            f"{bundle.name} is not in {cache_dir()} and Maven (mvn) is not installed to fetch it",
            "install Maven (apt-get install maven) and run `streamhydro jars`, or copy the jars into that folder",
        )
    target = cache_dir() / bundle.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{bundle.name}-", dir=target.parent) as work:
        pom = Path(work) / "pom.xml"
        pom.write_text(_pom(bundle))
        out = Path(work) / "jars"
        log.info("resolving %s from Maven Central into %s", bundle.name, target)
        done = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={out}", "-DincludeScope=runtime"],
            capture_output=True,
            text=True,
            timeout=_MVN_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigError(
                "jars",
                f"Maven could not resolve {bundle.name} {[':'.join(c) for c in bundle.coordinates]}: "
                f"{(done.stdout + done.stderr).strip()[-1500:]}",
                "check that Maven Central is reachable; for Spark's connector the pyspark version must be published there",
            )
        if bundle.skip_pyspark_jars:
            _drop_pyspark_jars(out)
        out.rename(target)
    return resolve(bundle)


def _pom(bundle: Bundle) -> str:
    dependencies = "".join(
        f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in bundle.coordinates
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
        f"<groupId>streamhydro</groupId><artifactId>{bundle.name}</artifactId><version>1</version>"
        f"<dependencies>{dependencies}</dependencies></project>"
    )


def _artifact(jar: Path) -> str:
    """``kafka-clients-3.9.2.jar`` -> ``kafka-clients``: the name without its version."""
    parts = jar.stem.split("-")
    cut = next((i for i, part in enumerate(parts) if part[:1].isdigit()), len(parts))
    return "-".join(parts[:cut])


def _drop_pyspark_jars(folder: Path) -> None:
    import pyspark

    shipped = {_artifact(jar) for jar in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    for jar in folder.glob("*.jar"):
        if _artifact(jar) in shipped:
            jar.unlink()


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "jars",
        help="fetch the JVM jars (Apache Kafka, Spark's Kafka connector) into the cache",
        description="Resolve Apache Kafka (for `demo --broker kafka` and the tests) and Spark's Kafka connector "
        f"matching the installed pyspark from Maven Central into ${CACHE_ENV} (default ~/.cache/streamhydro/jars). "
        "Prints where they are as JSON.",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    found = {bundle.name: str(resolve(bundle)[0].parent) for bundle in (kafka_broker(), spark_kafka_connector())}
    print(json.dumps(found))
    return 0
