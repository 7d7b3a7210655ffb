"""The ``streamhydro`` command's help: every subcommand answers ``--help`` without starting or importing Spark."""

from __future__ import annotations

import subprocess
import sys

from streamhydro.cli import COMMANDS, build_parser

PROBE = """
import sys
from streamhydro.cli import build_parser
try:
    build_parser().parse_args(sys.argv[1:] + ["--help"])
except SystemExit as done:
    code = done.code
heavy = sorted(name for name in ("pyspark", "torch", "onnxruntime") if name in sys.modules)
print("exit", code, "heavy", ",".join(heavy) or "none", file=sys.stderr)
"""


def _subcommands() -> list[list[str]]:
    subparsers = build_parser()._subparsers._group_actions[0].choices
    commands = [[]]
    for name, parser in subparsers.items():
        commands.append([name])
        nested = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        commands.extend([name, action] for group in nested for action in group.choices)
    return commands


def test_every_subcommand_has_help_without_importing_spark_torch_or_onnxruntime():
    commands = _subcommands()
    assert len([c for c in commands if len(c) == 1]) == len(COMMANDS)
    for command in commands:
        done = subprocess.run([sys.executable, "-c", PROBE, *command], capture_output=True, text=True, timeout=60)
        assert "exit 0 heavy none" in done.stderr, (command, done.stderr[-2000:])
        assert "usage: streamhydro" in done.stdout, command
