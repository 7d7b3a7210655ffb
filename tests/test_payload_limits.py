"""Output records never exceed the producer's limit: sizes, oversized predictions, stripped dead letters."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _inference_models import Holder, feature_spec, json_values, kafka_batch, softmax_model
from streamhydro.config import PayloadSettings
from streamhydro import payload as p
from streamhydro.errors import ConfigError
from streamhydro.executor.scoring import EngineSettings, ScoringPlan, score_partition
from streamhydro.kafka.options import (
    JAVA_MAX_REQUEST_SIZE,
    LIBRDKAFKA_MESSAGE_MAX_BYTES,
    MIN_RECORD_LIMIT,
    max_record_bytes,
    spark_options,
)
from streamhydro.payload import limits

LIMITS = (MIN_RECORD_LIMIT, 10_000, 100_000, LIBRDKAFKA_MESSAGE_MAX_BYTES, JAVA_MAX_REQUEST_SIZE)
# Timing is not what these tests check, and CI machines are shared.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
OWN = [p.HEADER_ORIGIN_TOPIC, p.HEADER_ORIGIN_PARTITION, p.HEADER_ORIGIN_OFFSET, p.HEADER_ORIGIN_TIMESTAMP]


def varint(n: int) -> int:
    """Kafka's zig-zag varint, encoded one byte at a time: the reference for the vectorised sizes."""
    zigzag, size = (n << 1) ^ (n >> 63), 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


def java_size(key, value, headers) -> int:
    """``AbstractRecords.estimateSizeInBytesUpperBound`` for record format v2, written out from Kafka's source."""
    def field(data):
        return 1 if data is None else varint(len(data)) + len(data)

    size = 61 + 21 + field(key) + field(value) + varint(len(headers))
    return size + sum(field(h["key"].encode()) + field(h["value"]) for h in headers)


def batch_of(records, topic="out") -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r[0] for r in records], pa.binary()),
            pa.array([r[1] for r in records], pa.binary()),
            pa.array([topic] * len(records), pa.string()),
            pa.array([r[2] for r in records], p.HEADERS_TYPE),
        ],
        schema=p.OUTPUT_ARROW_SCHEMA,
    )


def around(limit_bytes: int):
    """Sizes near the limit, in the parts of a record, so that many records land on either side of it."""
    total = st.integers(limit_bytes - 160, limit_bytes + 40)
    return total.flatmap(lambda n: st.tuples(st.just(n), st.floats(0, 1), st.floats(0, 1)))


blob = st.builds(lambda n, c: bytes([c]) * n, st.integers(0, 300), st.integers(0, 255))
header = st.fixed_dictionaries({"key": st.text(max_size=20), "value": st.one_of(st.none(), blob)})


def split_record(limit_bytes, total, key_share, value_share, headers):
    """A record of about ``total`` bytes: the parts get shares of it, headers a third share."""
    rest = max(0, total - 82 - sum(len(h["key"].encode()) + len(h["value"] or b"") for h in headers))
    key_n = int(rest * key_share * (1 - value_share))
    value_n = rest - key_n
    return b"k" * key_n, b"v" * value_n, headers


@relaxed
@given(st.lists(st.one_of(st.none(), st.integers(0, 1 << 30)), max_size=20))
def test_varint_sizes_match_kafkas_encoding(lengths):
    array = np.array([-1 if n is None else n for n in lengths], np.int64)
    assert limits.varint_sizes(array).tolist() == [varint(int(n)) if n >= 0 else 1 for n in array]


@relaxed
@given(st.lists(st.tuples(st.one_of(st.none(), blob), st.one_of(st.none(), blob), st.lists(header, max_size=4)), max_size=6))
def test_record_sizes_are_the_java_producers_estimate(records):
    sizes = limits.record_sizes(batch_of(records))
    assert sizes.tolist() == [java_size(*r) for r in records]


_producers: dict[int, Producer] = {}


