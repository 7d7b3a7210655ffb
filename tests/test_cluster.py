"""serve and train on a real Spark standalone cluster: a master and two workers (Spark's own daemons,
from the pyspark package) on loopback, each worker offering two fake GPUs through a discovery script.

Drivers run as the users run them -- ``streamhydro serve`` / ``train`` processes and
``deploy/serve/submit.sh`` in client and cluster deploy mode -- against the Kafka broker of the test
session. What each scoring task was given and what it asked ONNX Runtime for is read from the
executors' logs, where every session creation logs one line (a warning here: the CPU build of ONNX
Runtime cannot honour a GPU request, so each session says it fell back).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import client, read_all, send
from streamhydro.kafka.admin import ensure_topics
from streamhydro.producer import make_values
from streamhydro.registry import Registry

pytestmark = [pytest.mark.spark, pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).parent.parent
EVENTS = 2000
PARTITIONS = 4
WAIT_S = 240
SESSION_LINE = re.compile(
    r"ONNX session for (?P<model>\S+): requested (?P<requested>\S+) \(GPU address\(es\) \['(?P<address>[^']+)'\] "
    r"assigned to the task\), asked ORT for .* with device_id (?P<device_id>\d+), using (?P<device>\S+)"
)


def _load_cluster_module():
    spec = importlib.util.spec_from_file_location("standalone_cluster", ROOT / "deploy" / "standalone" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    module = _load_cluster_module()
    standalone = module.StandaloneCluster(tmp_path_factory.mktemp("standalone"), workers=2, cores=2, memory="2g", gpus=("0", "1"))
    with standalone:
        yield standalone


@pytest.fixture
def topics(kafka_bootstrap, topic_name):
    names = {"input": f"{topic_name}-in", "output": f"{topic_name}-out", "dlq": f"{topic_name}-dlq"}
    ensure_topics(client(kafka_bootstrap), {names["input"]: PARTITIONS, names["output"]: 2, names["dlq"]: 1})
    return names


def serve_config(path: Path, cluster, kafka_bootstrap: str, topics: dict, registry: Registry, app: str, gpus: bool) -> Path:
    """A serve TOML file as a user writes it for the cluster."""
    spark = {
        "master": cluster.url,
        "app_name": app,
        "checkpoint_location": str(path.parent / f"{app}-checkpoint"),
    }
    if gpus:
        spark.update(executor_gpus=2, task_gpus=0.5, gpu_discovery_script=str(cluster.workdir / "gpus.sh"))
    conf = {"spark.executor.memory": "512m", "spark.ui.enabled": "false"}
    sections = {
        "spark": spark,
        "kafka": {"bootstrap_servers": kafka_bootstrap, "subscribe": topics["input"], "output_topic": topics["output"],
                  "dead_letter_topic": topics["dlq"], "source": "python"},
        "model": {"registry": str(registry.root), "name": "iris_like", "version": "latest"},
        # The CPU build of ONNX Runtime here: the tasks' GPUs are fake, so scoring may fall back to the CPU.
        "inference": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"], "pipeline_depth": 0,
                      "allow_cpu_fallback": True},
        "metrics": {"port": 0, "multiprocess_dir": str(path.parent / f"{app}-metrics")},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    lines.append("[spark.conf]")
    lines += [f"{json.dumps(key)} = {json.dumps(value)}" for key, value in conf.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def running(command: list[str], log: Path, env: dict[str, str]):
    """A driver process for the length of the block, then SIGTERM to it alone (as Kubernetes or a shell sends it:
    the driver stops the query while its JVM still runs) and a bounded wait; leftovers of its group are killed."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def produce(kafka_bootstrap: str, topic: str, registry: Registry) -> None:
    manifest = registry.get("iris_like").manifest
    send(kafka_bootstrap, topic, make_values(manifest, "json", EVENTS))


def assert_scored_once(records: list, context: str) -> None:
    keys = [json.loads(r.value)["idempotency_key"] for r in records]
    assert len(keys) == EVENTS and len(set(keys)) == EVENTS, f"{len(keys)} predictions, {len(set(keys))} distinct\n{context}"


def wait_until_idle(cluster, seconds: float = 120) -> None:
    """Until the master runs no application or driver: a killed driver's executors are freed only when it notices."""
    deadline = time.monotonic() + seconds
    while True:
        state = cluster.state()
        if not state.get("activeapps") and not state.get("activedrivers"):
            return
        assert time.monotonic() < deadline, f"the cluster is still busy after {seconds} s: {state}"
        time.sleep(1)


def app_id(cluster, name: str) -> str:
    state = cluster.state()
    apps = [a for a in state.get("activeapps", []) + state.get("completedapps", []) if a["name"] == name]
    assert apps, f"no application {name} on the master: {state}"
    return apps[0]["id"]


