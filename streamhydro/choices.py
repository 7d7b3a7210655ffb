"""Settings that take one of a few names: the one parser of every settings enum.

Runs on the driver: when the configuration is loaded (the TOML file, its environment overrides) and when
a Spark reader or writer's options are parsed (:mod:`streamhydro.kafka.options`). The enums themselves
live beside what they choose (``Connector``, ``Delivery`` and ``EndOffsets`` in
:mod:`streamhydro.kafka.options`, ``Selector`` in :mod:`streamhydro.registry`, ``PayloadFormat`` in
:mod:`streamhydro.payload`); each is an ``enum.StrEnum``, so a member prints, formats and compares as
its value.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from streamhydro.errors import ConfigError

E = TypeVar("E", bound=enum.StrEnum)


def allowed(choices: type[enum.StrEnum]) -> str:
    """The values of ``choices`` for a message: ``a, b or c``."""
    values = [member.value for member in choices]
    return f"{', '.join(values[:-1])} or {values[-1]}" if len(values) > 1 else values[0]


def parse_choice(choices: type[E], value: object, key: str) -> E:
    """The member of ``choices`` whose value is ``value``, compared without case (Spark hands options
    lower-cased); a ConfigError naming ``key`` (a settings key or a Spark option) and the allowed values."""
    if isinstance(value, str):
        for member in choices:
            if member.value.lower() == value.strip().lower():
                return member
    raise ConfigError(key, f"{value!r} is not one of {allowed(choices)}", f"set {key} to {allowed(choices)}")