def librdkafka_accepts(limit_bytes: int, key, value, headers) -> bool:
    """Whether librdkafka's produce() takes the record with message.max.bytes = ``limit_bytes`` (no broker
    needed: the size check is made when the record is handed over)."""
    if limit_bytes not in _producers:
        _producers[limit_bytes] = Producer({"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": limit_bytes, "log_level": 0})
    producer = _producers[limit_bytes]
    try:
        producer.produce("t", value, key, headers=[(h["key"], h["value"]) for h in headers])
    except KafkaException as exc:
        assert exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
        return False
    finally:
        producer.purge()
    return True


@settings(relaxed, max_examples=300)
@given(st.sampled_from(LIMITS).flatmap(lambda n: st.tuples(st.just(n), around(n))), st.lists(header, max_size=3))
def test_a_record_sized_to_fit_is_one_librdkafka_accepts(limit_and_sizes, headers):
    limit_bytes, (total, key_share, value_share) = limit_and_sizes
    key, value, headers = split_record(limit_bytes, total, key_share, value_share, headers)
    size = int(limits.record_sizes(batch_of([(key, value, headers)]))[0])
    if size <= limit_bytes:
        assert librdkafka_accepts(limit_bytes, key, value, headers)
    # Conservative, but by little: the Java estimate is librdkafka's plus at most these varints and overheads.
    assert librdkafka_accepts(limit_bytes, key, value, headers) or size > limit_bytes
    if not librdkafka_accepts(limit_bytes, key, value, headers):
        assert size <= limit_bytes + 61 + 21 + 20 + 5 * (2 + 2 * len(headers))


def rejected_of(rows) -> p.Rejected:
    rejections = p.Rejections()
    for row in rows:
        rejections.add(row, p.INVALID_JSON, "bad")
    return rejections.result()


@settings(relaxed, max_examples=150)
@given(
    st.sampled_from(LIMITS),
    st.lists(st.tuples(st.integers(-300, 100), st.floats(0, 1), st.booleans()), min_size=1, max_size=8),
)
def test_oversized_predictions_become_output_too_large_rejections(limit_bytes, rows):
    meta_n = len(rows)
    already = [i for i, (_, _, bad) in enumerate(rows) if bad]
    kept = [i for i in range(meta_n) if i not in already]
    records = [split_record(limit_bytes, limit_bytes + rows[i][0], rows[i][1], 0.5, []) for i in kept]
    predictions = batch_of(records)
    meta = kafka_batch([b"{}"] * meta_n)
    out, rejected = limits.refuse_oversized(predictions, meta, rejected_of(already), limit_bytes)
    assert (limits.record_sizes(out) <= limit_bytes).all()
    sizes = limits.record_sizes(predictions)
    too_large = [kept[j] for j in range(len(kept)) if sizes[j] > limit_bytes]
    assert out.num_rows == len(kept) - len(too_large)
    assert rejected.rows.tolist() == sorted(already + too_large)
    for row, error_class, message in zip(rejected.rows.tolist(), rejected.error_classes, rejected.messages):
        assert error_class == (p.INVALID_JSON if row in already else p.OUTPUT_TOO_LARGE)
        if error_class == p.OUTPUT_TOO_LARGE:
            assert f"limit of {limit_bytes} bytes" in message and "message.max.bytes" in message
    assert out.column("key").to_pylist() == [r[0] for j, r in enumerate(records) if kept[j] not in too_large]


def dead_letter(key, value, headers, topic="t" * 249, message="m" * p.MESSAGE_LIMIT):
    added = [{"key": name, "value": b"x" * 20} for name in OWN]
    added[0]["value"] = topic.encode()
    added += [{"key": p.HEADER_ERROR_CLASS, "value": b"InvalidJson"}, {"key": p.HEADER_ERROR_MESSAGE, "value": message.encode()}]
    return key, value, headers + added


def size_of(key, value, headers) -> int:
    return int(limits.record_sizes(batch_of([(key, value, headers)]))[0])


