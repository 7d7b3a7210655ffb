"""The tests' schema registry (Apicurio Registry, or $STREAMHYDRO_TEST_SCHEMA_REGISTRY) through Confluent's
Python client: what a schema id resolves to, for Avro and for Protobuf, as the payload decoders rely on.

What Apicurio Registry 2.4.2 answers (the facts the assertions below pin down):

- ``GET /schemas/ids/{id}`` returns the schema exactly as it was registered: an ``.avsc`` string, or for
  Protobuf whatever text the producer sent — ``.proto`` source when registered as source, a base64
  ``FileDescriptorProto`` when Confluent's ``ProtobufSerializer`` registered it (it sends that form).
- ``?format=serialized`` is ignored: the same body comes back (Confluent's registry would turn ``.proto``
  source into a base64 descriptor there). A decoder must accept both forms.
- References work: a schema registered with ``references`` lists them when read by id, and each
  reference resolves by subject and version.
- Ids are content ids: the same schema text under two subjects has one id.
- An unknown id answers HTTP 404 with error code 40403.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from conftest import get

pytestmark = pytest.mark.broker

AVRO_SCHEMA = json.dumps(
    {"type": "record", "name": "Event", "namespace": "streamhydro.test", "fields": [{"name": "amount", "type": "double"}]}
)
USER_PROTO = 'syntax = "proto3";\npackage streamhydro.dep;\n\nmessage User {\n  int32 age = 1;\n}\n'
EVENT_PROTO = (
    'syntax = "proto3";\npackage streamhydro.ev;\n\nimport "user.proto";\n\n'
    "message Event {\n  streamhydro.dep.User user = 1;\n  double amount = 2;\n}\n"
)


@pytest.fixture
def registry(schema_registry_url):
    from confluent_kafka.schema_registry import SchemaRegistryClient

    return SchemaRegistryClient({"url": schema_registry_url})


@pytest.fixture
def subject() -> str:
    """A fresh subject prefix per test, so tests sharing a registry never see each other's schemas."""
    return f"s-{uuid.uuid4().hex[:12]}"


def by_id(url: str, schema_id: int, query: str = "") -> dict:
    """The registry's raw answer to ``GET /schemas/ids/{id}``."""
    return json.loads(get(f"{url}/schemas/ids/{schema_id}{query}"))


def test_avro_schema_by_id_is_the_registered_text(registry, schema_registry_url, subject):
    from confluent_kafka.schema_registry import Schema

    schema_id = registry.register_schema(f"{subject}-value", Schema(AVRO_SCHEMA, "AVRO"))
    body = by_id(schema_registry_url, schema_id)
    assert body["schema"] == AVRO_SCHEMA
    assert body.get("schemaType", "AVRO") == "AVRO"
    assert registry.register_schema(f"{subject}-other-value", Schema(AVRO_SCHEMA, "AVRO")) == schema_id


def test_avro_serializer_writes_the_wire_format(registry, subject):
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    context = SerializationContext(subject, MessageField.VALUE)
    value = AvroSerializer(registry, AVRO_SCHEMA)({"amount": 1.5}, context)
    schema_id = int.from_bytes(value[1:5], "big")
    assert value[0] == 0
    assert registry.get_schema(schema_id).schema_str == AVRO_SCHEMA
    assert AvroDeserializer(registry)(value, context) == {"amount": 1.5}


def test_protobuf_source_with_a_reference_comes_back_as_source(registry, schema_registry_url, subject):
    from confluent_kafka.schema_registry import Schema, SchemaReference

    dependency = f"{subject}-user.proto"
    registry.register_schema(dependency, Schema(USER_PROTO, "PROTOBUF"))
    reference = SchemaReference("user.proto", dependency, 1)
    schema_id = registry.register_schema(f"{subject}-value", Schema(EVENT_PROTO, "PROTOBUF", [reference]))

    for query in ("", "?format=serialized"):
        body = by_id(schema_registry_url, schema_id, query)
        assert body["schemaType"] == "PROTOBUF"
        assert body["references"] == [{"name": "user.proto", "subject": dependency, "version": 1}]
        assert body["schema"] == EVENT_PROTO or _descriptor(body["schema"]).message_type[0].name == "Event"
    resolved = registry.get_version(dependency, 1)
    assert resolved.schema.schema_str == USER_PROTO
    assert resolved.schema.schema_type == "PROTOBUF"


def test_protobuf_serializer_registers_a_base64_descriptor(registry, schema_registry_url, subject):
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    file = descriptor_pb2.FileDescriptorProto(name=f"{subject}.proto", package="streamhydro.gen", syntax="proto3")
    message = file.message_type.add(name="Event")
    message.field.add(
        name="amount",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    event = message_factory.GetMessageClass(pool.FindMessageTypeByName("streamhydro.gen.Event"))
    settings = {"use.deprecated.format": False}
    context = SerializationContext(subject, MessageField.VALUE)

    value = ProtobufSerializer(event, registry, settings)(event(amount=2.5), context)
    schema_id = int.from_bytes(value[1:5], "big")
    assert (value[0], value[5]) == (0, 0)  # magic byte; message indexes [0] written as one zero byte
    assert _descriptor(by_id(schema_registry_url, schema_id)["schema"]) == file
    assert ProtobufDeserializer(event, settings)(value, context).amount == 2.5


def test_unknown_id_is_not_found(registry):
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    with pytest.raises(SchemaRegistryError) as raised:
        registry.get_schema(2_000_000_000)
    assert raised.value.http_status_code == 404
    assert raised.value.error_code == 40403


def test_start_failure_is_a_broker_error_with_the_log():
    from streamhydro.brokers import BrokerConfig, SchemaRegistryServer
    from streamhydro.errors import BrokerError

    server = SchemaRegistryServer(BrokerConfig(start_timeout_s=0.5, port_attempts=1))
    with pytest.raises(BrokerError, match="did not answer GET /apis/ccompat/v7/subjects") as raised:
        server.start()
    assert str(server.log_path) in str(raised.value)
    assert not server.running()


def _descriptor(text: str):
    from google.protobuf import descriptor_pb2

    return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=True))
