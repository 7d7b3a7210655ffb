"""Fast tests of the connector's pure parts: options, offset planning, Arrow conversions, delivery tracking."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pyarrow as pa
import pytest
from confluent_kafka import KafkaError as ClientError
from confluent_kafka import Message
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import BinaryType, IntegerType, LongType, StringType

from streamhydro.errors import ConfigError
from streamhydro.kafka.options import (
    ClientConfig,
    check_jvm_options,
    client_config,
    offsets_from_json,
    offsets_to_json,
    parse_source_options,
    parse_starting_offsets,
    parse_subscription,
    spark_options,
    translate_jaas,
)
from streamhydro.kafka.planning import OffsetRange, admit, cap, ranges, regressions, split_limit
from streamhydro.kafka.reading import reader_config
from streamhydro.kafka.ranges import ARROW_RANGE_SCHEMA, ARROW_SUMMARY_SCHEMA, RANGE_SCHEMA, range_batch, ranges_of, range_records, summary_batch
from streamhydro.kafka.records import (
    ARROW_SCHEMA,
    KAFKA_SCHEMA,
    ConsumedColumns,
    headers_array,
    headers_lists,
    outgoing,
    to_record_batch,
)
from streamhydro.kafka.source import KafkaDataSource
from streamhydro.kafka.writing import DeliveryTracker, producer_config

BOOT = {"kafka.bootstrap.servers": "h:9092"}


# ---- options ---------------------------------------------------------------------------------------


def test_kafka_options_pass_through_with_prefix_stripped():
    config = client_config({**BOOT, "kafka.compression.type": "lz4", "subscribe": "t", "kafka.Client.Id": "x"})
    assert config.as_dict() == {"bootstrap.servers": "h:9092", "compression.type": "lz4", "client.id": "x"}


def test_missing_bootstrap_names_the_key():
    with pytest.raises(ConfigError) as info:
        client_config({"subscribe": "t"})
    assert info.value.key == "kafka.bootstrap.servers"


def test_jaas_plain_and_scram_become_username_password():
    jaas = 'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" password="p\\"w";'
    assert translate_jaas(jaas) == {"sasl.username": "u", "sasl.password": 'p"w'}
    config = client_config(
        {
            **BOOT,
            "kafka.security.protocol": "SASL_SSL",
            "kafka.sasl.mechanism": "SCRAM-SHA-512",
            "kafka.sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required "
            'username="alice" password="secret";',
        }
    )
    assert config.get("sasl.username") == "alice"
    assert config.get("sasl.mechanisms") == "SCRAM-SHA-512"
    assert "secret" not in repr(config)


def test_jaas_with_unsupported_module_names_librdkafka_settings():
    with pytest.raises(ConfigError, match="oauthbearer"):
        client_config({**BOOT, "kafka.sasl.jaas.config": "org.apache.kafka.OAuthBearerLoginModule required ;"})


def test_jks_truststore_is_refused_with_ssl_ca_location():
    with pytest.raises(ConfigError, match="ssl.ca.location") as info:
        client_config({**BOOT, "kafka.ssl.truststore.location": "/x.jks", "kafka.ssl.truststore.type": "JKS"})
    assert info.value.key == "kafka.ssl.truststore.location"
    with pytest.raises(ConfigError, match="ssl.ca.location") as info:
        spark_options("h:9092", {"ssl.truststore.location": "/x.jks", "ssl.truststore.type": "JKS"})
    assert info.value.key == "kafka.client.ssl.truststore.location"


def test_settings_written_once_in_librdkafka_spelling_reach_both_clients():
    """sasl.username/password -> a JAAS entry for the JVM connector, and back to the same librdkafka settings."""
    settings = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": 'us"er',
        "sasl.password": "p\\a\"ss",
        "ssl.ca.location": "/etc/ca.pem",
        "fetch.wait.max.ms": "20",
        "queue.buffering.max.kbytes": "2048",
    }
    java = spark_options("h:9092", settings)
    assert java["kafka.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.scram.ScramLoginModule required username="us\\"er" password="p\\\\a\\"ss";'
    )
    assert java["kafka.ssl.truststore.type"] == "PEM" and java["kafka.ssl.truststore.location"] == "/etc/ca.pem"
    assert java["kafka.fetch.max.wait.ms"] == "20" and java["kafka.buffer.memory"] == str(2048 * 1024)
    assert "kafka.sasl.username" not in java and "kafka.sasl.password" not in java
    back = client_config(java).as_dict()
    assert back == {
        "bootstrap.servers": "h:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanisms": "SCRAM-SHA-256",
        "sasl.username": 'us"er',
        "sasl.password": "p\\a\"ss",
        "ssl.ca.location": "/etc/ca.pem",
        "fetch.wait.max.ms": "20",
        "queue.buffering.max.kbytes": "2048",
    }


def test_settings_written_in_java_spelling_reach_both_clients():
    jaas = 'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" password="pw";'
    java = spark_options("h:9092", {"sasl.mechanism": "PLAIN", "sasl.jaas.config": jaas, "max.request.size": "5"})
    assert java["kafka.sasl.jaas.config"] == jaas and java["kafka.max.request.size"] == "5"
    assert client_config(java).as_dict() == {
        "bootstrap.servers": "h:9092", "sasl.mechanisms": "PLAIN", "sasl.username": "u", "sasl.password": "pw",
        "message.max.bytes": "5",
    }


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"sasl.username": "u"}, "kafka.client.sasl.password"),
        ({"sasl.username": "u", "sasl.password": "p", "sasl.mechanism": "GSSAPI"}, "kafka.client.sasl.username"),
        ({"sasl.username": "u", "sasl.password": "p", "sasl.jaas.config": "x"}, "kafka.client.sasl.jaas.config"),
        ({"queue.buffering.max.kbytes": "lots"}, "kafka.client.queue.buffering.max.kbytes"),
    ],
)
def test_settings_that_cannot_be_translated_are_refused_naming_the_key(settings, key):
    with pytest.raises(ConfigError) as info:
        spark_options("h:9092", settings)
    assert info.value.key == key


def test_jvm_connector_refuses_settings_the_java_client_does_not_know():
    java_names = {"bootstrap.servers", "security.protocol", "sasl.jaas.config", "sasl.mechanism", "ssl.keystore.location"}
    ok = spark_options("h:9092", {"security.protocol": "SASL_SSL", "sasl.username": "u", "sasl.password": "p"})
    check_jvm_options({**ok, "subscribe": "t"}, java_names)
    with pytest.raises(ConfigError, match="PKCS#12") as info:
        check_jvm_options(spark_options("h:9092", {"ssl.key.location": "/k.pem"}), java_names)
    assert info.value.key == "kafka.client.ssl.key.location"
    with pytest.raises(ConfigError, match="source") as info:
        check_jvm_options(spark_options("h:9092", {"statistics.interval.ms": "1000"}), java_names)
    assert info.value.key == "kafka.client.statistics.interval.ms"


def test_java_spellings_are_translated():
    config = client_config({**BOOT, "kafka.max.request.size": "2000000", "kafka.buffer.memory": "33554432"})
    assert config.get("message.max.bytes") == "2000000"
    assert config.get("queue.buffering.max.kbytes") == "32768"


def test_exactly_one_subscription_kind():
    with pytest.raises(ConfigError, match="exactly one"):
        parse_subscription({"subscribe": "a", "assign": '{"a":[0]}'})
    with pytest.raises(ConfigError, match="exactly one"):
        parse_subscription({})


def test_subscriptions_select_partitions_from_metadata():
    metadata = {"a": 2, "ab": 1, "b": 3}
    assert parse_subscription({"subscribe": "a, b"}).select(metadata) == [
        ("a", 0),
        ("a", 1),
        ("b", 0),
        ("b", 1),
        ("b", 2),
    ]
    assert parse_subscription({"subscribePattern": "a.*"}).select(metadata) == [("a", 0), ("a", 1), ("ab", 0)]
    assign = parse_subscription({"assign": '{"b": [2, 0], "a": [5]}'})
    assert assign.select(metadata) == [("b", 0), ("b", 2)]


def test_bad_assign_and_pattern_are_config_errors():
    with pytest.raises(ConfigError, match="assign"):
        parse_subscription({"assign": '{"a": "0"}'})
    with pytest.raises(ConfigError, match="subscribePattern"):
        parse_subscription({"subscribePattern": "(["})


def test_starting_offsets_forms():
    assert parse_starting_offsets(None).kind == "latest"
    assert parse_starting_offsets("EARLIEST").kind == "earliest"
    specific = parse_starting_offsets('{"t": {"0": 23, "1": -2}}')
    assert dict(specific.specific) == {("t", 0): 23, ("t", 1): -2}
    for bad in ("soon", '{"t": 5}', '{"t": {"0": -3}}'):
        with pytest.raises(ConfigError):
            parse_starting_offsets(bad)


def test_source_options_case_insensitive_and_validated():
    options = parse_source_options(
        {**BOOT, "subscribe": "t", "MAXOFFSETSPERTRIGGER": "50", "failOnDataLoss": "false", "kafka.group.id": "g"}
    )
    assert options.max_offsets_per_trigger == 50
    assert options.fail_on_data_loss is False
    assert options.group_id == "g"
    with pytest.raises(ConfigError, match="maxOffsetsPerTrigger"):
        parse_source_options({**BOOT, "subscribe": "t", "maxOffsetsPerTrigger": "0"})
    with pytest.raises(ConfigError, match="failOnDataLoss"):
        parse_source_options({**BOOT, "subscribe": "t", "failOnDataLoss": "maybe"})
    with pytest.raises(ConfigError, match="endingoffsets"):
        parse_source_options({**BOOT, "subscribe": "t", "endingOffsets": "latest"})


def test_offsets_json_round_trip_is_sparks_shape():
    offsets = {("b", 1): 45, ("a", 0): 123}
    assert offsets_to_json(offsets) == {"a": {"0": 123}, "b": {"1": 45}}
    assert offsets_from_json(offsets_to_json(offsets)) == offsets


def test_client_config_is_hashable_and_user_settings_win():
    config = ClientConfig.of({"linger.ms": "5", "bootstrap.servers": "h"})
    assert hash(config) == hash(ClientConfig.of({"bootstrap.servers": "h", "linger.ms": "5"}))
    produced = producer_config(config)
    assert produced.get("linger.ms") == "5"
    assert produced.get("enable.idempotence") == "true" and produced.get("acks") == "all"
    read = reader_config(config)
    assert read.get("enable.partition.eof") == "true" and read.get("enable.auto.commit") == "false"


# ---- planning --------------------------------------------------------------------------------------


def test_split_limit_is_proportional_and_never_exceeds():
    assert split_limit({("t", 0): 900, ("t", 1): 100}, 100) == {("t", 0): 90, ("t", 1): 10}
    shares = split_limit({("t", p): 1000 for p in range(11)}, 10)
    assert sum(shares.values()) == 10
    assert split_limit({("t", 0): 3, ("t", 1): 4}, 100) == {("t", 0): 3, ("t", 1): 4}


def test_split_limit_does_not_starve_a_small_partition():
    shares = split_limit({("t", 0): 10_000, ("t", 1): 3}, 100)
    assert shares[("t", 1)] >= 1
    assert sum(shares.values()) == 100


def test_admit_with_and_without_limit():
    start = {("t", 0): 10, ("t", 1): 0}
    latest = {("t", 0): 110, ("t", 1): 300}
    assert admit(start, latest, None) == latest
    end = admit(start, latest, 40)
    assert end == {("t", 0): 20, ("t", 1): 30}


def test_admit_lets_an_offset_go_back_for_planning_to_report():
    assert admit({("t", 0): 50}, {("t", 0): 10}, None) == {("t", 0): 10}
    assert regressions({("t", 0): 50, ("t", 1): 3}, {("t", 0): 10}) == {("t", 0): (50, 10), ("t", 1): (3, None)}


def test_cap_for_available_now_ignores_new_partitions():
    assert cap({("t", 0): 100, ("t", 1): 7}, {("t", 0): 50}) == {("t", 0): 50}


def test_ranges_skip_empty_and_start_new_partitions_at_earliest():
    planned = ranges({("t", 0): 5, ("t", 1): 9}, {("t", 0): 5, ("t", 1): 12, ("u", 0): 4}, {("u", 0): 1})
    assert planned == [OffsetRange("t", 1, 9, 12), OffsetRange("u", 0, 1, 4)]


# ---- Arrow -----------------------------------------------------------------------------------------


def test_records_read_have_the_columns_of_sparks_kafka_source():
    names = ["key", "value", "topic", "partition", "offset", "timestamp", "timestampType", "headers"]
    assert KAFKA_SCHEMA.fieldNames() == names
    assert [type(f.dataType) for f in KAFKA_SCHEMA.fields[:5]] == [
        BinaryType,
        BinaryType,
        StringType,
        IntegerType,
        LongType,
    ]
    assert to_arrow_schema(KAFKA_SCHEMA, timezone="UTC").equals(ARROW_SCHEMA)


def test_consumed_records_to_batch():
    batch = to_record_batch(
        ConsumedColumns(
            keys=[b"k", None],
            values=[b"v", b""],
            topic="t",
            partition=3,
            offsets=[7, 9],
            timestamp_types=[1, 2],
            timestamps_ms=[1_700_000_000_123, 5],
            headers=[[("a", b"1"), ("b", None)], None],
        )
    )
    assert batch.schema.equals(ARROW_SCHEMA)
    rows = batch.to_pylist()
    assert rows[0]["timestamp"] == dt.datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=dt.timezone.utc)
    assert [r["timestampType"] for r in rows] == [0, 1]
    assert [r["offset"] for r in rows] == [7, 9] and rows[1]["partition"] == 3
    assert rows[0]["headers"] == [{"key": "a", "value": b"1"}, {"key": "b", "value": None}]
    assert rows[1]["headers"] is None and rows[1]["key"] is None


def test_empty_batch_has_the_schema():
    batch = to_record_batch(ConsumedColumns([], [], "t", 0, [], [], [], []))
    assert batch.num_rows == 0 and batch.schema.equals(ARROW_SCHEMA)


def test_headers_round_trip_through_arrow_including_sliced_arrays():
    headers = [[("x", b"1")], None, [("y", b"2"), ("z", b"3")], []]
    array = headers_array(headers)
    assert headers_lists(array) == [[("x", b"1")], None, [("y", b"2"), ("z", b"3")], None]
    assert headers_lists(array.slice(2)) == [[("y", b"2"), ("z", b"3")], None]


def test_outgoing_takes_each_rows_topic_and_optional_key_and_headers():
    batch = pa.RecordBatch.from_pydict(
        {"key": [b"k", None], "value": [b"a", b"b"], "topic": ["x", "y"], "headers": headers_array([[("h", b"1")], None])}
    )
    records = outgoing(batch)
    assert records.topics == ["x", "y"] and records.values == [b"a", b"b"]
    assert records.keys == [b"k", None] and records.headers == [[("h", b"1")], None]
    bare = outgoing(pa.RecordBatch.from_pydict({"value": [b"v"], "topic": ["only"]}))
    assert (bare.topics, bare.keys, bare.headers) == (["only"], [None], [None])


def test_delivery_tracker_counts_and_keeps_first_error():
    message = Message(topic="t", partition=0)
    tracker = DeliveryTracker()
    tracker(None, message)
    tracker(ClientError(ClientError._MSG_TIMED_OUT, "timed out"), message)
    tracker.refuse("t", ClientError(ClientError._FENCED, "fenced", fatal=True))
    assert (tracker.delivered, tracker.failed, tracker.refused, tracker.fatal) == (1, 1, 1, True)
    assert tracker.first_error == "t[0]: timed out"


def test_split_limit_invariants_over_random_inputs():
    import random

    rng = random.Random(7)
    for _ in range(5000):
        available = {
            ("t", p): rng.choice([0, 1, 2, 5, 100, 10_000, rng.randint(0, 500)]) for p in range(rng.randint(1, 12))
        }
        max_rows = rng.randint(1, 300)
        shares = split_limit(available, max_rows)
        assert sum(shares.values()) == min(sum(available.values()), max_rows)
        assert all(0 <= shares[tp] <= available[tp] for tp in available)
        if sum(1 for n in available.values() if n > 0) <= max_rows:
            assert all(shares[tp] >= 1 for tp, n in available.items() if n > 0)


def test_the_source_gives_ranges_and_refuses_bad_options_when_loaded():
    assert KafkaDataSource({**BOOT, "subscribe": "t"}).schema() == RANGE_SCHEMA
    with pytest.raises(ConfigError) as refused:
        KafkaDataSource({**BOOT, "subscribe": "t", "endingOffsets": "latest"}).schema()
    assert refused.value.key == "endingoffsets"


def test_ranges_travel_as_rows_and_back():
    offsets = [OffsetRange("events", 0, 10, 250), OffsetRange("other", 3, 0, 1)]
    batch = range_batch(offsets)
    assert batch.schema == ARROW_RANGE_SCHEMA
    assert ranges_of(batch) == offsets
    summaries = [summary_batch(offsets[0], 240), summary_batch(offsets[1], 0)]
    assert all(summary.schema == ARROW_SUMMARY_SCHEMA for summary in summaries)
    rows = [SimpleNamespace(**row) for summary in summaries for row in summary.to_pylist()]
    assert [row.written for row in rows] == [240, 0]
    assert range_records(rows) == 241, "a range counts its offsets, not one row"
