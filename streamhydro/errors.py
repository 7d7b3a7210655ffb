"""Exceptions. Every error streamhydro raises on purpose derives from :class:`StreamhydroError`.

Messages name the bad value and the fix; the fields let callers act without parsing text.
"""

from __future__ import annotations


class StreamhydroError(Exception):
    """Root of every error streamhydro raises on purpose."""


class ConfigError(StreamhydroError):
    """A configuration value is missing or wrong. Raised at start, before any work is done."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(f"config key '{key}': {problem}. Fix: {fix}")


class ModelError(StreamhydroError):
    """A model in the registry cannot be served: missing, corrupt, or not fitting its manifest."""

    def __init__(self, model: str, problem: str) -> None:
        self.model = model
        self.problem = problem
        super().__init__(f"model {model}: {problem}")


class CpuFallbackError(StreamhydroError):
    """A task Spark assigned a GPU got an ONNX Runtime session without a GPU provider, and
    ``inference.allow_cpu_fallback`` is off: scoring on the CPU would hold the GPU and leave it idle."""

    def __init__(self, requested_device: str, providers: tuple[str, ...], available: tuple[str, ...], cause: str, fix: str) -> None:
        self.requested_device = requested_device
        self.providers = providers
        self.available = available
        self.cause = cause
        self.fix = fix
        super().__init__(
            f"task assigned {requested_device} but its ONNX Runtime session runs on {list(providers)}: {cause}. Fix: {fix}"
        )


class KafkaConnectorError(StreamhydroError):
    """The Kafka connector could not read or deliver records."""


class DeliveryError(KafkaConnectorError):
    """Records were not acknowledged by the broker; the task fails so that Spark retries it."""

    def __init__(self, failed: int, total: int, first_error: str) -> None:
        self.failed = failed
        self.total = total
        self.first_error = first_error
        super().__init__(f"{failed} of {total} records were not delivered (first error: {first_error})")


class DataLossError(KafkaConnectorError):
    """Offsets the query expected to read are gone from the topic (retention, truncation)."""


class BrokerError(StreamhydroError):
    """The embedded broker could not be started or stopped."""


class SchemaRegistryError(StreamhydroError):
    """The schema registry could not answer (unreachable, timed out, refused the credentials).

    Infrastructure, not a record's fault: the task fails and Spark retries it. A schema id the
    registry does not know is the record's problem instead (dead letter ``UnknownSchema``).
    """

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(
            f"schema registry {url}: {problem}. Fix: check payload.schema_registry_url and "
            "payload.schema_registry_client, and that the registry is up"
        )