def test_serve_pins_each_scoring_task_to_the_gpu_spark_assigned(cluster, kafka_bootstrap, topics, model_registry, tmp_path):
    app = "serve-gpus"
    config = serve_config(tmp_path / "serve.toml", cluster, kafka_bootstrap, topics, model_registry, app, gpus=True)
    produce(kafka_bootstrap, topics["input"], model_registry)
    log = tmp_path / "serve.log"
    # A driver started without spark-submit names the executors' Python through PYSPARK_PYTHON.
    env = {**cluster.env, "PYSPARK_PYTHON": sys.executable}
    with running([sys.executable, "-m", "streamhydro", "serve", "--config", str(config)], log, env) as process:
        records = read_all(kafka_bootstrap, topics["output"], EVENTS, seconds=WAIT_S)
        alive = process.poll() is None
    context = f"{log.read_text()[-6000:]}\n{cluster.logs()}"
    assert alive, context
    assert process.returncode == 0, context
    assert_scored_once(records, context)

    ours = app_id(cluster, app)
    sessions = [(name.split("/")[1], match) for name, text in cluster.executor_logs().items() if name.startswith(ours)
                for match in SESSION_LINE.finditer(text)]
    assert sessions, context
    for executor, line in sessions:
        assert line["requested"] == f"cuda:{line['address']}" and line["device_id"] == line["address"], line.group(0)
    pairs = {(executor, line["address"]) for executor, line in sessions}
    assert len({executor for executor, _ in pairs}) == 2, pairs
    assert {address for _, address in pairs} <= {"0", "1"}


def test_serve_through_spark_submit_in_client_and_cluster_deploy_mode(cluster, kafka_bootstrap, topics, model_registry, tmp_path):
    produce(kafka_bootstrap, topics["input"], model_registry)
    submit = [str(ROOT / "deploy" / "serve" / "submit.sh")]
    options = ["--master", cluster.url, "--conf", f"spark.pyspark.python={sys.executable}", "--driver-memory", "512m"]

    client_config = serve_config(tmp_path / "client.toml", cluster, kafka_bootstrap, topics, model_registry, "submit-client", gpus=False)
    log = tmp_path / "client.log"
    with running([*submit, str(client_config), *options], log, cluster.env):
        records = read_all(kafka_bootstrap, topics["output"], EVENTS, seconds=WAIT_S)
    assert_scored_once(records, f"{log.read_text()[-6000:]}\n{cluster.logs()}")
    assert "local[2]" not in log.read_text()

    second = {**topics, "output": f"{topics['output']}-2", "dlq": f"{topics['dlq']}-2"}
    ensure_topics(client(kafka_bootstrap), {second["output"]: 2, second["dlq"]: 1})
    cluster_config = serve_config(tmp_path / "cluster.toml", cluster, kafka_bootstrap, second, model_registry, "submit-cluster", gpus=False)
    done = subprocess.run([*submit, str(cluster_config), *options, "--deploy-mode", "cluster"], capture_output=True, text=True,
                          env=cluster.env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    driver = re.search(r"Driver successfully submitted as (driver-\S+)", done.stderr)
    assert driver, done.stderr[-4000:]
    try:
        records = read_all(kafka_bootstrap, second["output"], EVENTS, seconds=WAIT_S)
        running_on_a_worker = [d for d in cluster.state().get("activedrivers", []) if d["id"] == driver.group(1)]
    finally:
        cluster.kill_driver(driver.group(1))
        wait_until_idle(cluster)
    context = f"{cluster.logs()}"
    assert running_on_a_worker and running_on_a_worker[0]["state"] == "RUNNING", context
    assert_scored_once(records, context)
    assert "query started" in cluster.driver_logs()[driver.group(1)], context


def test_trainer_runs_two_ranks_on_the_cluster(cluster, tmp_path):
    wait_until_idle(cluster)
    env = {
        **cluster.env,
        "STREAMHYDRO_SPARK_MASTER": cluster.url,
        "PYSPARK_PYTHON": sys.executable,
        "STREAMHYDRO_SPARK_CONF": json.dumps({"spark.executor.memory": "512m"}),
        "STREAMHYDRO_MODEL_REGISTRY": str(tmp_path / "models"),
        "STREAMHYDRO_TRAINING_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "STREAMHYDRO_TRAINING_EPOCHS": "5",
    }
    done = subprocess.run([sys.executable, "-m", "streamhydro", "train", "--config", "models/training/breast_cancer.toml"],
                          capture_output=True, text=True, env=env, timeout=WAIT_S, cwd=ROOT)
    assert done.returncode == 0, f"{done.stderr[-6000:]}\n{cluster.logs()}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["model"] == "breast_cancer:1"
    assert [a for a in cluster.state()["completedapps"] if a["name"] == "streamhydro-train-breast-cancer"], cluster.state()
    assert Registry(tmp_path / "models").versions("breast_cancer") == [1]
