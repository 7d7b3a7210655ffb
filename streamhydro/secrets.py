"""The one rule for secrets: which settings are secret, and how they are kept out of every output.

Runs wherever settings are shown: config objects' ``repr`` (driver, executors), log records and the
CLI's error line (driver).

- :func:`is_secret` decides by the setting's *name*, for Kafka's Java spelling and librdkafka's alike
  (``sasl.jaas.config``, ``sasl.password``, ``ssl.key.password``, ``ssl.keystore.password``,
  ``ssl.key.pem``, ``ssl.keystore.key``, ``sasl.oauthbearer.client.secret``, ``sasl.oauthbearer.config``,
  tokens, credentials...).
- :func:`masked` is a settings mapping with secret values replaced, for ``repr`` and log lines.
- :func:`remember` records secret *values* as they are read (the config loader calls it), and
  :func:`redact` replaces each remembered value in any text. A log filter installed by
  :func:`install_log_filter` runs every log record through :func:`redact`, so a secret that reaches a
  message some other way (a client's error text quoting its configuration) is still never printed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping

MASK = "***"

_SECRET_NAME = re.compile(
    r"password|passwd|secret|jaas|token|credential|"
    r"ssl[._]key(?!store\.(location|type))|keystore\.key|key\.pem|private[._]key|"
    r"sasl\.oauthbearer\.config|api[._]key|basic[._]auth",
    re.IGNORECASE,
)
# Values shorter than this are not redacted from free text: "1" or "PLAIN" would blank out half a log.
_MIN_REDACTED_LENGTH = 4

_lock = threading.Lock()
_values: set[str] = set()


def is_secret(key: str) -> bool:
    """Whether a setting with this name holds a secret (either Kafka client's spelling, any case)."""
    return _SECRET_NAME.search(key) is not None


def masked(settings: Mapping[str, object]) -> dict[str, object]:
    """``settings`` with the values of secret keys replaced by ``***``."""
    return {key: (MASK if is_secret(str(key)) else value) for key, value in settings.items()}


def remember(settings: Mapping[str, object]) -> None:
    """Record the values of the secret keys of ``settings``, so :func:`redact` removes them from any text."""
    found = {str(value) for key, value in settings.items() if is_secret(str(key)) and len(str(value)) >= _MIN_REDACTED_LENGTH}
    found |= {inner for value in found for inner in _quoted_values(value)}
    with _lock:
        _values.update(found)


def _quoted_values(jaas: str) -> Iterable[str]:
    """The quoted option values of a JAAS entry (``password="..."``), which also appear on their own."""
    return (value for value in re.findall(r'=\s*"((?:[^"\\]|\\.)*)"', jaas) if len(value) >= _MIN_REDACTED_LENGTH)


def redact(text: str) -> str:
    """``text`` with every remembered secret value replaced by ``***``."""
    with _lock:
        values = sorted(_values, key=len, reverse=True)
    for value in values:
        text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A log filter that replaces remembered secret values in the formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            record.exc_text = redact(record.exc_text or logging.Formatter().formatException(record.exc_info))
        return True


def install_log_filter() -> None:
    """Attach :class:`RedactingFilter` to every handler of the root logger (once)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
