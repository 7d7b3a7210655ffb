"""The jar cache's build step, with a stand-in ``mvn`` on the PATH: a complete folder or none at all."""

from __future__ import annotations

import os
import stat
import xml.etree.ElementTree as ET

import pytest

from streamhydro import jars
from streamhydro.errors import ConfigError

# Writes what quarkus-maven-plugin's legacy-jar packaging leaves in target/, or fails when told to, or
# meanwhile fills the cache folder itself, as a second process building at the same time would.
FAKE_MVN = """#!/bin/sh
[ -n "$FAKE_MVN_FAIL" ] && { echo "could not resolve io.example:missing"; exit 1; }
[ -n "$FAKE_MVN_RACE" ] && { mkdir -p "$FAKE_MVN_RACE"; echo other > "$FAKE_MVN_RACE/app-1-runner.jar"; }
project=$(dirname "$4")
mkdir -p "$project/target/lib"
echo runner > "$project/target/app-1-runner.jar"
echo dependency > "$project/target/lib/dep-1.jar"
"""


@pytest.fixture
def fake_mvn(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text(FAKE_MVN)
    mvn.chmod(mvn.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(jars.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_keeps_the_runner_jar_beside_its_lib(fake_mvn):
    app = jars.QuarkusApp("app-1", "<project/>")
    runner = jars.build(app)
    assert runner == fake_mvn / "app-1" / "app-1-runner.jar"
    assert (runner.parent / "lib" / "dep-1.jar").read_text() == "dependency\n"
    assert jars.cached(app) == [runner]
    assert [p.name for p in fake_mvn.iterdir()] == ["app-1"]  # no temporary folder left behind


def test_failed_build_leaves_nothing_and_says_why(fake_mvn, monkeypatch):
    monkeypatch.setenv("FAKE_MVN_FAIL", "1")
    with pytest.raises(ConfigError, match="io.example:missing"):
        jars.build(jars.QuarkusApp("app-1", "<project/>"))
    assert not any(fake_mvn.iterdir())


def test_build_finished_meanwhile_by_another_process_is_used(fake_mvn, monkeypatch):
    monkeypatch.setenv("FAKE_MVN_RACE", str(fake_mvn / "app-1"))
    runner = jars.build(jars.QuarkusApp("app-1", "<project/>"))
    assert runner.read_text() == "other\n"
    assert [p.name for p in fake_mvn.iterdir()] == ["app-1"]


def test_apicurio_pom_is_valid_maven_xml():
    app = jars.apicurio_registry()
    project = ET.fromstring(app.pom)
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    assert project.find("m:version", ns).text == jars.APICURIO_VERSION
    plugins = {p.find("m:artifactId", ns).text: p for p in project.iterfind("m:build/m:plugins/m:plugin", ns)}
    assert plugins["quarkus-maven-plugin"].find("m:version", ns).text == jars.APICURIO_QUARKUS_VERSION
    assert app.name == f"apicurio-registry-{jars.APICURIO_VERSION}"