@settings(relaxed, max_examples=300)
@given(
    st.sampled_from(LIMITS),
    st.integers(-3000, 3000),
    st.floats(0, 1),
    st.floats(0, 1),
    st.lists(header, max_size=3),
    st.sampled_from([p.HEADER_ORIGIN_TOPIC, "own"]),
    st.booleans(),
)
def test_dead_letters_drop_the_fewest_parts_that_make_them_fit(limit_bytes, delta, key_share, value_share, headers, big_header_name, null_key):
    big = {"key": big_header_name, "value": b"h" * int(limit_bytes * value_share)}
    key, value, own = split_record(limit_bytes, limit_bytes + delta, key_share, 1 - value_share, headers + [big])
    key = None if null_key else key
    original = dead_letter(key, value, own)
    out = limits.fit_dead_letters(batch_of([original], topic="dlq"), limit_bytes)
    [(out_key, out_value, out_topic, out_headers)] = zip(*(out.column(c).to_pylist() for c in out.schema.names))
    assert out_topic == "dlq"
    assert limits.record_sizes(out)[0] <= limit_bytes
    if size_of(*original) <= limit_bytes:
        assert (out_key, out_value, out_headers) == original
        return
    # The origin and error headers are all kept, in order, right after the copied headers that are kept.
    added = original[2][len(own):]
    kept_own = out_headers[: len(own)] == own
    assert out_headers[len(own) if kept_own else 0 :][: len(added)] == added
    notes = out_headers[(len(own) if kept_own else 0) + len(added) :]
    dropped = {h["key"].removeprefix(limits.HEADER_DROPPED_PREFIX): h["value"] for h in notes}
    assert all(h["key"].startswith(limits.HEADER_DROPPED_PREFIX) for h in notes)
    parts = {"value": value, "key": key, "headers": limits.serialize_headers(own)}
    gone = [part for part in limits.DROP_ORDER if f"{part}.sha256" in dropped]
    assert gone, "something was dropped"
    for part in gone:
        assert dropped[f"{part}.bytes"] == str(len(parts[part])).encode()
        assert dropped[f"{part}.sha256"] == hashlib.sha256(parts[part]).hexdigest().encode()
    assert (out_value is None) == ("value" in gone or value is None)
    assert out_key == (None if "key" in gone else key)
    assert kept_own == ("headers" not in gone)
    if "headers" in gone:
        assert dropped["headers.count"] == str(len(own)).encode()
    # Nothing was dropped that could have stayed: with any one dropped part back the record would not fit.
    for back in gone:
        still = [part for part in gone if part != back]
        kept = (None if "key" in still else key, None if "value" in still else value)
        notes_back = [h for h in notes if not h["key"].startswith(f"{limits.HEADER_DROPPED_PREFIX}{back}.")]
        assert size_of(*kept, ([] if "headers" in still else own) + added + notes_back) > limit_bytes


def test_a_dead_letter_keeps_what_fits_after_its_value_goes():
    key, value, headers = dead_letter(b"k" * 100, b"v" * 20_000, [{"key": "trace", "value": b"t1"}])
    out = limits.fit_dead_letters(batch_of([(key, value, headers)]), 10_000).to_pylist()[0]
    assert out["key"] == key and out["value"] is None
    assert out["headers"][: len(headers)] == headers
    assert {h["key"]: h["value"] for h in out["headers"]}["streamhydro.dropped.value.bytes"] == b"20000"


def test_limit_per_connector_from_either_spelling():
    assert max_record_bytes(spark_options("b:1", {}), jvm=True) == 1_048_576
    assert max_record_bytes(spark_options("b:1", {}), jvm=False) == 1_000_000
    for spelling in ("message.max.bytes", "max.request.size"):
        options = spark_options("b:1", {spelling: "5000000"})
        assert max_record_bytes(options, jvm=True) == max_record_bytes(options, jvm=False) == 5_000_000
    small_buffer = spark_options("b:1", {"max.request.size": "5000000", "buffer.memory": "2000000"})
    assert max_record_bytes(small_buffer, jvm=True) == 2_000_000
    assert max_record_bytes(small_buffer, jvm=False) == 1953 * 1024
    with pytest.raises(ConfigError) as info:
        max_record_bytes(spark_options("b:1", {"message.max.bytes": "4000"}), jvm=False)
    assert info.value.key == "kafka.client.message.max.bytes"


def test_config_knows_the_limit_of_its_connector():
    from streamhydro.config import Config

    assert Config().kafka.max_record_bytes() == 1_048_576
    assert Config().replace(kafka={"source": "python"}).kafka.max_record_bytes() == 1_000_000
    with pytest.raises(ConfigError):
        Config().replace(kafka={"client": {"max.request.size": "100"}})


