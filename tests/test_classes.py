"""The driver JVM's class archive option (streamhydro.classes): where it goes and what it leaves alone."""

from __future__ import annotations

import pytest

from streamhydro import classes
from streamhydro.jars import CACHE_ENV


@pytest.fixture
def archive(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    return classes.archive_path()


def test_no_archive_no_option(archive):
    assert not archive.exists()
    assert classes.sharing_conf({}) == {}


def test_the_archive_follows_the_users_own_driver_options(archive):
    archive.write_bytes(b"made by streamhydro jars")
    option = classes.sharing_conf({classes.DRIVER_JAVA_OPTIONS: "-Dmine=1"})[classes.DRIVER_JAVA_OPTIONS]
    assert option.startswith("-Dmine=1 ") and f"-XX:SharedArchiveFile={archive}" in option and "-Xshare:auto" in option
    assert classes.sharing_conf({}) == {classes.DRIVER_JAVA_OPTIONS: option.removeprefix("-Dmine=1 ")}


def test_a_users_own_archive_wins(archive):
    archive.write_bytes(b"made by streamhydro jars")
    assert classes.sharing_conf({classes.DRIVER_JAVA_OPTIONS: "-XX:SharedArchiveFile=/opt/theirs.jsa"}) == {}


def test_the_archive_is_per_pyspark_installation_and_java(archive, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", "/opt/another-java")
    assert classes.archive_path() != archive and classes.archive_path().parent == archive.parent
