"""A class-data-sharing archive of the driver JVM's classes: a Spark session starts in about 4 s instead of 7.

Runs on the driver. Most of a local Spark driver's start (JVM, SparkContext, the SQL session) is the JVM
loading and verifying some ten thousand classes from pyspark's jars. Java's AppCDS keeps them, already
parsed and verified, in an archive file the JVM maps at start. :func:`build_archive` makes it once per
pyspark and Java installation (``streamhydro jars``, which ``deploy/bootstrap.sh`` runs at install), from a
short session that runs a SQL query, a Python UDF and a streaming micro-batch, into the jar cache (one
file, ~160 MB, per pyspark installation and Java);
:func:`sharing_conf` hands it to every driver JVM that PySpark starts (``local`` and client-mode masters, not
spark-submit, whose JVM starts before Python). The JVM checks the archive against its own build and class
path and ignores, without a word, one that does not match, so a stale archive costs start time, never
correctness. Measured on the 2-core machine: session 6.7-7.4 s -> 4.1-4.4 s; first query 2.5 s -> 1.3 s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from streamhydro.errors import StreamhydroError

log = logging.getLogger(__name__)

DRIVER_JAVA_OPTIONS = "spark.driver.extraJavaOptions"
# Quiet: a missing or mismatched archive is the JVM's business, not the console's.
_QUIET = "-Xshare:auto -Xlog:cds=off -Xlog:cds+dynamic=off"
_BUILD_TIMEOUT_S = 300

# The session that fills the archive: what serve's driver loads before its first prediction.
_WORKLOAD = """
import time
from pyspark.sql import SparkSession
from streamhydro.spark import STREAMING_CONF
builder = SparkSession.builder.master("local[1]").appName("streamhydro-class-archive")
for key, value in STREAMING_CONF.items():
    builder = builder.config(key, value)
spark = builder.getOrCreate()
spark.range(100).selectExpr("id * 2 AS x").groupBy().sum("x").collect()
spark.range(10).mapInArrow(lambda batches: batches, "id long").count()
query = spark.readStream.format("rate").load().writeStream.foreachBatch(lambda frame, batch: frame.count()).start()
deadline = time.monotonic() + 60
while query.lastProgress is None and time.monotonic() < deadline:
    time.sleep(0.2)
query.stop()
process = spark.sparkContext._gateway.proc
spark.stop()
process.stdin.close()  # PySpark's gateway JVM exits when its stdin closes, and writes the archive as it exits
process.wait(60)
"""


def archive_path() -> Path:
    """Where the archive for this pyspark installation (its jars are the JVM's class path) and this Java
    binary (its path and modification time) lives, in the jar cache."""
    import pyspark

    from streamhydro import jars
    from streamhydro.brokers.process import java_binary

    java = Path(os.path.realpath(java_binary()))
    built = java.stat().st_mtime_ns if java.exists() else 0  # a Java upgraded in place gets an archive of its own
    key = hashlib.sha256(f"{java}\0{built}\0{Path(pyspark.__file__).resolve().parent}".encode()).hexdigest()[:12]
    return jars.cache_dir() / f"spark-{pyspark.__version__}-{key}.jsa"


def sharing_conf(conf: Mapping[str, str]) -> dict[str, str]:
    """The driver JVM option that maps the archive, after the user's own options, where the archive exists
    (none where the user's options name an archive of their own)."""
    path = archive_path()
    if not path.is_file() or "SharedArchiveFile" in conf.get(DRIVER_JAVA_OPTIONS, ""):
        return {}
    return {DRIVER_JAVA_OPTIONS: " ".join(filter(None, [conf.get(DRIVER_JAVA_OPTIONS, ""), f"-XX:SharedArchiveFile={path}", _QUIET]))}


def build_archive(force: bool = False) -> Path:
    """Make the archive (about 20 s) unless it exists; returns its path. Written beside its place and
    renamed, so a JVM starting meanwhile sees none or a whole one."""
    path = archive_path()
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    env = {
        **os.environ,
        "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable),
        "PYSPARK_SUBMIT_ARGS": f"--driver-java-options '-XX:ArchiveClassesAtExit={partial} -Xlog:cds=off -Xlog:cds+dynamic=off' pyspark-shell",
    }
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _WORKLOAD], env=env, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise StreamhydroError(f"building the JVM class archive failed (exit {done.returncode}): {done.stderr[-2000:]}")
    partial.replace(path)
    log.info("JVM class archive %s built in %.1f s (%d MB)", path, time.monotonic() - started, path.stat().st_size // 2**20)
    return path
