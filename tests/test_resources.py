"""Spark plumbing (streamhydro.spark): what each master can do, GPU conf, task profiles. Pure: no Spark started."""

from __future__ import annotations

import pytest

from streamhydro import spark as plumbing
from streamhydro.config import Config, check_gpu_amounts
from streamhydro.errors import ConfigError
from streamhydro.internals import CHECKPOINT_FILE_MANAGER, SPARK_SUBMIT_GATEWAY_PORT
from streamhydro.spark import CLUSTER, LOCAL, LOCAL_CLUSTER, Master, checkpoint_conf


@pytest.mark.parametrize(
    ("url", "kind", "here", "resources"),
    [
        ("local", LOCAL, True, False),
        ("local[2]", LOCAL, True, False),
        ("local[*,3]", LOCAL, True, False),
        ("local-cluster[2,1,1024]", LOCAL_CLUSTER, True, True),
        ("spark://head:7077", CLUSTER, False, True),
        ("yarn", CLUSTER, False, True),
        ("k8s://https://api:6443", CLUSTER, False, True),
    ],
)
def test_master_kinds(url, kind, here, resources):
    master = Master.parse(url)
    assert (master.kind, master.workers_here, master.schedules_resources) == (kind, here, resources)


@pytest.mark.parametrize("url", ["localhost:7077", "local-cluster[2,1]", ""])
def test_bad_masters_name_the_key(url):
    with pytest.raises(ConfigError) as caught:
        Master.parse(url)
    assert caught.value.key == "spark.master" and caught.value.fix


@pytest.mark.parametrize(
    ("url", "expected", "retried_before"),
    [("local[2]", "local[2,3]", False), ("local[*]", "local[*,3]", False), ("local", "local[1,3]", False),
     ("local[4,5]", "local[4,5]", True), ("spark://h:7077", "spark://h:7077", True),
     ("local-cluster[2,1,512]", "local-cluster[2,1,512]", True)],
)
def test_local_master_gets_task_retries(url, expected, retried_before):
    master = Master.parse(url)
    assert master.retries_tasks is retried_before
    assert master.with_task_retries(3).url == expected
    assert master.with_task_retries(3).retries_tasks


def test_gpu_conf_announces_gpus_and_pci_order_but_no_task_amount():
    conf = plumbing.gpu_conf(Master.parse("spark://host:7077"), 2, "/opt/gpus.sh")
    assert conf[plumbing.EXECUTOR_GPU_AMOUNT] == "2" and conf[plumbing.WORKER_GPU_AMOUNT] == "2"
    assert conf[plumbing.EXECUTOR_GPU_DISCOVERY] == "/opt/gpus.sh"
    assert conf["spark.executorEnv.CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert plumbing.TASK_GPU_AMOUNT not in conf
    assert plumbing.gpu_conf(Master.parse("local[2]"), 0, "") == {}


def test_local_mode_refuses_gpus_in_config_and_conf():
    """Under local[N] Spark never starts a task that asks for a GPU: the job hangs at 0 running tasks."""
    with pytest.raises(ConfigError) as caught:
        Config().replace(spark={"master": "local[2]", "executor_gpus": 1, "task_gpus": 0.5})
    assert caught.value.key == "spark.master" and "deploy/standalone" in caught.value.fix
    with pytest.raises(ConfigError):
        plumbing.gpu_conf(Master.parse("local[4]"), 1, "/opt/gpus.sh")
    cluster = Config().replace(spark={"master": "local-cluster[1,2,1024]", "executor_gpus": 1, "task_gpus": 0.5})
    assert cluster.spark.task_gpus == 0.5


def test_task_profiles_only_where_gpus_are_scheduled():
    pytest.importorskip("pyspark")
    assert plumbing.task_profile(Master.parse("local[2]"), 1, 0.5) is None
    assert plumbing.task_profile(Master.parse("spark://h:7077"), 1, 0) is None
    with pytest.raises(ConfigError):
        plumbing.task_profile(Master.parse("spark://h:7077"), 0, 1)


@pytest.mark.parametrize("task_gpus", [-1, 0.3, 1.5])
def test_bad_gpu_amounts_name_the_key_and_fix(task_gpus):
    with pytest.raises(ConfigError) as caught:
        check_gpu_amounts(1, task_gpus)
    assert caught.value.key == "spark.task_gpus" and caught.value.fix


def test_empty_master_outside_spark_submit_names_the_fix(monkeypatch):
    """An empty master is spark-submit's; in a plain process resolving it must say how to fix that."""
    monkeypatch.delenv(SPARK_SUBMIT_GATEWAY_PORT, raising=False)
    with pytest.raises(ConfigError) as caught:
        plumbing.resolve_master("")
    assert "spark-submit" in caught.value.problem and "submit.sh" in caught.value.fix


def test_local_checkpoints_get_the_file_system_manager_and_others_keep_sparks():
    for local in ("var/checkpoints/serve", "/tmp/cp", "file:///tmp/cp"):
        assert CHECKPOINT_FILE_MANAGER in checkpoint_conf(local), local
    for remote in ("hdfs://nn:8020/cp", "s3a://bucket/cp", "abfss://c@a.dfs.core.windows.net/cp"):
        assert checkpoint_conf(remote) == {}, remote


def test_train_refuses_gpus_when_spark_submit_gave_a_local_master():
    """The trainer's runtime check is serve's: a session on local[N] gets no GPU, so gpus_per_rank is refused."""
    from types import SimpleNamespace

    from streamhydro.trainer.config import from_mapping
    from streamhydro.trainer.launch import resource_profile

    data = {"format": "csv", "path": "x.csv", "features": ["a", "b"], "label": "y", "labels": ["n", "p"]}
    config = from_mapping({"data": data, "spark": {"master": "", "gpus_per_rank": 1}}, {})
    spark = SimpleNamespace(sparkContext=SimpleNamespace(master="local[4]"))
    with pytest.raises(ConfigError) as caught:
        resource_profile(spark, config)
    assert caught.value.key == "spark.master" and "spark.gpus_per_rank = 1" in caught.value.problem
