"""streamhydro.internals: each wrapper against the installed library, and the version check. Pure: no Spark
started. A test here that fails after an upgrade names the internal that moved."""

from __future__ import annotations

import inspect
import zipfile
from pathlib import Path

import pytest

from streamhydro import internals
from streamhydro.internals import SUPPORTED, UnsupportedVersionError, check_versions, release


def _jar_class(artifact: str, class_name: str) -> bytes:
    """The bytes of ``class_name`` in the jar of ``artifact`` that pyspark ships."""
    import pyspark

    jars = sorted((Path(pyspark.__file__).parent / "jars").glob(f"{artifact}_*.jar"))
    assert jars, f"pyspark ships no {artifact} jar"
    with zipfile.ZipFile(jars[0]) as jar:
        return jar.read(class_name.replace(".", "/") + ".class")


class _Option:
    def __init__(self, value: object | None) -> None:
        self.value = value

    def isDefined(self) -> bool:  # noqa: N802 -- Scala's name
        return self.value is not None

    def get(self) -> object:
        return self.value


# --- the version check -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "numbers"), [("4.2.0", (4, 2, 0)), ("4.2.0rc1", (4, 2, 0)), ("0.26.0.dev3", (0, 26, 0)), ("4", (4,))])
def test_release_numbers_of_a_version(text, numbers):
    assert release(text) == numbers


def test_the_installed_versions_are_supported():
    check_versions()


def test_a_package_without_distribution_metadata_is_known_by_its_module_version(monkeypatch):
    import importlib.metadata

    import pyspark

    def missing(package):
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert internals.installed_version("pyspark") == pyspark.__version__
    assert internals.installed_version("no_such_package_here") is None


def test_an_other_minor_version_of_pyspark_is_refused_naming_package_versions_and_pin():
    versions = {"pyspark": "4.3.0", "prometheus_client": "0.26.0"}
    with pytest.raises(UnsupportedVersionError) as raised:
        check_versions(installed=versions.get)
    error = raised.value
    assert (error.package, error.installed, error.supported) == ("pyspark", "4.3.0", ">=4.2,<4.3")
    assert "pip install 'pyspark==4.2.*'" in str(error)


@pytest.mark.parametrize("version", ["0.19.0", "0.27.1", None])
def test_prometheus_client_outside_its_verified_range_or_missing_is_refused(version):
    versions = {"pyspark": "4.2.1", "prometheus_client": version}
    with pytest.raises(UnsupportedVersionError, match="prometheus_client"):
        check_versions(installed=versions.get)


def test_supported_bounds_agree_with_pyproject():
    """pyproject's requirements admit only what check_versions does, so a fresh install passes its own check."""
    import re
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    requirements = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].replace("-", "_"): r for r in pyproject["project"]["dependencies"]}
    for entry in SUPPORTED:
        bounds = re.findall(r"(==|>=|<)\s*([\d.]+)", requirements[entry.package])
        assert bounds, requirements[entry.package]
        for operator, version in bounds:
            if operator == "==":
                assert entry.allows(version), (entry, version)
            else:
                assert release(version) == (entry.lowest if operator == ">=" else entry.below), (entry, operator, version)


# --- pyspark, driver side ------------------------------------------------------------------------------


def test_started_by_spark_submit_reads_the_variable_pyspark_joins_the_jvm_by(monkeypatch):
    from pyspark import java_gateway

    assert f'"{internals.SPARK_SUBMIT_GATEWAY_PORT}"' in inspect.getsource(java_gateway)
    monkeypatch.setenv(internals.SPARK_SUBMIT_GATEWAY_PORT, "40123")
    assert internals.started_by_spark_submit()
    monkeypatch.delenv(internals.SPARK_SUBMIT_GATEWAY_PORT)
    assert not internals.started_by_spark_submit()


def test_attach_to_submitted_jvm_relies_on_spark_context_ensure_initialized():
    from pyspark import SparkContext

    parameters = inspect.signature(SparkContext._ensure_initialized).parameters
    assert all(p.default is not inspect.Parameter.empty for p in parameters.values())


