"""``streamhydro models list | show | promote | rollback`` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest

from streamhydro.cli import main
from streamhydro.registry import Registry
from tests.test_registry import manifest


@pytest.fixture
def root(tmp_path):
    registry = Registry(tmp_path / "models")
    registry.publish(manifest(), b"one")
    registry.publish(manifest(), b"two")
    return str(registry.root)


def models(root: str, *args: str) -> int:
    return main(["models", "--registry", root, *args])


def test_list_shows_versions_metrics_and_the_promoted_one(root, capsys):
    assert models(root, "promote", "m", "1") == 0
    capsys.readouterr()
    assert models(root, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "m (promoted: 1)"
    assert lines[1].startswith(" *    1 ") and "validation_accuracy=0.9000" in lines[1]
    assert lines[2].startswith("      2 ")


def test_show_prints_the_manifest_with_a_verified_checksum(root, capsys):
    assert models(root, "show", "m", "2") == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["checksum"], shown["labels"]) == (2, "ok", ["no", "yes"])


def test_show_reports_a_corrupt_model(root, capsys):
    Registry(root).get("m", 2).path.write_bytes(b"tampered")
    assert models(root, "show", "m", "2") == 2
    assert "checksum mismatch" in capsys.readouterr().err


def test_promote_then_rollback(root, capsys):
    assert models(root, "promote", "m", "1") == 0
    assert models(root, "promote", "m", "2") == 0
    assert models(root, "rollback", "m") == 0
    assert "promoted 2 -> 1" in capsys.readouterr().out
    assert Registry(root).resolve("m", "promoted") == 1
    assert models(root, "rollback", "m") == 2
    assert "nothing to roll back to" in capsys.readouterr().err


def test_promote_refuses_an_unknown_version(root, capsys):
    assert models(root, "promote", "m", "9") == 2
    assert "version '9' not found" in capsys.readouterr().err
