"""GPU scheduling: application conf, the stage-level profile, and a local-cluster with fake GPUs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from streamhydro.driver import resources
from streamhydro.errors import ConfigError

CLUSTER_CHECK = Path(__file__).parent / "_gpu_cluster_check.py"


def test_gpu_conf_leaves_task_amount_to_the_profile_on_clusters():
    conf = resources.gpu_conf(2, 0.25, "/opt/gpus.sh", "spark://host:7077")
    assert conf[resources.EXECUTOR_GPU_AMOUNT] == "2"
    assert conf[resources.EXECUTOR_GPU_DISCOVERY] == "/opt/gpus.sh"
    assert resources.TASK_GPU_AMOUNT not in conf
    local = resources.gpu_conf(1, 0.5, "/opt/gpus.sh", "local[2]")
    assert local[resources.TASK_GPU_AMOUNT] == "0.5"
    assert resources.gpu_conf(0, 0, "", "local[2]") == {}


@pytest.mark.parametrize("task_gpus", [-1, 0.3, 1.5])
def test_bad_gpu_amounts_name_the_key_and_fix(task_gpus):
    with pytest.raises(ConfigError) as caught:
        resources.gpu_conf(1, task_gpus, "/opt/gpus.sh")
    assert caught.value.key == "spark.task_gpus" and caught.value.fix


@pytest.mark.spark
def test_local_master_falls_back_with_a_log_line(spark, caplog):
    with caplog.at_level(logging.INFO, logger="streamhydro.driver.resources"):
        assert resources.inference_profile(spark, 0.5, 1) is None
        assert resources.inference_profile(spark, 0, 1) is None
    assert "cannot schedule stage-level task resource profiles" in caplog.text
    assert "no GPU requested" in caplog.text


def _max_concurrent(tasks: list[dict], address: str) -> int:
    on = [t for t in tasks if t["addresses"] == address]
    return max(sum(1 for o in on if o["start"] < t["stop"] and t["start"] < o["stop"]) for t in on)


@pytest.mark.spark
def test_local_cluster_with_fake_gpus_pins_and_shares():
    """Runs tests/_gpu_cluster_check.py in its own process: one SparkContext per process, and ours is local[2]."""
    done = subprocess.run([sys.executable, str(CLUSTER_CHECK)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    cuda_here = "CUDAExecutionProvider" in ort.get_available_providers()
    for amount, per_gpu in (("1.0", 1), ("0.5", 2)):
        tasks = results[amount]
        assert sum(t["rows"] for t in tasks) == 40
        assert {t["addresses"] for t in tasks} == {"0", "1"}
        for task in tasks:
            assert task["requested"] == f"cuda:{task['addresses']}"
            assert task["device"] == (task["requested"] if cuda_here else "cpu")
        assert [_max_concurrent(tasks, a) for a in ("0", "1")] == [per_gpu, per_gpu]
    for task in results["no_profile"]:
        assert task["addresses"] == "" and task["requested"] == "cpu"
