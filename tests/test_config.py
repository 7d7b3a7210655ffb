"""The serve configuration: every bad value fails at start with the key and the fix."""

from __future__ import annotations

import pytest

from streamhydro import config
from streamhydro.errors import ConfigError
from streamhydro.kafka.options import Connector, Delivery, EndOffsets, parse_source_options
from streamhydro.payload import PayloadFormat
from streamhydro.registry import Selector
from streamhydro.spark import Master


def load(text: str, tmp_path, environ=None):
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return config.load(path, environ or {})


def test_defaults_are_valid():
    cfg = config.load(None, {})
    assert cfg.kafka.subscribe == "events"
    assert cfg.model.version is Selector.PROMOTED
    assert (cfg.kafka.source, cfg.kafka.delivery, cfg.kafka.end_offsets_from) == (
        Connector.BUILTIN, Delivery.AT_LEAST_ONCE, EndOffsets.LIST_OFFSETS
    )


def test_file_values_and_types(tmp_path):
    cfg = load(
        """
        [kafka]
        bootstrap_servers = "broker:9093"
        max_offsets_per_trigger = 5000
        client = { "security.protocol" = "SASL_SSL", "enable.ssl.certificate.verification" = false }
        [inference]
        providers = ["CPUExecutionProvider"]
        """,
        tmp_path,
    )
    assert cfg.kafka.bootstrap_servers == "broker:9093"
    assert cfg.kafka.max_offsets_per_trigger == 5000
    assert cfg.kafka.client["enable.ssl.certificate.verification"] == "false"
    assert cfg.inference.providers == ("CPUExecutionProvider",)


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError) as info:
        load("[kafka]\nbootsrap_servers = 'x'\n", tmp_path)
    assert info.value.key == "kafka.bootsrap_servers"
    assert "kafka.bootstrap_servers" in str(info.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load("[kafak]\n", tmp_path)
    assert "did you mean 'kafka'" in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[inference]\nbatch_size = 'big'", "inference.batch_size"),
        ("[inference]\nbatch_size = 0", "inference.batch_size"),
        ("[kafka]\nsubscribe_pattern = 'ev.*'", "kafka.subscribe"),
        ("[kafka]\nsource = 'jvm'", "kafka.source"),
        ("[kafka]\ndead_letter_topic = 'predictions'", "kafka.dead_letter_topic"),
        ("[kafka]\nstarting_offsets = 'yesterday'", "kafka.starting_offsets"),
        ("[payload]\nformat = 'csv'", "payload.format"),
        ("[payload]\nformat = 'avro'", "payload.schema_registry_url"),
        ("[payload]\nformat = 'avro'\nschema = 'a.avsc'\nschema_registry_url = 'http://r'", "payload.schema_registry_url"),
        ("[payload]\nformat = 'protobuf'\nschema = 'no/such.proto'", "payload.schema"),
        ("[payload]\nschema_registry_url = 'http://r'", "payload.schema_registry_url"),
        ("[payload]\nformat = 'avro'\nschema_registry_url = 'http://r'\nmessage = 'a.B'", "payload.message"),
        ("[model]\nversion = 'newest'", "model.version"),
        ("[payload]\nmax_value_bytes = 0", "payload.max_value_bytes"),
        ("[spark]\ntask_gpus = 0.5", "spark.executor_gpus"),
        ("[spark]\nexecutor_gpus = 2\ntask_gpus = 1.5", "spark.task_gpus"),
        ("[metrics]\ncertfile = 'cert.pem'", "metrics.keyfile"),
        ("[metrics]\nenabled = 'maybe'", "metrics.enabled"),
    ],
)
def test_bad_values_name_their_key(text, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        load(text, tmp_path)
    assert info.value.key == key
    assert info.value.fix


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load("[kafka\n", tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", {})


def test_environment_overrides_and_secret_references(tmp_path):
    cfg = load(
        "[kafka]\nclient = { 'sasl.password' = '${KAFKA_PASSWORD}', 'sasl.username' = 'svc' }\n",
        tmp_path,
        {"KAFKA_PASSWORD": "hunter2", "STREAMHYDRO_KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9092", "STREAMHYDRO_INFERENCE_BATCH_SIZE": "512"},
    )
    assert cfg.kafka.client["sasl.password"] == "hunter2"
    assert cfg.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert cfg.inference.batch_size == 512
    assert "hunter2" not in repr(cfg)
    assert "svc" in repr(cfg)


def test_unset_secret_reference_names_the_variable(tmp_path):
    with pytest.raises(ConfigError) as info:
        load("[kafka]\nclient = { 'sasl.password' = '${KAFKA_PASSWORD}' }\n", tmp_path)
    assert info.value.key == "kafka.client.sasl.password"
    assert "KAFKA_PASSWORD" in str(info.value)


def test_source_options_use_sparks_kafka_option_names():
    cfg = config.Config().replace(kafka={"client": {"security.protocol": "SSL"}, "max_offsets_per_trigger": 10})
    options = cfg.kafka.source_options()
    assert options["kafka.bootstrap.servers"] == "127.0.0.1:9092"
    assert options["subscribe"] == "events"
    assert options["maxOffsetsPerTrigger"] == "10"
    assert options["kafka.security.protocol"] == "SSL"
    assert options["startingOffsets"] == "earliest"
    assert "subscribePattern" not in options


def test_payload_defaults_to_json_with_a_one_mebibyte_limit():
    payload = config.load(None, {}).payload
    assert (payload.format, payload.max_value_bytes) == ("json", 1 << 20)


def test_schema_registry_client_secrets_are_masked(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[payload]\nformat = "avro"\nschema_registry_url = "http://r:8081"\n'
                    'schema_registry_client = {"basic.auth.user.info" = "${SR_AUTH}"}\n')
    payload = config.load(path, {"SR_AUTH": "user:hunter22"}).payload
    assert payload.schema_registry_client["basic.auth.user.info"] == "user:hunter22"
    assert "hunter22" not in repr(payload)


def test_reference_documents_every_key():
    rows = config.reference()
    names = {name for name, _, _ in rows}
    assert {"kafka.bootstrap_servers", "model.version", "inference.pipeline_depth", "metrics.port"} <= names
    assert all(text for _, _, text in rows)


def test_the_configuration_reference_is_the_code_s():
    from pathlib import Path

    written = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert written == config.reference_markdown(), "docs/configuration.md is stale: regenerate it as its first lines say"
    assert all(f"`{name}`" in written for name, _, _ in config.reference())


def test_serve_with_a_bad_config_exits_2_naming_the_key(tmp_path, capfd):
    from streamhydro.cli import main

    path = tmp_path / "serve.toml"
    path.write_text("[inference]\npipeline_depth = -1\n")
    assert main(["--log-dir", str(tmp_path / "log"), "serve", "--config", str(path)]) == 2
    error = capfd.readouterr().err
    assert "inference.pipeline_depth" in error and "Fix:" in error


def test_replace_keeps_the_sections_other_keys():
    cfg = config.Config().replace(inference={"pipeline_depth": 0})
    assert cfg.inference.pipeline_depth == 0
    assert cfg.inference.providers == config.InferenceSettings().providers


@pytest.mark.parametrize(
    ("kafka", "key", "written"),
    [
        ({"subscribe": "events,predictions"}, "kafka.subscribe", "kafka.output_topic"),
        ({"subscribe": " predictions-dlq "}, "kafka.subscribe", "kafka.dead_letter_topic"),
        ({"subscribe": "", "subscribe_pattern": "pred.*"}, "kafka.subscribe_pattern", "kafka.output_topic"),
        ({"subscribe": "", "subscribe_pattern": ".*-dlq"}, "kafka.subscribe_pattern", "kafka.dead_letter_topic"),
        ({"subscribe": "", "assign": '{"events": [0], "predictions-dlq": [2]}'}, "kafka.assign", "kafka.dead_letter_topic"),
        ({"subscribe": "scores", "output_topic": "scores"}, "kafka.subscribe", "kafka.output_topic"),
    ],
)
def test_reading_what_serve_writes_is_refused_naming_both_keys(kafka, key, written):
    with pytest.raises(ConfigError) as info:
        config.Config().replace(kafka=kafka)
    assert info.value.key == key
    assert written in str(info.value) and key in str(info.value.fix)


@pytest.mark.parametrize(
    "kafka",
    [
        {"subscribe": "events,predictions-in"},
        {"subscribe": "", "subscribe_pattern": "pred"},  # the whole name must match, as in Spark's source
        {"subscribe": "", "subscribe_pattern": "events-.*"},
        {"subscribe": "", "assign": '{"events": [0, 1]}'},
    ],
)
def test_inputs_apart_from_the_outputs_are_accepted(kafka):
    config.Config().replace(kafka=kafka)


@pytest.mark.parametrize(
    ("kafka", "key"),
    [({"subscribe": "", "subscribe_pattern": "(events"}, "kafka.subscribe_pattern"), ({"subscribe": "", "assign": "[1]"}, "kafka.assign")],
)
def test_an_unreadable_subscription_names_its_config_key(kafka, key):
    with pytest.raises(ConfigError) as info:
        config.Config().replace(kafka=kafka)
    assert info.value.key == key


@pytest.mark.parametrize(("written", "depth"), [("auto", None), (0, 0), (2, 2), ("3", 3)])
def test_pipeline_depth_is_auto_or_a_number_of_batches(written, depth):
    cfg = config.Config().replace(inference={"pipeline_depth": written})
    assert config.pipeline_depth(cfg.inference) == depth


@pytest.mark.parametrize("written", [-1, "fast", 1.5, True, "-2"])
def test_a_pipeline_depth_that_is_neither_is_refused(written):
    with pytest.raises(ConfigError) as refused:
        config.Config().replace(inference={"pipeline_depth": written})
    assert refused.value.key == "inference.pipeline_depth"


def test_auto_pipelines_on_a_gpu_only():
    from streamhydro.executor.engine import GPU_PIPELINE_DEPTH, EngineSettings

    assert config.InferenceSettings().pipeline_depth == "auto"
    assert EngineSettings().depth_for(on_gpu=True) == GPU_PIPELINE_DEPTH
    assert EngineSettings().depth_for(on_gpu=False) == 0
    assert EngineSettings(pipeline_depth=2).depth_for(on_gpu=False) == 2


@pytest.mark.parametrize(
    ("text", "key", "values"),
    [
        ("[kafka]\nsource = 'jvm'", "kafka.source", "builtin or python"),
        ("[kafka]\nsource = 'python'\ndelivery = 'exactly-once'", "kafka.delivery", "at_least_once or exactly_once"),
        ("[kafka]\nsource = 'python'\nend_offsets_from = 'watermark'", "kafka.end_offsets_from", "listOffsets or fetch"),
        ("[payload]\nformat = 'csv'", "payload.format", "json, avro, protobuf or tensor"),
        ("[model]\nversion = 'newest'", "model.version", "latest or promoted"),
        ("[model]\nversion = 0", "model.version", "latest or promoted"),
    ],
)
def test_an_unknown_choice_is_refused_naming_the_key_and_the_allowed_values(text, key, values, tmp_path):
    with pytest.raises(ConfigError) as refused:
        load(text, tmp_path)
    assert refused.value.key == key
    assert values in refused.value.problem + refused.value.fix


def test_choices_are_enum_members_from_the_file_and_the_environment(tmp_path):
    cfg = load(
        "[kafka]\nsource = 'python'\n[payload]\nformat = 'tensor'\n[model]\nversion = 3\n",
        tmp_path,
        {"STREAMHYDRO_KAFKA_DELIVERY": "exactly_once", "STREAMHYDRO_KAFKA_END_OFFSETS_FROM": "FETCH"},
    )
    assert cfg.kafka.source is Connector.PYTHON and cfg.payload.format is PayloadFormat.TENSOR and cfg.model.version == 3
    assert cfg.kafka.delivery is Delivery.EXACTLY_ONCE and cfg.kafka.end_offsets_from is EndOffsets.FETCH
    assert load("", tmp_path, {"STREAMHYDRO_MODEL_VERSION": "latest"}).model.version is Selector.LATEST
    assert load("", tmp_path, {"STREAMHYDRO_MODEL_VERSION": "7"}).model.version == 7
    assert cfg.kafka.source_options()["endOffsetsFrom"] == "fetch"


def test_an_environment_override_of_a_choice_is_checked_like_the_file(tmp_path):
    with pytest.raises(ConfigError) as refused:
        load("", tmp_path, {"STREAMHYDRO_KAFKA_SOURCE": "jvm"})
    assert refused.value.key == "kafka.source" and "builtin or python" in refused.value.fix


@pytest.mark.parametrize(
    ("kafka", "key", "option"),
    [
        ({"starting_offsets": '{"events": {"0": -3}}'}, "kafka.starting_offsets", {"startingOffsets": '{"events": {"0": -3}}'}),
        ({"subscribe": "", "subscribe_pattern": "(ev"}, "kafka.subscribe_pattern", {"subscribe": "", "subscribePattern": "(ev"}),
        ({"subscribe": "", "assign": '{"events": "0"}'}, "kafka.assign", {"subscribe": "", "assign": '{"events": "0"}'}),
        ({"subscribe": ""}, "kafka.subscribe", {"subscribe": ""}),
    ],
)
def test_one_rule_names_the_settings_key_from_the_file_and_the_option_from_spark(kafka, key, option):
    """The configuration is checked with the connector's own parsers: the same refusal, named for where it was written."""
    with pytest.raises(ConfigError) as from_settings:
        config.Config().replace(kafka=kafka)
    assert from_settings.value.key == key
    options = {**config.Config().kafka.source_options(), **option}
    with pytest.raises(ConfigError) as from_options:
        parse_source_options(options)
    assert from_options.value.key == next(iter(option.keys() - {"subscribe"}), "subscribe")
    if key != "kafka.subscribe":  # that one's problem lists the three keys, each in its own spelling
        assert from_settings.value.problem == from_options.value.problem


def test_an_unknown_end_offsets_option_is_refused_by_the_data_source():
    with pytest.raises(ConfigError) as refused:
        parse_source_options({**config.Config().kafka.source_options(), "endOffsetsFrom": "watermark"})
    assert refused.value.key == "endOffsetsFrom" and "listOffsets or fetch" in refused.value.fix
    assert parse_source_options({**config.Config().kafka.source_options(), "endoffsetsfrom": "FETCH"}).end_offsets is EndOffsets.FETCH


SERVE_GPUS = {"executor_gpus": 1, "task_gpus": 1.0, "gpu_discovery_script": "deploy/gpu/get_gpus_resources.sh"}
TRAIN_DATA = {"format": "csv", "path": "x.csv", "features": ["a", "b"], "label": "y", "labels": ["n", "p"]}


def _serve(spark):
    return config.Config().replace(spark=spark)


def _train(spark):
    from streamhydro.trainer.config import from_mapping

    return from_mapping({"data": TRAIN_DATA, "spark": spark}, {})


@pytest.mark.parametrize(("build", "gpus"), [(_serve, SERVE_GPUS), (_train, {"gpus_per_rank": 1})], ids=["serve", "train"])
def test_serve_and_train_refuse_gpus_on_a_local_master_alike(build, gpus):
    with pytest.raises(ConfigError) as refused:
        build({"master": "local[4]", **gpus})
    assert refused.value.key == "spark.master" and "local-cluster" in refused.value.fix
    assert next(iter(gpus)) in refused.value.problem
    for master in ("local-cluster[2,1,1024]", "spark://host:7077"):
        assert build({"master": master, **gpus}).spark.master == master
    assert build({"master": "local[4]"}).spark.master == "local[4]"


@pytest.mark.parametrize(("build", "gpus"), [(_serve, SERVE_GPUS), (_train, {"gpus_per_rank": 1})], ids=["serve", "train"])
def test_gpus_under_spark_submits_local_master_are_refused_once_it_is_known(build, gpus):
    """An empty spark.master is spark-submit's, known only once Spark runs; both commands then ask the same check."""
    settings = build({"master": "", **gpus}).spark
    with pytest.raises(ConfigError) as refused:
        settings.check_master(Master.parse("local[2]"))
    assert refused.value.key == "spark.master"
    settings.check_master(Master.parse("spark://host:7077"))


def test_serve_and_train_share_the_spark_and_metrics_sections():
    from streamhydro.trainer import config as train

    assert issubclass(config.SparkSettings, config.SparkSection) and issubclass(train.SparkSettings, config.SparkSection)
    assert issubclass(config.MetricsSettings, config.MetricsSection) and issubclass(train.MetricsSettings, config.MetricsSection)
    for build in (_serve, _train):
        with pytest.raises(ConfigError) as refused:
            build({"master": "local[N]"})
        assert refused.value.key == "spark.master"
    with pytest.raises(ConfigError) as refused:
        config.Config().replace(metrics={"host": ""})
    assert refused.value.key == "metrics.host"