def test_jvm_is_the_spark_context_class_attribute():
    from pyspark import SparkContext

    assert "_jvm" in SparkContext.__annotations__

    class Session:
        sparkContext = SparkContext

    assert internals.jvm(Session()) is SparkContext._jvm


def test_load_jvm_class_asks_the_context_class_loader_and_says_no_when_it_throws():
    loaded = []

    class Loader:
        def loadClass(self, name):  # noqa: N802
            if name != "a.B":
                raise RuntimeError("ClassNotFoundException")
            loaded.append(name)

    class Thread:
        @staticmethod
        def currentThread():  # noqa: N802
            return Thread

        @staticmethod
        def getContextClassLoader():  # noqa: N802
            return Loader()

    class Jvm:
        class java:  # noqa: N801
            class lang:  # noqa: N801
                pass

    Jvm.java.lang.Thread = Thread

    class Session:
        class sparkContext:  # noqa: N801
            _jvm = Jvm

    assert internals.load_jvm_class(Session(), "a.B") and loaded == ["a.B"]
    assert not internals.load_jvm_class(Session(), "a.C")


def test_query_exception_chain_reads_the_java_query_of_a_streaming_query():
    from pyspark.sql.streaming.query import StreamingQuery

    failure = object()

    class JavaQuery:
        def __init__(self, exception):
            self._exception = exception

        def exception(self):
            return _Option(self._exception)

    assert internals.query_exception_chain(StreamingQuery(JavaQuery(failure))) is failure
    assert internals.query_exception_chain(StreamingQuery(JavaQuery(None))) is None


def test_java_exception_of_py4j_and_captured_errors():
    from py4j.protocol import Py4JJavaError
    from pyspark.errors.exceptions.captured import CapturedException

    class Throwable:
        _target_id = "o7"

    java = Throwable()
    assert internals.java_exception_of(Py4JJavaError("o1.collect", java)) is java
    # A CapturedException is made from a live JVM; its constructor is what keeps the throwable as _origin.
    assert "self._origin = origin" in inspect.getsource(CapturedException.__init__)
    captured = CapturedException.__new__(CapturedException)
    captured._origin = java
    assert internals.java_exception_of(captured) is java
    assert internals.java_exception_of(ValueError("python")) is None


def test_max_concurrent_tasks_relies_on_private_spark_context_methods():
    core = _jar_class("spark-core", "org.apache.spark.SparkContext")
    assert b"maxNumConcurrentTasks" in core and b"resourceProfileManager" in core
    from pyspark import SparkContext
    from pyspark.resource import ResourceProfile

    assert "self._jsc = " in inspect.getsource(SparkContext)
    java_profile = object()
    assert ResourceProfile(_java_resource_profile=java_profile)._java_resource_profile is java_profile

    asked = []

    class Scala:
        def resourceProfileManager(self):  # noqa: N802
            return self

        def defaultResourceProfile(self):  # noqa: N802
            return "default"

        def maxNumConcurrentTasks(self, profile):  # noqa: N802
            asked.append(profile)
            return 3

    class Session:
        class sparkContext:  # noqa: N801
            class _jsc:  # noqa: N801
                sc = staticmethod(Scala)

    assert internals.max_concurrent_tasks(Session(), None) == 3
    assert internals.max_concurrent_tasks(Session(), ResourceProfile(_java_resource_profile=java_profile)) == 3
    assert asked == ["default", java_profile]


def test_the_checkpoint_file_manager_conf_and_class_exist_in_spark():
    conf = _jar_class("spark-catalyst", "org.apache.spark.sql.internal.SQLConf$")
    assert internals.CHECKPOINT_FILE_MANAGER.encode() in conf
    _jar_class("spark-sql", internals.FILE_SYSTEM_CHECKPOINT_MANAGER)


# --- executor side -------------------------------------------------------------------------------------


def test_prometheus_multiprocess_flag_is_on_the_value_class(monkeypatch):
    from prometheus_client import values

    assert hasattr(values.ValueClass, "_multiprocess")
    assert hasattr(values.MultiProcessValue(), "_multiprocess")
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    assert internals.prometheus_multiprocess_enabled()
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    assert not internals.prometheus_multiprocess_enabled()


