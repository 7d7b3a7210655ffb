"""Every call streamhydro makes into a private API of Spark, py4j or a library, behind small named wrappers.

Runs where its callers run: the driver (serve, demo, train) for the py4j and Spark wrappers, executor
Python workers and their daemon for :func:`prometheus_multiprocess_enabled` and :func:`run_python_daemon`.
Nothing is imported at module level beyond the standard library and :mod:`streamhydro.errors`, so the CLI can
import this module without pyspark.

These APIs are not promised to stay. :func:`check_versions`, called once at the start of ``serve``, ``train``
and the executor daemon, refuses library versions other than those the wrappers were verified with
(:data:`SUPPORTED`, the same bounds as ``pyproject.toml``), with an error that names the package and the pin.
``tests/test_internals.py`` has a test per wrapper that fails when an upgrade removes what it relies on.

What each one relies on (verified with pyspark 4.2.0, py4j 0.10.9.9, prometheus_client 0.26.0):

* :func:`started_by_spark_submit` -- ``PYSPARK_GATEWAY_PORT``, set by spark-submit for the Python driver
  it starts (read by ``pyspark.java_gateway``).
* :func:`attach_to_submitted_jvm` -- ``SparkContext._ensure_initialized()`` starts or joins the gateway
  to the JVM spark-submit launched (what pyspark's own entry points call).
* :func:`jvm` -- ``SparkContext._jvm``, the py4j ``JVMView`` of the driver JVM (a class attribute).
* :func:`load_jvm_class` -- :func:`jvm`, and the thread's context class loader, which holds ``spark.jars``.
* :func:`query_exception_chain` -- ``StreamingQuery._jsq``, the Java ``StreamingQuery`` (set by its
  ``__init__``), whose ``exception()`` is a Scala ``Option``.
* :func:`java_exception_of` -- py4j's ``Py4JJavaError.java_exception`` (public) and pyspark's
  ``CapturedException._origin`` (the Java throwable a captured exception was made from).
* :func:`max_concurrent_tasks` -- ``SparkContext._jsc`` (the ``JavaSparkContext``), the Scala
  ``SparkContext.maxNumConcurrentTasks(ResourceProfile)`` and ``resourceProfileManager()`` (both
  ``private[spark]``, public in the bytecode), and ``ResourceProfile._java_resource_profile``.
* :func:`prometheus_multiprocess_enabled` -- ``prometheus_client.values.ValueClass._multiprocess``,
  fixed when prometheus_client is imported (from ``PROMETHEUS_MULTIPROC_DIR``).
* :func:`run_python_daemon` -- ``pyspark.daemon.manager()``, the loop ``python -m pyspark.daemon`` runs;
  undocumented, but what ``spark.python.daemon.module`` expects a replacement module to end in.
* :func:`progress_as_json_listener` -- ``StreamingQueryListener._jlistener``, the Java listener that
  ``spark.streams.addListener`` and ``removeListener`` register and unregister; pyspark's
  ``JStreamingQueryListener`` (the py4j implementor of ``PythonStreamingQueryListener``, holding
  ``pylistener``) and the JVM class ``PythonStreamingQueryListenerWrapper``.
* :func:`read_checkpoint` -- Spark's checkpoint layout (``OffsetSeqLog``, ``CommitLog``, ``StreamMetadata``):
  ``metadata`` holds ``{"id": "<query id>"}``; ``offsets/<batch>`` is ``v1``, a line of batch metadata,
  then one line per source, that source's end offset of the batch as JSON (``-`` for none);
  ``commits/<batch>`` exists once the batch is committed. Read through the session's Hadoop FileSystem
  (``SparkContext._jsc.hadoopConfiguration()``; commons-io, which Spark ships, reads the bytes), so any
  checkpoint scheme works. :func:`offset_log_entry` is the pure parse.
* :data:`CHECKPOINT_FILE_MANAGER`, :data:`FILE_SYSTEM_CHECKPOINT_MANAGER` -- an internal SQL conf and a
  class name; the class moved from ``org.apache.spark.sql.execution.streaming`` to its
  ``checkpointing`` subpackage in Spark 4.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from streamhydro.errors import StreamhydroError

# Set by spark-submit for the Python driver it starts: the port of the JVM it launched first.
SPARK_SUBMIT_GATEWAY_PORT = "PYSPARK_GATEWAY_PORT"
# Spark's internal SQL conf that names the class writing checkpoint metadata files.
CHECKPOINT_FILE_MANAGER = "spark.sql.streaming.checkpointFileManagerClass"
# Hadoop FileSystem-based manager (streamhydro.spark.checkpoint_conf says why); Spark 4's package.
FILE_SYSTEM_CHECKPOINT_MANAGER = "org.apache.spark.sql.execution.streaming.checkpointing.FileSystemBasedCheckpointFileManager"


@dataclasses.dataclass(frozen=True)
class Supported:
    """Versions of ``package`` the wrappers were verified with: ``lowest`` up to, not including, ``below``."""

    package: str
    lowest: tuple[int, ...]
    below: tuple[int, ...]
    pin: str

    def allows(self, version: str) -> bool:
        return self.lowest <= release(version) < self.below


SUPPORTED = (
    Supported("pyspark", (4, 2), (4, 3), "pyspark==4.2.*"),
    # py4j is pinned exactly by pyspark's own requirements.
    Supported("prometheus_client", (0, 20), (0, 27), "prometheus-client>=0.20,<0.27"),
)


class UnsupportedVersionError(StreamhydroError):
    """An installed library is a version streamhydro's calls into its internals were not verified with."""

    def __init__(self, package: str, installed: str, supported: str, fix: str) -> None:
        self.package = package
        self.installed = installed
        self.supported = supported
        self.fix = fix
        super().__init__(
            f"{package} {installed} is installed, but streamhydro supports {package} {supported} (it relies on its "
            f"internals, see streamhydro/internals.py). Fix: {fix}"
        )


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: ``"4.2.0rc1"`` -> ``(4, 2, 0)``."""
    numbers = []
    for part in version.split("."):
        match = re.match(r"\d+", part)
        if match is None:
            break
        numbers.append(int(match.group()))
        if match.end() != len(part):
            break
    return tuple(numbers)


def installed_version(package: str) -> str | None:
    """The version of ``package`` that imports here: its distribution's, else its module's ``__version__``
    (pyspark from a Spark distribution's ``python/`` directory has no distribution metadata); None if absent."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        pass
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def check_versions(
    supported: Iterable[Supported] = SUPPORTED, installed: Callable[[str], str | None] = installed_version
) -> None:
    """Raise :class:`UnsupportedVersionError` for the first package whose installed version is not supported."""
    for entry in supported:
        version = installed(entry.package)
        if version is None or not entry.allows(version):
            bounds = f">={'.'.join(map(str, entry.lowest))},<{'.'.join(map(str, entry.below))}"
            raise UnsupportedVersionError(
                entry.package, version or "(not installed)", bounds, f"pip install '{entry.pin}'"
            )


def started_by_spark_submit() -> bool:
    """Whether spark-submit started this process (and a JVM for it to join)."""
    return SPARK_SUBMIT_GATEWAY_PORT in os.environ


def attach_to_submitted_jvm() -> None:
    """Connect this process to the JVM that spark-submit started (or start one), without a SparkContext."""
    from pyspark import SparkContext

    SparkContext._ensure_initialized()


def jvm(spark: Any) -> Any:
    """The py4j view of the driver JVM of a running session (``jvm(spark).java.lang.System``)."""
    return spark.sparkContext._jvm


def load_jvm_class(spark: Any, name: str) -> bool:
    """Whether the Java class ``name`` loads through the loader that holds ``spark.jars`` (as Spark's own)."""
    try:
        jvm(spark).java.lang.Thread.currentThread().getContextClassLoader().loadClass(name)
    except Exception:  # noqa: BLE001 -- py4j wraps ClassNotFoundException; any failure means "not there"
        return False
    return True


def query_exception_chain(query: Any) -> Any | None:
    """The Java ``StreamingQueryException`` a terminated query ended with, or None."""
    exception = query._jsq.exception()
    return exception.get() if exception.isDefined() else None


def java_exception_of(error: BaseException) -> Any | None:
    """The Java throwable behind a Python exception: py4j's ``Py4JJavaError`` or one PySpark captured
    from the JVM; None for a Python exception."""
    return getattr(error, "java_exception", None) or getattr(error, "_origin", None)


def max_concurrent_tasks(spark: Any, profile: Any | None) -> int:
    """How many tasks asking ``profile`` (a pyspark ``ResourceProfile``; None: the default profile) the
    cluster can run at once now."""
    context = spark.sparkContext._jsc.sc()
    java_profile = (
        profile._java_resource_profile if profile is not None else context.resourceProfileManager().defaultResourceProfile()
    )
    return int(context.maxNumConcurrentTasks(java_profile))


def progress_as_json_listener(listener: Any, on_progress_json: Callable[[str], None]) -> Any:
    """The Java listener for ``listener`` (a pyspark ``StreamingQueryListener``) that hands each progress event
    to ``on_progress_json`` as the progress' JSON text, one py4j call; pyspark's own conversion asks the JVM
    for every field of the progress (tens of calls). Other events go to ``listener`` as pyspark makes them.
    Return it from the listener's ``_jlistener``, made once per listener."""
    from pyspark import SparkContext
    from pyspark.sql.streaming.listener import JStreamingQueryListener

    class ProgressAsJson(JStreamingQueryListener):
        def onQueryProgress(self, jevent: Any) -> None:
            on_progress_json(jevent.progress().json())

    return SparkContext._jvm.PythonStreamingQueryListenerWrapper(ProgressAsJson(listener))


def prometheus_multiprocess_enabled() -> bool:
    """Whether prometheus_client chose multiprocess mode in this process (when it was first imported)."""
    from prometheus_client import values

    return bool(values.ValueClass._multiprocess)


def run_python_daemon() -> None:
    """Run PySpark's Python worker daemon loop in this process (forks a worker per connection)."""
    from pyspark import daemon

    daemon.manager()


# The offset and commit logs' format version, the first line of each file (Spark 2.1 to 4.2).
OFFSET_LOG_VERSION = "v1"


@dataclasses.dataclass(frozen=True)
class CheckpointLog:
    """What a streaming checkpoint says about its query's batches (:func:`read_checkpoint`).

    ``query_id``: from ``metadata`` (None when the query never started); ``offsets``: each retained
    planned batch's end offsets, per source (``None`` where a source has none), by batch id;
    ``committed``: the ids of the committed batches among the retained ones.
    """

    query_id: str | None
    offsets: dict[int, list[Any]]
    committed: frozenset[int]


class CheckpointFormatError(StreamhydroError):
    """A checkpoint file is not in the format this Spark version writes."""


def offset_log_entry(text: str, where: str = "offset log entry") -> list[Any]:
    """The sources' end offsets (parsed JSON, None for ``-``) in the text of an ``offsets/<batch>`` file."""
    lines = text.splitlines()
    if len(lines) < 2 or lines[0].strip() != OFFSET_LOG_VERSION:
        raise CheckpointFormatError(
            f"{where} starts with {lines[0][:20] if lines else ''!r}, not {OFFSET_LOG_VERSION!r}: a Spark version streamhydro "
            "does not know wrote this checkpoint"
        )
    return [None if line.strip() in ("", "-") else json.loads(line) for line in lines[2:]]


def read_checkpoint(spark: Any, location: str) -> CheckpointLog:
    """The query id, the offset log and the committed batches of the checkpoint at ``location`` (empty
    when there is none yet), through the session's Hadoop FileSystem."""
    hadoop = jvm(spark).org.apache.hadoop
    root = hadoop.fs.Path(location)
    fs = root.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())

    def text(path: Any) -> str:
        stream = fs.open(path)
        try:
            return bytes(jvm(spark).org.apache.commons.io.IOUtils.toByteArray(stream)).decode("utf-8")
        finally:
            stream.close()

    def batches(folder: str) -> dict[int, Any]:
        path = hadoop.fs.Path(root, folder)
        if not fs.exists(path):
            return {}
        return {int(s.getPath().getName()): s.getPath() for s in fs.listStatus(path) if s.getPath().getName().isdigit()}

    metadata = hadoop.fs.Path(root, "metadata")
    query_id = json.loads(text(metadata)).get("id") if fs.exists(metadata) else None
    offsets = {batch: offset_log_entry(text(path), f"{location}/offsets/{batch}") for batch, path in batches("offsets").items()}
    return CheckpointLog(query_id, offsets, frozenset(batches("commits")))
