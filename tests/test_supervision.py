"""serve under a supervisor: a failed query ends serve with a non-zero exit and its root cause in one line.

The one-line text rules are tested on their own; the root cause on real exceptions from the test session's
Spark (a Python worker's, a JVM chain's); the whole on ``streamhydro serve`` run as a subprocess whose
output topic refuses every prediction.
"""

from __future__ import annotations

import pytest

from conftest import client
from streamhydro.driver.failure import one_line, root_cause
from streamhydro.driver.serve import StopRequested, ended_by_stop
from streamhydro.errors import DeliveryError

PROXY_TRACEBACK = """An exception was raised by the Python Proxy. Return Message: Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/py4j/clientserver.py", line 644, in _call_proxy
    return_value = getattr(self.pool[obj_id], method)(*params)
  File "/work/streamhydro/driver/serve.py", line 206, in _process_batch
    scored.write.format(self._format).mode("append").options(**options).save()
pyspark.errors.exceptions.captured.PythonException: An exception was thrown from the Python worker:
Traceback (most recent call last):
  File "/work/streamhydro/kafka/writing.py", line 123, in produce_batches
    raise DeliveryError(
streamhydro.errors.DeliveryError: 100 of 100 records were not delivered (first error: predictions[0]: Broker: Message size too large)

=== Streaming Query ===
Identifier: streamhydro [id = cf464feb, runId = 303c5175]
Current State: ACTIVE
"""


def test_one_line_is_the_exception_line_of_the_innermost_traceback():
    assert one_line(PROXY_TRACEBACK) == (
        "streamhydro.errors.DeliveryError: 100 of 100 records were not delivered (first error: predictions[0]: Broker: Message size too large)"
    )


def test_one_line_without_a_traceback_is_the_first_line_before_the_query_description():
    text = "\norg.apache.kafka.common.errors.TimeoutException: Timed out waiting for a node assignment.\n\tat org.apache.kafka.X.y(X.java:1)\n\n=== Streaming Query ===\nIdentifier: q"
    assert one_line(text) == "org.apache.kafka.common.errors.TimeoutException: Timed out waiting for a node assignment."


@pytest.mark.spark
def test_a_query_ended_by_a_requested_stop_is_told_from_a_failure_by_the_exception_type():
    ended = RuntimeError("StreamingQueryException: ... StopRequested ...")
    assert ended_by_stop(None, None)
    assert ended_by_stop(ended, StopRequested("stop requested before micro-batch 3"))
    assert not ended_by_stop(ended, DeliveryError(1, 2, "too large"))
    assert not ended_by_stop(ended, None), "a failure outside foreachBatch (planning, offsets) is a failure"
    assert not ended_by_stop(RuntimeError(StopRequested.__name__), ValueError("bad")), "the text does not decide"


def test_the_root_cause_of_a_python_worker_error_is_its_exception_line(spark):
    def fail(batches):
        for _ in batches:
            raise ValueError("record 7 cannot be scored")
        yield from ()

    with pytest.raises(Exception) as raised:
        spark.range(4).mapInArrow(fail, "id long").collect()
    assert root_cause(raised.value, None) == "ValueError: record 7 cannot be scored"


@pytest.mark.spark
def test_the_root_cause_of_a_jvm_exception_chain_is_its_innermost_cause_with_a_message(spark):
    lang = spark.sparkContext._jvm.java.lang
    chain = lang.IllegalStateException("outer layer", lang.RuntimeException("middle layer", lang.ArithmeticException("the root: / by zero")))
    assert root_cause(None, chain) == "java.lang.ArithmeticException: the root: / by zero"
    # A Python worker that crashed: "Python worker exited unexpectedly" wrapping a bare EOFException.
    crashed = lang.IllegalStateException("Job aborted", lang.RuntimeException("Python worker exited unexpectedly (crashed)", spark.sparkContext._jvm.java.io.EOFException()))
    assert root_cause(None, crashed) == "java.lang.RuntimeException: Python worker exited unexpectedly (crashed)"


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
def test_serve_exits_non_zero_with_the_root_cause_in_one_line(kafka_bootstrap, topic_name, tmp_path):
    import threading

    from confluent_kafka.admin import AdminClient, NewTopic

    from streamhydro.kafka.admin import ensure_topics
    from streamhydro.producer import LoadGenerator
    from streamhydro.registry import Registry
    from streamhydro.harness.supervisor import ERROR_PREFIX, ServeProcess, Supervisor, write_serve_config

    names = {"subscribe": f"{topic_name}-in", "output_topic": f"{topic_name}-out", "dead_letter_topic": f"{topic_name}-dlq"}
    # The output topic takes no record over 120 bytes: every prediction is refused, every batch fails.
    admin = AdminClient(client(kafka_bootstrap).as_dict())
    for future in admin.create_topics([NewTopic(names["output_topic"], 1, config={"max.message.bytes": "120"})]).values():
        future.result()
    ensure_topics(client(kafka_bootstrap), {names["subscribe"]: 1, names["dead_letter_topic"]: 1})
    generator = LoadGenerator(client(kafka_bootstrap), names["subscribe"], Registry("models").get("breast_cancer", "promoted").manifest)
    generator.run(50, None, threading.Event())
    generator.close()

    config = write_serve_config(tmp_path / "serve.toml", tmp_path, kafka_bootstrap, kafka={**names, "source": "python"})
    serve = ServeProcess(config, tmp_path / "serve.log")
    supervisor = Supervisor(serve)
    try:
        supervisor.start()
        assert supervisor.wait_for(lambda: serve.poll() is not None, 300, restart=False), "the failed query should end serve"
    finally:
        serve.kill()

    output = serve.log_path.read_text()
    errors = [line for line in output.splitlines() if line.startswith(ERROR_PREFIX)]
    assert serve.poll() == 2, output[-3000:]
    assert len(errors) == 1 and output.rstrip().endswith(errors[0]), output[-3000:]
    assert "DeliveryError" in errors[0] and "Message size too large" in errors[0], errors[0]
    assert "terminated with error" in serve.third_party_log_path.read_text(), "Spark's own log keeps the whole trace"