def test_progress_as_json_listener_relies_on_the_java_listener_pyspark_registers(monkeypatch):
    from pyspark import SparkContext
    from pyspark.sql.streaming import listener, query

    assert isinstance(inspect.getattr_static(listener.StreamingQueryListener, "_jlistener"), property)
    for method in (query.StreamingQueryManager.addListener, query.StreamingQueryManager.removeListener):
        assert "listener._jlistener" in inspect.getsource(method)
    assert "org.apache.spark.sql.streaming.PythonStreamingQueryListener" in listener.JStreamingQueryListener.Java.implements
    assert _jar_class("spark-sql-api", "org.apache.spark.sql.streaming.PythonStreamingQueryListenerWrapper")

    class FakeJvm:
        def PythonStreamingQueryListenerWrapper(self, implementor):  # noqa: N802 -- the JVM class's name
            return implementor

    class Progress:
        def json(self) -> str:
            return '{"batchId": 3}'

    class Event:
        def progress(self) -> Progress:
            return Progress()

    seen = []
    monkeypatch.setattr(SparkContext, "_jvm", FakeJvm())
    python_listener = object()
    java_listener = internals.progress_as_json_listener(python_listener, seen.append)
    assert isinstance(java_listener, listener.JStreamingQueryListener) and java_listener.pylistener is python_listener
    java_listener.onQueryProgress(Event())
    assert seen == ['{"batchId": 3}']


def test_run_python_daemon_relies_on_pyspark_daemon_manager():
    from pyspark import daemon

    assert callable(daemon.manager) and not inspect.signature(daemon.manager).parameters


# --- where the check runs ------------------------------------------------------------------------------


def _refuse(*_args, **_kwargs):
    raise UnsupportedVersionError("pyspark", "9.0.0", ">=4.2,<4.3", "pip install 'pyspark==4.2.*'")


def test_serve_checks_versions_before_starting_spark(monkeypatch):
    from streamhydro.config import load
    from streamhydro.driver import serve

    monkeypatch.setattr(serve, "check_versions", _refuse)
    with pytest.raises(UnsupportedVersionError, match="pyspark 9.0.0"):
        serve.Service(load(None)).start()


def test_train_checks_versions_before_reading_its_config(monkeypatch):
    import argparse

    from streamhydro.trainer import command

    monkeypatch.setattr(internals, "check_versions", _refuse)
    with pytest.raises(UnsupportedVersionError):
        command.run(argparse.Namespace(config="/nonexistent/train.toml"))


def test_the_executor_daemon_checks_versions_before_its_loop():
    source = (Path(internals.__file__).parent / "executor" / "daemon.py").read_text()
    assert source.index("check_versions()") < source.index("run_python_daemon()\n")


def test_offset_log_entries_are_read_as_spark_writes_them():
    # As Spark 4.2 wrote offsets/3 of a query with streamhydro's source (tests/test_exactly_once.py has the real one).
    text = 'v1\n{"batchWatermarkMs":0,"batchTimestampMs":1796528419202,"conf":{}}\n{"events": {"0": 3296, "1": 3204}}'
    assert internals.offset_log_entry(text) == [{"events": {"0": 3296, "1": 3204}}]
    assert internals.offset_log_entry('v1\n{}\n-\n{"a": {"0": 1}}') == [None, {"a": {"0": 1}}]
    with pytest.raises(internals.CheckpointFormatError, match="not 'v1'"):
        internals.offset_log_entry('v2\n{}\n{"events": {"0": 1}}')


@pytest.mark.spark
def test_read_checkpoint_reads_what_spark_writes(spark, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json").write_text('{"x": 1}\n')
    checkpoint = tmp_path / "checkpoint"
    assert internals.read_checkpoint(spark, str(checkpoint)) == internals.CheckpointLog(None, {}, frozenset())
    query = (
        spark.readStream.schema("x long").json(str(tmp_path / "in"))
        .writeStream.format("noop").option("checkpointLocation", str(checkpoint)).trigger(availableNow=True).start()
    )
    query.awaitTermination(120)
    found = internals.read_checkpoint(spark, str(checkpoint))
    assert found.query_id == query.id
    assert found.offsets == {0: [{"logOffset": 0}]} and found.committed == frozenset({0})
