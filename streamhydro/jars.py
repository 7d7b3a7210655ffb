"""JVM jars from Maven Central: Apache Kafka for the local broker, Spark's Kafka connector for ``serve``,
Apicurio Registry for the tests' schema registry.

Runs on the driver machine: once at set-up (``streamhydro jars``, which ``deploy/bootstrap.sh`` runs),
and again only when a bundle is missing from the cache. Each :class:`Bundle` is a set of Maven
coordinates resolved with their runtime dependencies by ``mvn dependency:copy-dependencies`` into
``<cache>/<bundle name>/``; each :class:`QuarkusApp` is a Quarkus application that Maven builds
(``quarkus-maven-plugin``) into ``<cache>/<name>/``: its runner jar beside ``lib/``. Either folder is
filled under a temporary name and renamed when complete, so a half-made one is never used. The cache
is ``$STREAMHYDRO_JAR_CACHE``, else ``~/.cache/streamhydro/jars``.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamhydro.errors import ConfigError, StreamhydroError

log = logging.getLogger(__name__)

CACHE_ENV = "STREAMHYDRO_JAR_CACHE"
KAFKA_VERSION = "4.4.0"
# Kafka logs through slf4j 1.7; this binding routes it to the log4j2 that Kafka ships.
LOG4J_SLF4J = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.25.5")
# The newest Apicurio Registry whose whole dependency tree Maven Central serves: 2.5.x and later lack
# apicurio-registry-schema-util-provider there; 2.4.2 builds with Quarkus 2.16 and runs on Java 17.
APICURIO_VERSION = "2.4.2.Final"
APICURIO_QUARKUS_VERSION = "2.16.4.Final"
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


def kafka_tools() -> Bundle:
    """Apache Kafka's command-line tools (``kafka-consumer-groups``: ``ConsumerGroupCommand``), as operators run
    them; the tests act on a query's consumer group with them."""
    return Bundle(f"kafka-tools-{KAFKA_VERSION}", (("org.apache.kafka", "kafka-tools", KAFKA_VERSION), LOG4J_SLF4J))


def spark_kafka_connector() -> Bundle:
    """``spark-sql-kafka-0-10`` for the installed pyspark, without the jars pyspark already has."""
    import pyspark

    version = pyspark.__version__
    return Bundle(
        f"spark-sql-kafka-{version}",
        (("org.apache.spark", "spark-sql-kafka-0-10_2.13", version),),
        skip_pyspark_jars=True,
    )


@dataclass(frozen=True)
class QuarkusApp:
    """A Quarkus application built by Maven from ``pom`` (packaging ``legacy-jar``): ``<cache>/<name>/``
    holds its runner jar, which finds ``lib/`` beside it."""

    name: str
    pom: str


def apicurio_registry() -> QuarkusApp:
    """Apicurio Registry (in-memory H2 storage; Confluent-compatible API under ``/apis/ccompat/v7``).

    Maven Central has the application jar but no runnable build of it, so the pom below builds one,
    as Apicurio's own ``app`` module does: its parent POM is the BOM (the versions Apicurio tested), the
    application jar is indexed for CDI (it ships no Jandex index) and its ``application.properties``
    is the build's own. Two artifacts are not on Maven Central and are replaced: the JSON Schema library
    ``org.everit.json.schema`` (the same code is published as ``com.github.erosb:everit-json-schema``)
    and ``apicurio-common-app-components-config-index-deployment`` 0.1.18 (0.1.10 is taken, runtime and
    deployment alike).
    """
    return QuarkusApp(
        f"apicurio-registry-{APICURIO_VERSION}",
        f"""<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
  <groupId>streamhydro</groupId><artifactId>apicurio-registry</artifactId><version>{APICURIO_VERSION}</version>
  <properties><project.build.sourceEncoding>UTF-8</project.build.sourceEncoding></properties>
  <dependencyManagement><dependencies>
    <dependency><groupId>io.apicurio</groupId><artifactId>apicurio-common-app-components-config-index</artifactId><version>0.1.10.Final</version></dependency>
    <dependency><groupId>io.apicurio</groupId><artifactId>apicurio-registry</artifactId><version>{APICURIO_VERSION}</version><type>pom</type><scope>import</scope></dependency>
  </dependencies></dependencyManagement>
  <dependencies>
    <dependency><groupId>io.apicurio</groupId><artifactId>apicurio-registry-app</artifactId><version>{APICURIO_VERSION}</version>
      <exclusions><exclusion><groupId>com.github.everit-org.json-schema</groupId><artifactId>org.everit.json.schema</artifactId></exclusion></exclusions></dependency>
    <dependency><groupId>com.github.erosb</groupId><artifactId>everit-json-schema</artifactId><version>1.14.2</version></dependency>
  </dependencies>
  <build><plugins>
    <plugin><groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId><version>3.6.1</version>
      <executions><execution><id>application-properties</id><phase>generate-resources</phase><goals><goal>unpack</goal></goals>
        <configuration><artifactItems><artifactItem><groupId>io.apicurio</groupId><artifactId>apicurio-registry-app</artifactId><version>{APICURIO_VERSION}</version>
          <includes>application.properties</includes><outputDirectory>${{project.build.outputDirectory}}</outputDirectory></artifactItem></artifactItems></configuration>
      </execution></executions></plugin>
    <plugin><groupId>io.quarkus</groupId><artifactId>quarkus-maven-plugin</artifactId><version>{APICURIO_QUARKUS_VERSION}</version>
      <executions><execution><goals><goal>build</goal></goals></execution></executions>
      <configuration><properties>
        <quarkus.index-dependency.registry.group-id>io.apicurio</quarkus.index-dependency.registry.group-id>
        <quarkus.index-dependency.registry.artifact-id>apicurio-registry-app</quarkus.index-dependency.registry.artifact-id>
      </properties></configuration></plugin>
  </plugins></build>
</project>
""",
    )


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamhydro" / "jars")


