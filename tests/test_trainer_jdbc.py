"""A JDBC read from a real PostgreSQL feeds training.

The test starts a throwaway PostgreSQL cluster (Debian's ``postgresql`` package) in a temporary
directory, loads the demo data set into a table, and runs ``streamhydro train`` in a subprocess
(the JDBC driver jar must be on the classpath of a fresh SparkContext) with the password taken
from the environment. PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamhydro.registry import Registry
from streamhydro.trainer.data import JDBC_DRIVERS
from conftest import free_port

pytestmark = [pytest.mark.spark, pytest.mark.slow]

PASSWORD = "s3cret-for-the-test"
USER = "trainer"
INSTALL = "apt-get install postgresql libpostgresql-jdbc-java"


def server_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name)]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} is not installed; CI must run: {INSTALL}")
    return found[-1]


@pytest.fixture
def postgres() -> Iterator[int]:
    """A PostgreSQL server on a free loopback port, user ``trainer`` with PASSWORD; yields the port."""
    if not Path(JDBC_DRIVERS["jdbc:postgresql:"][0]).is_file():
        pytest.fail(f"PostgreSQL's JDBC driver is not installed; CI must run: {INSTALL}")
    initdb, pg_ctl = server_binary("initdb"), server_binary("pg_ctl")
    as_server_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="streamhydro-pg-"))
    base.chmod(0o755)
    (base / "pwfile").write_text(PASSWORD + "\n")
    if as_server_user:
        shutil.chown(base, "postgres")
        shutil.chown(base / "pwfile", "postgres")
    data, port = base / "data", free_port()
    try:
        subprocess.run(
            [*as_server_user, initdb, "-D", str(data), "-U", USER, f"--pwfile={base / 'pwfile'}", "-A", "scram-sha-256", "--no-sync"],
            check=True, capture_output=True, text=True,
        )
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*as_server_user, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o", options, "start"],
            check=True, capture_output=True, text=True,
        )
        yield port
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_server_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, check=False)
        shutil.rmtree(base)


def psql(port: int, *args: str) -> None:
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-d", "postgres", "-v", "ON_ERROR_STOP=1", *args],
        env=env, check=True, capture_output=True, text=True,
    )


def test_training_from_a_postgresql_table(postgres, tmp_path):
    header = Path("models/training/breast_cancer.csv").read_text().splitlines()[0].split(",")
    columns = ", ".join(f"{name} double precision" for name in header[:-1])
    psql(postgres, "-c", f"CREATE TABLE cancer ({columns}, diagnosis text)")
    psql(postgres, "-c", "\\copy cancer FROM 'models/training/breast_cancer.csv' CSV HEADER")

    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "TEST_PG_PASSWORD": PASSWORD,
        "STREAMHYDRO_DATA_FORMAT": "jdbc",
        "STREAMHYDRO_DATA_URL": f"jdbc:postgresql://127.0.0.1:{postgres}/postgres",
        "STREAMHYDRO_DATA_TABLE": "public.cancer",
        "STREAMHYDRO_DATA_USER": USER,
        "STREAMHYDRO_DATA_PASSWORD": "${TEST_PG_PASSWORD}",
        "STREAMHYDRO_MODEL_REGISTRY": str(tmp_path / "models"),
        "STREAMHYDRO_TRAINING_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "STREAMHYDRO_TRAINING_EPOCHS": "10",
    }
    done = subprocess.run(
        [sys.executable, "-m", "streamhydro.cli", "train", "--config", "models/training/breast_cancer.toml"],
        env=env, capture_output=True, text=True, timeout=420, check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]

    version = Registry(tmp_path / "models").get("breast_cancer")
    manifest = version.manifest
    assert manifest.provenance["data"] == {"format": "jdbc", "location": f"jdbc:postgresql://127.0.0.1:{postgres}/postgres public.cancer"}
    assert manifest.metrics["train_rows"] + manifest.metrics["validation_rows"] == 569
    assert manifest.metrics["validation_accuracy"] >= 0.9
    assert PASSWORD not in done.stdout + done.stderr + version.path.with_name("manifest.json").read_text()