def test_score_partition_dead_letters_a_prediction_over_the_limit():
    """A 1.5 MB key: its prediction (key twice) is over the limit, its dead letter drops the key; the rest score."""
    data, manifest = softmax_model([feature_spec("x", 4)])
    values = json_values(manifest, np.ones((4, 4), np.float32))
    values[3] = b"{not json" + b" " * 1_200_000
    keys = [b"k0", b"K" * 600_000, b"K" * 1_500_000, b"k3"]
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(max_value_bytes=2_000_000), "preds", "dead", EngineSettings(pipeline_depth=0))
    out = pa.Table.from_batches(list(score_partition(plan, iter([kafka_batch(values, keys)]))))
    assert (limits.record_sizes(out.combine_chunks().to_batches()[0]) <= 1_000_000).all()
    by_offset = {}
    for row in out.to_pylist():
        headers = {h["key"]: h["value"] for h in row["headers"]}
        offset = int(headers[p.HEADER_ORIGIN_OFFSET]) if row["topic"] == "dead" else int(row["value"].split(b'"offset":')[1].split(b",")[0])
        by_offset[offset] = (row, headers)
    assert {o: r["topic"] for o, (r, _) in by_offset.items()} == {0: "preds", 1: "dead", 2: "dead", 3: "dead"}
    row, headers = by_offset[1]  # 1.2 MB prediction -> dead letter that fits whole
    assert headers[p.HEADER_ERROR_CLASS] == p.OUTPUT_TOO_LARGE.encode() and row["key"] == keys[1] and row["value"] == values[1]
    row, headers = by_offset[2]  # 3 MB prediction -> dead letter without its key
    assert headers[p.HEADER_ERROR_CLASS] == p.OUTPUT_TOO_LARGE.encode() and row["key"] is None and row["value"] == values[2]
    assert headers["streamhydro.dropped.key.sha256"] == hashlib.sha256(keys[2]).hexdigest().encode()
    row, headers = by_offset[3]  # malformed 1.2 MB value -> dead letter without its value
    assert headers[p.HEADER_ERROR_CLASS] == p.INVALID_JSON.encode() and row["value"] is None and row["key"] == b"k3"
    assert headers["streamhydro.dropped.value.bytes"] == str(len(values[3])).encode()


SIZE_OF_JAVA = """
import java.nio.ByteBuffer;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.record.AbstractRecords;
import org.apache.kafka.common.record.CompressionType;

/** Lines "keyLen valueLen [headerKeyLen headerValueLen]..." (-1: null) -> the size KafkaProducer checks. */
public class SizeOf {
    public static void main(String[] args) throws Exception {
        java.io.BufferedReader in = new java.io.BufferedReader(new java.io.InputStreamReader(System.in));
        for (String line; (line = in.readLine()) != null; ) {
            String[] f = line.trim().split(" ");
            Header[] headers = new Header[(f.length - 2) / 2];
            for (int i = 0; i < headers.length; i++) {
                int v = Integer.parseInt(f[3 + 2 * i]);
                headers[i] = new RecordHeader("h".repeat(Integer.parseInt(f[2 + 2 * i])), v < 0 ? null : new byte[v]);
            }
            System.out.println(AbstractRecords.estimateSizeInBytesUpperBound(
                (byte) 2, CompressionType.NONE, buffer(Integer.parseInt(f[0])), buffer(Integer.parseInt(f[1])), headers));
        }
    }

    static ByteBuffer buffer(int n) { return n < 0 ? null : ByteBuffer.wrap(new byte[n]); }
}
"""