def cached(bundle: Bundle | QuarkusApp) -> list[Path] | None:
    """The bundle's jars (an application's runner jar) when it was made before, else None. No network."""
    return _jars_in(cache_dir() / bundle.name)


def _jars_in(folder: Path) -> list[Path] | None:
    jars = sorted(folder.glob("*.jar")) if folder.is_dir() else []
    return jars or None


def resolve(bundle: Bundle) -> list[Path]:
    """The bundle's jars, resolved from Maven Central into the cache when they are not there yet."""

    def copy_dependencies(mvn: str, pom: Path, out: Path) -> list[str]:
        pom.write_text(_pom(bundle))
        return [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={out}", "-DincludeScope=runtime"]

    def keep(work: Path, out: Path) -> None:
        if bundle.skip_pyspark_jars:
            _drop_pyspark_jars(out)

    return _make(
        bundle.name,
        copy_dependencies,
        keep,
        f"Maven could not resolve {bundle.name} {[':'.join(c) for c in bundle.coordinates]}",
        "check that Maven Central is reachable; for Spark's connector the pyspark version must be published there",
    )


def build(app: QuarkusApp) -> Path:
    """The application's runner jar, built from Maven Central into the cache when it is not there yet."""

    def package(mvn: str, pom: Path, out: Path) -> list[str]:
        pom.write_text(app.pom)
        return [mvn, "-q", "-B", "-f", str(pom), "package", "-DskipTests"]

    def keep(work: Path, out: Path) -> None:
        target = work / "target"
        out.mkdir()
        (target / "lib").rename(out / "lib")
        for runner in target.glob("*-runner.jar"):
            runner.rename(out / runner.name)

    return _make(app.name, package, keep, f"Maven could not build {app.name}", "check that Maven Central is reachable")[0]


def _make(
    name: str,
    command: Callable[[str, Path, Path], list[str]],
    keep: Callable[[Path, Path], None],
    problem: str,
    fix: str,
) -> list[Path]:
    """Fill ``<cache>/<name>/`` once: run Maven's ``command(mvn, pom, out)`` in a temporary folder, let
    ``keep(work, out)`` put what stays into ``out``, then rename ``out`` into place."""
    target = cache_dir() / name
    jars = _jars_in(target)
    if jars is not None:
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ConfigError(
            "jars",
            f"{name} is not in {cache_dir()} and Maven (mvn) is not installed to fetch it",
            "install Maven (apt-get install maven) and run `streamhydro jars`, or copy the jars into that folder",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as work:
        out = Path(work) / "jars"
        log.info("fetching %s from Maven Central into %s", name, target)
        done = subprocess.run(
            command(mvn, Path(work) / "pom.xml", out),
            capture_output=True,
            text=True,
            timeout=_MVN_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise ConfigError("jars", f"{problem}: {(done.stdout + done.stderr).strip()[-1500:]}", fix)
        keep(Path(work), out)
        try:
            out.rename(target)
        except OSError:
            if _jars_in(target) is None:
                raise
            log.info("%s was filled meanwhile by another process; keeping that one", target)
    jars = _jars_in(target)
    if jars is None:
        raise ConfigError("jars", f"Maven left no jar in {target}", f"remove {target} and run `streamhydro jars` again")
    return jars


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
        help="fetch the JVM jars (Apache Kafka, Spark's Kafka connector, Apicurio Registry) and build the driver's class archive",
        description="Resolve Apache Kafka (for `demo --broker kafka` and the tests) and Spark's Kafka connector "
        "matching the installed pyspark from Maven Central, build Apicurio Registry (the tests' schema "
        "registry) from it, and build the driver JVM's class archive (a Spark session starts in half the time), "
        f"into ${CACHE_ENV} (default ~/.cache/streamhydro/jars). Prints where they are as JSON.",
    )
    parser.add_argument(
        "--without-registry", action="store_true",
        help="skip Apicurio Registry (only the tests start it; its first build takes minutes)",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from streamhydro.classes import build_archive

    found = {bundle.name: str(resolve(bundle)[0].parent) for bundle in (kafka_broker(), spark_kafka_connector())}
    if not args.without_registry:
        registry = apicurio_registry()
        found[registry.name] = str(build(registry).parent)
    try:
        found["class_archive"] = str(build_archive())
    except StreamhydroError as exc:  # an optimization: Spark starts without it, only slower
        log.warning("%s; Spark sessions start without a class archive", exc)
    print(json.dumps(found))
    return 0
