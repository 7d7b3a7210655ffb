"""No secret in any output: one masking rule for config objects, log lines and error messages.

The subprocess tests run ``streamhydro serve`` as users do, with a secret in every secret-bearing
setting, and search everything it printed (stdout, stderr: our log, Spark's and the JVM clients')
for the secret values.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SCRAM_PASSWORD, SCRAM_USER, client
from streamhydro.config import Config, load
from streamhydro.kafka.admin import ensure_topics
from streamhydro.kafka.options import client_config, spark_options
from streamhydro.secrets import MASK, RedactingFilter, is_secret, masked, redact, remember

# Keys that hold secrets, in the Java and the librdkafka spelling.
SECRET_KEYS = [
    "sasl.password",
    "sasl.jaas.config",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.truststore.password",
    "ssl.key.pem",
    "ssl.keystore.key",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "kafka.sasl.jaas.config",
    "SASL.PASSWORD",
    "spark.hadoop.fs.s3a.secret.key",
    "api.token",
]
PLAIN_KEYS = ["bootstrap.servers", "security.protocol", "sasl.mechanism", "sasl.username", "ssl.keystore.location", "ssl.truststore.type", "ssl.ca.location"]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_in_either_spelling_are_secret(key):
    assert is_secret(key)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_ordinary_keys_are_shown(key):
    assert not is_secret(key)


def test_config_and_client_objects_mask_with_the_same_rule():
    jaas = 'org.apache.kafka.common.security.scram.ScramLoginModule required username="u" password="jaas-Pw-0192";'
    config = Config().replace(kafka={"client": {"sasl.mechanism": "SCRAM-SHA-512", "sasl.jaas.config": jaas}})
    assert "jaas-Pw-0192" not in repr(config)
    options = config.kafka.client_options()
    assert "jaas-Pw-0192" not in repr(masked(options))
    assert "jaas-Pw-0192" not in repr(client_config(options))
    assert MASK in repr(client_config(options))


def test_remembered_values_are_redacted_from_any_text_and_log_record(caplog):
    jaas = 'org.apache.kafka.common.security.plain.PlainLoginModule required username="u" password="inner-Pw-5530";'
    remember({"sasl.jaas.config": jaas, "sasl.password": "plain-Pw-8841", "sasl.username": "visible-user"})
    assert redact(f"bad config {jaas} and plain-Pw-8841 for visible-user") == f"bad config {MASK} and {MASK} for visible-user"
    assert redact("the password is inner-Pw-5530") == f"the password is {MASK}"

    logger = logging.getLogger("test_secrets")
    caplog.handler.addFilter(RedactingFilter())
    try:
        raise ValueError("client said: plain-Pw-8841 is wrong")
    except ValueError:
        logger.exception("refused %s", "inner-Pw-5530")
    text = caplog.text
    assert "plain-Pw-8841" not in text and "inner-Pw-5530" not in text
    assert "refused" in text and "ValueError" in text


def test_translation_to_java_masks_the_generated_jaas_entry():
    options = spark_options("h:1", {"sasl.mechanism": "PLAIN", "sasl.username": "u", "sasl.password": "gen-Pw-2214"})
    assert "gen-Pw-2214" in options["kafka.sasl.jaas.config"]
    assert "gen-Pw-2214" not in repr(masked(options))


# ---- the service, as users run it ---------------------------------------------------------------

SECRET_ENV = {"KAFKA_PASSWORD": SCRAM_PASSWORD, "KEY_PASSWORD": "keyPw-Secret-6620", "OAUTH_SECRET": "oauth-Secret-3391"}


def _config(tmp_path, bootstrap: str, source: str, settings: dict[str, str], env: dict[str, str]) -> str:
    """serve's TOML; secrets only as ``${NAME}`` references, checked with ``env`` as serve will read it."""
    lines = "\n".join(f'"{key}" = "{value}"' for key, value in settings.items())
    path = tmp_path / "serve.toml"
    path.write_text(
        f"""
[spark]
checkpoint_location = "{tmp_path / 'checkpoint'}"
[kafka]
bootstrap_servers = "{bootstrap}"
subscribe = "secrets-in"
output_topic = "secrets-out"
dead_letter_topic = "secrets-dlq"
source = "{source}"
[kafka.client]
{lines}
[metrics]
port = 0
multiprocess_dir = "{tmp_path / 'metrics'}"
"""
    )
    load(path, environ=env)
    return str(path)


def _serve(config: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    """serve with its console on a pipe and Spark's, Kafka's and the libraries' output in ``log_dir``."""
    return subprocess.Popen(
        [sys.executable, "-m", "streamhydro", "--log-dir", str(log_dir), "serve", "--config", config],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )


def _assert_no_secret(output: str, log_dir: Path) -> None:
    """No secret in the console output nor in the third-party log file."""
    logged = (log_dir / "streamhydro-serve.log").read_text(errors="replace")
    assert "Spark" in logged, "the log file holds Spark's output"
    output += logged
    for secret in SECRET_ENV.values():
        assert secret not in output, f"secret {secret[:4]}... printed:\n{output[-3000:]}"


@pytest.mark.spark
@pytest.mark.broker
def test_a_refused_client_configuration_prints_no_secret(tmp_path, kafka_bootstrap):
    settings = {
        "sasl.username": SCRAM_USER,
        "sasl.password": "${KAFKA_PASSWORD}",
        "sasl.mechanism": "SCRAM-SHA-512",
        "ssl.key.password": "${KEY_PASSWORD}",
        "sasl.oauthbearer.client.secret": "${OAUTH_SECRET}",
        "socket.timeout.ms": "not-a-number",
    }
    env = {**os.environ, **SECRET_ENV}
    serve = _serve(_config(tmp_path, kafka_bootstrap, "python", settings, env), env, tmp_path / "log")
    output, _ = serve.communicate(timeout=300)
    assert serve.returncode == 2, output[-3000:]
    assert "socket.timeout.ms" in output, "the error names the setting the client refused"
    _assert_no_secret(output, tmp_path / "log")


@pytest.mark.spark
@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("source", ["python", "builtin"])
def test_a_normal_start_and_stop_prints_no_secret(tmp_path, scram_kafka, source):
    jaas = f'org.apache.kafka.common.security.scram.ScramLoginModule required username="{SCRAM_USER}" password="{SCRAM_PASSWORD}";'
    settings = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512", "sasl.jaas.config": "${JAAS}"}
    env = {**os.environ, **SECRET_ENV, "JAAS": jaas}
    ensure_topics(client(scram_kafka.bootstrap_servers, scram_kafka.client_settings), {"secrets-in": 1})
    serve = _serve(_config(tmp_path, scram_kafka.bootstrap_servers, source, settings, env), env, tmp_path / "log")
    try:
        deadline = time.monotonic() + 240
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if "query started" in line or time.monotonic() > deadline:
                break
        assert any("query started" in line for line in lines), "".join(lines)[-3000:]
        serve.send_signal(signal.SIGTERM)
        rest, _ = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
    assert serve.returncode == 0, rest[-3000:]
    _assert_no_secret("".join(lines) + rest, tmp_path / "log")