def test_record_sizes_are_what_the_java_client_of_sparks_sink_checks(tmp_path):
    """The estimate KafkaProducer compares with max.request.size, from the kafka-clients jar Spark's connector uses."""
    import shutil
    import subprocess
    from pathlib import Path

    import pyspark

    from streamhydro import jars

    bundle = jars.cached(jars.spark_kafka_connector())
    slf4j = sorted((Path(pyspark.__file__).parent / "jars").glob("slf4j-api-*.jar"))
    if shutil.which("java") is None or bundle is None or not slf4j:
        pytest.skip("needs java and Spark's Kafka connector in the jar cache (streamhydro jars)")
    classpath = ":".join(str(j) for j in [*bundle, slf4j[0]] if "kafka-clients" in j.name or j in slf4j)
    records = [(None, None, []), (b"", b"", []), (b"k" * 3, b"v" * 300, [("h" * 5, b"x" * 2)]), (b"k" * 63, b"v" * 64, [("h" * 63, b"x" * 64)])]
    records += [(b"k" * 100, b"v" * 1_000_000, [("h" * 5, b"xx"), ("h" * 10, None)]), (b"k", b"v" * 1_048_000, [("h" * 200, b"x" * 300)])]
    records += [(b"k" * 8191, b"v" * 8192, []), (None, b"v" * 16383, [("h", None)] * 130)]
    lines = "".join(
        " ".join(str(-1 if part is None else len(part)) for part in (key, value, *[x for k, v in headers for x in (k, v)])) + "\n"
        for key, value, headers in records
    )
    source = tmp_path / "SizeOf.java"
    source.write_text(SIZE_OF_JAVA)
    run = subprocess.run(["java", "-cp", classpath, str(source)], input=lines, capture_output=True, text=True, timeout=120, check=True)
    java = [int(line) for line in run.stdout.split()]
    ours = limits.record_sizes(batch_of([(k, v, [{"key": hk, "value": hv} for hk, hv in h]) for k, v, h in records])).tolist()
    assert ours == java


@pytest.mark.broker
def test_streamhydros_connector_writes_what_the_input_let_through_however_large(kafka_bootstrap, topic_name, model_registry):
    """The issue's events through a real range task (read, score, write with librdkafka's default limit): a 1.5 MB
    key and a malformed value between 1,000,000 bytes and 1 MiB. The task completes; nothing is refused."""
    from confluent_kafka.admin import AdminClient, NewTopic

    from conftest import client, read_all
    from streamhydro.executor.direct import RangeIO, score_range
    from streamhydro.executor.sessions import TaskResources
    from streamhydro.kafka.admin import ensure_topics
    from streamhydro.kafka.planning import OffsetRange

    source, output, dead = f"{topic_name}-in", f"{topic_name}-out", f"{topic_name}-dlq"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(source, 1, config={"max.message.bytes": "4000000"})])[source].result(30)
    ensure_topics(client(kafka_bootstrap), {source: 1, output: 1, dead: 1})
    version = model_registry.get("iris_like", 1)
    good = json_values(version.manifest, np.ones((2, 4), np.float32))
    events = [(b"k0", good[0]), (b"K" * 1_500_000, good[1]), (b"k2", b"{" + b" " * 1_020_000)]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 4_000_000})
    for key, value in events:
        producer.produce(source, value, key, headers=[("trace", b"t")])
    assert producer.flush(30) == 0

    plan = ScoringPlan(version.manifest, Holder(version.read_bytes()), PayloadSettings(), output, dead, EngineSettings(pipeline_depth=0))
    written = score_range(plan, RangeIO(client(kafka_bootstrap)), OffsetRange(source, 0, 0, 3), TaskResources())
    assert written == 3
    [prediction] = read_all(kafka_bootstrap, output, 1, seconds=30)
    assert prediction.key == b"k0"
    letters = {dict(r.headers)[p.HEADER_ORIGIN_OFFSET]: r for r in read_all(kafka_bootstrap, dead, 2, seconds=30)}
    too_large, malformed = letters[b"1"], letters[b"2"]
    assert dict(too_large.headers)[p.HEADER_ERROR_CLASS] == p.OUTPUT_TOO_LARGE.encode()
    assert too_large.key is None and too_large.value == good[1]
    assert dict(too_large.headers)["streamhydro.dropped.key.sha256"] == hashlib.sha256(events[1][0]).hexdigest().encode()
    assert dict(malformed.headers)[p.HEADER_ERROR_CLASS] == p.INVALID_JSON.encode()
    assert malformed.key == b"k2" and malformed.value is None
    assert dict(malformed.headers)["streamhydro.dropped.value.bytes"] == b"1020001"
