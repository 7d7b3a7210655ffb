"""Trainer parts that need neither Spark nor a process group: config, Arrow conversion, batching
order, the master rewrite, checkpoints, ONNX export and its checks, the ranks' statistics and data
checks (over threads standing in for ranks), the rendezvous's waiting, and which processes import torch."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
import torch

from streamhydro.errors import ConfigError
from streamhydro.trainer.config import from_mapping, load
from streamhydro.trainer.errors import ClusterError, ExportError
from streamhydro.trainer.launch import session_settings
from streamhydro.trainer.model import mlp
from streamhydro.trainer.publish import metrics, provenance, publish
from streamhydro.trainer.rank import statistics
from streamhydro.trainer.rank.arrays import PartitionArrays, partition_arrays
from streamhydro.trainer.rank.checkpoint import RunDirectory
from streamhydro.trainer.rank.export import export_checked, export_onnx
from streamhydro.trainer.rank.loop import _epoch_order
from streamhydro.trainer.rank.rendezvous import _Gather
from streamhydro.trainer.rank.task import RESULT_SCHEMA, result_row

BASE = {"data": {"path": "x.csv", "features": ["a", "b"], "labels": ["no", "yes"]}}


def config(**sections):
    raw = {name: dict(BASE.get(name, {})) for name in ("data", "model", "training", "spark")}
    for name, values in sections.items():
        raw[name].update(values)
    return from_mapping(raw, {})


def test_demo_config_loads():
    demo = load("models/training/breast_cancer.toml", environ={})
    assert (demo.model.name, len(demo.data.features), demo.data.labels) == ("breast_cancer", 30, ("malignant", "benign"))


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"data": {"format": "orc"}}, "data.format"),
        ({"data": {"format": "jdbc", "table": "t", "url": "postgres://x"}}, "data.url"),
        ({"data": {"labels": ["only"]}}, "data.labels"),
        ({"data": {"features": ["a", "label"]}}, "data.features"),
        ({"model": {"hidden": [32, 0]}}, "model.hidden"),
        ({"training": {"ranks": 0}}, "training.ranks"),
        ({"training": {"inject_failure": "1-2"}}, "training.inject_failure"),
        ({"training": {"inject_failure": "4:2"}}, "training.inject_failure"),
        ({"training": {"epoch": 3}}, "training.epoch"),
    ],
)
def test_bad_config_names_the_key(sections, key):
    with pytest.raises(ConfigError) as err:
        config(**sections)
    assert err.value.key == key


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean 'training.epochs'"):
        config(training={"epoch": 3})


def test_password_comes_from_the_environment_and_is_not_in_repr():
    raw = {"data": {**BASE["data"], "format": "jdbc", "url": "jdbc:postgresql://h/db", "table": "t", "password": "${PW}"}}
    loaded = from_mapping(raw, {"PW": "hunter2", "STREAMHYDRO_TRAINING_EPOCHS": "4", "STREAMHYDRO_MODEL_HIDDEN": "8,4"})
    assert loaded.data.password == "hunter2"
    assert "hunter2" not in repr(loaded)
    assert "hunter2" not in str(loaded.source_description())
    assert (loaded.training.epochs, loaded.model.hidden) == (4, (8, 4))


def test_unset_environment_variable_is_named():
    raw = {"data": {**BASE["data"], "password": "${NOT_SET_ANYWHERE}"}}
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        from_mapping(raw, {})


def test_jdbc_session_gets_debians_driver_jar():
    pg = config(data={"format": "jdbc", "url": "jdbc:postgresql://h/db", "table": "t"})
    master, conf = session_settings(pg)
    assert conf["spark.jars"] == "/usr/share/java/postgresql.jar"
    assert conf["spark.barrier.sync.timeout"] == "300"
    assert master.url == "local[2,3]"


def test_partition_arrays_splits_holdout_rows():
    batch = pa.RecordBatch.from_pydict(
        {"a": pa.array([1, 2, 3], pa.float32()), "b": pa.array([4, 5, 6], pa.float32()),
         "_label": pa.array([0, 1, 1], pa.int32()), "_holdout": [False, True, False]}
    )
    arrays = partition_arrays(iter([batch, batch.slice(0, 0)]), 2)
    assert arrays.x_train.tolist() == [[1, 4], [3, 6]] and arrays.y_train.tolist() == [0, 1]
    assert arrays.x_holdout.tolist() == [[2, 5]] and arrays.y_holdout.dtype == np.int64


def test_partition_arrays_of_an_empty_partition():
    arrays = partition_arrays(iter([]), 3)
    assert arrays.x_train.shape == (0, 3) and len(arrays.y_holdout) == 0


def test_epoch_order_cycles_a_small_partition_to_the_common_step_count():
    order = _epoch_order(rows=5, needed=12, seed=1, epoch=1, rank=0)
    assert len(order) == 12
    assert sorted(order[:5].tolist()) == list(range(5))
    assert not torch.equal(order, _epoch_order(rows=5, needed=12, seed=1, epoch=2, rank=0))


def test_checkpoints_keep_the_latest_and_attempts_count(tmp_path):
    run = RunDirectory(tmp_path / "run")
    assert run.latest() is None and run.record_attempt() == 0 and run.record_attempt() == 1
    run.save(1, {"model": {"w": torch.ones(2)}})
    run.save(2, {"model": {"w": torch.zeros(2)}})
    assert [p.name for p in (tmp_path / "run").glob("epoch-*")] == ["epoch-0002.pt"]
    assert run.latest()["epoch"] == 2
    run.append_history({"epoch": 1})
    assert run.history() == [{"epoch": 1}]


def test_export_has_a_dynamic_batch_and_softmax_scores():
    torch.manual_seed(0)
    net = mlp([1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [4], 3)
    rows = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    data, difference = export_checked(net, rows, 1e-5)
    assert difference < 1e-5
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "features" and session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7):
        (scores,) = session.run(None, {"features": rows[:n]})
        assert scores.shape == (n, 3)
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)


def test_standardization_is_part_of_the_graph():
    net = mlp([100.0], [10.0], [2], 2)
    session = ort.InferenceSession(export_onnx(net, 1), providers=["CPUExecutionProvider"])
    raw, standardized = np.array([[110.0]], np.float32), torch.tensor([[1.0]])
    with torch.no_grad():
        expected = torch.softmax(net[1:](standardized), dim=1).numpy()
    np.testing.assert_allclose(session.run(None, {"features": raw})[0], expected, rtol=1e-5)


def test_export_refuses_a_disagreement_beyond_tolerance():
    net = mlp([0.0], [1.0], [2], 2)
    with pytest.raises(ExportError, match="disagree"):
        export_checked(net, np.array([[1.0]], np.float32), tolerance=-1.0)


class ThreadGroup:
    """Stands in for a process group: one instance per thread ("rank"), reducing through a shared barrier."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, shared["world"], shared

    def all_reduce(self, values: list[float]) -> list[float]:
        return self._reduce(values, np.sum)

    def all_max(self, values: list[float]) -> list[float]:
        return self._reduce(values, np.max)

    def _reduce(self, values: list[float], combine) -> list[float]:
        self.shared["values"][self.rank] = values
        self.shared["barrier"].wait(timeout=10)
        result = combine(np.array(self.shared["values"]), axis=0).tolist()
        self.shared["barrier"].wait(timeout=10)
        return result


def gather_over_threads(parts: list[PartitionArrays]) -> list[statistics.Statistics]:
    shared = {"world": len(parts), "values": [None] * len(parts), "barrier": threading.Barrier(len(parts))}
    results: list = [None] * len(parts)

    def rank(r: int) -> None:
        results[r] = statistics.gather(parts[r], ThreadGroup(r, shared))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(parts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    return results


def part(x: list[list[float]], y: list[int], x_holdout=(), y_holdout=()) -> PartitionArrays:
    n = len(x[0]) if x else 2
    return PartitionArrays(
        np.array(x, np.float32).reshape(-1, n), np.array(y, np.int64),
        np.array(x_holdout, np.float32).reshape(-1, n), np.array(y_holdout, np.int64),
    )


def test_every_rank_gets_the_statistics_of_all_training_rows():
    rng = np.random.default_rng(3)
    a, b = rng.normal(5, 2, size=(7, 2)), rng.normal(-1, 3, size=(4, 2))
    parts = [part(a.tolist(), [0] * 7, [[100.0, 100.0]], [1]), part(b.tolist(), [1] * 4)]
    first, second = gather_over_threads(parts)
    assert first == second
    rows = np.vstack([a, b]).astype(np.float32).astype(np.float64)  # the held-out row is not counted
    np.testing.assert_allclose(first.mean, rows.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(first.std, rows.std(axis=0), rtol=1e-12)
    assert (first.rows_per_rank, first.holdout_rows, first.label_range) == ((7, 4), 1, (0, 1))
    assert statistics.problem(first, ["no", "yes"], "y") is None


def test_a_feature_without_spread_is_not_scaled():
    assert statistics.standard_deviations([0.0, 8.0], rows=2) == (1.0, 2.0)
    assert statistics.standard_deviations([0.0], rows=0) == (1.0,)


def test_every_rank_reaches_the_same_verdict_on_data_that_cannot_be_trained_on():
    labels = ["no", "yes"]
    outside = gather_over_threads([part([[1.0, 2.0]], [0]), part([[1.0, 2.0]], [2], [[0.0, 0.0]], [-1])])
    expected = (
        "label column 'diagnosis' has values outside data.labels ['no', 'yes'] (class indexes -1..2); "
        "list every class in data.labels, in index order"
    )
    assert {statistics.problem(s, labels, "diagnosis") for s in outside} == {expected}
    empty_rank = gather_over_threads([part([[1.0, 2.0]], [0]), part([], [])])
    assert statistics.problem(empty_rank[1], labels, "y") == (
        "rank 1 has no training rows (rows per rank [1, 0]); lower training.ranks or use more data"
    )
    nothing = gather_over_threads([part([], []), part([], [], [[1.0, 1.0]], [0])])
    assert nothing[0].label_range == (0, 0) and "no training rows in the data" in statistics.problem(nothing[0], labels, "y")
    none_at_all = gather_over_threads([part([], []), part([], [])])
    assert none_at_all[0].label_range is None and "no training rows" in statistics.problem(none_at_all[0], labels, "y")


class FakeBarrierContext:
    def __init__(self, answer=None, error=None, delay=0.0) -> None:
        self.answer, self.error, self.delay = answer, error, delay

    def allGather(self, message: str) -> list[str]:
        threading.Event().wait(self.delay)
        if self.error:
            raise self.error
        return self.answer


def test_the_rendezvous_wait_is_bounded_and_its_errors_reach_the_rank():
    assert _Gather(FakeBarrierContext(answer=["a", "b"]), "a").result(5) == ["a", "b"]
    with pytest.raises(ClusterError, match="did not all reach the rendezvous within 1 s") as err:
        _Gather(FakeBarrierContext(answer=[], delay=30), "").result(1)
    assert err.value.setting == "training.timeout_seconds"
    with pytest.raises(RuntimeError, match="barrier sync timed out"):
        _Gather(FakeBarrierContext(error=RuntimeError("barrier sync timed out")), "").result(5)


def test_result_row_holds_the_model_and_the_report():
    row = result_row(b"\x00onnx", {"validation_accuracy": 0.5, "name": "é"})
    assert row.schema == RESULT_SCHEMA
    assert row.to_pylist() == [{"rank": 0, "model": b"\x00onnx", "report": '{"validation_accuracy": 0.5, "name": "\\u00e9"}'}]


def test_a_rank_converts_arrow_without_importing_pandas(tmp_path):
    batch = pa.RecordBatch.from_pydict({"a": pa.array([1, 2, 3, 4], pa.float32()), "_label": pa.array([0, 1, 1, 0], pa.int32()),
                                        "_holdout": [True, False, False, True]})
    with pa.OSFile(str(tmp_path / "batch.arrow"), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    code = (
        "import sys, json\n"
        "import pyarrow as pa\n"
        "from streamhydro.trainer.rank.arrays import partition_arrays\n"
        "from streamhydro.trainer.rank.task import result_row\n"
        f"arrays = partition_arrays(pa.ipc.open_stream(pa.OSFile({str(tmp_path / 'batch.arrow')!r})), 1)\n"
        "result_row(b'model', {'rows': len(arrays.y_train)})\n"
        "print(json.dumps(['pandas' in sys.modules, arrays.x_train.ravel().tolist()]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == [False, [2.0, 3.0]]


def test_the_driver_and_the_start_of_a_rank_do_not_import_torch():
    code = (
        "import sys, json\n"
        "import streamhydro.trainer.command, streamhydro.trainer.launch\n"
        "import streamhydro.trainer.rank.rendezvous, streamhydro.trainer.rank.checkpoint, streamhydro.trainer.rank.task\n"
        "print(json.dumps('torch' in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) is False


def test_manifest_takes_the_statistics_and_torch_version_from_the_ranks_report():
    report = {"attempt": 0, "torch": "2.13.0", "feature_mean": [1.0, 2.0], "feature_std": [0.5, 1.0],
              "validation_accuracy": 0.9, "train_rows": 10, "rank_seconds": 1.0}
    made = provenance(config(), report, "test", "run-1")
    assert made["torch"] == "2.13.0"
    assert made["feature_stats"] == {"mean": [1.0, 2.0], "std": [0.5, 1.0]}
    assert metrics(report) == {"validation_accuracy": 0.9, "train_rows": 10}


def test_publish_adds_the_exported_model_as_a_classifier_over_the_configured_features(tmp_path):
    net = mlp([0.0, 0.0], [1.0, 1.0], [4], 2)
    report = {"attempt": 1, "torch": torch.__version__, "feature_mean": [0.0, 0.0], "feature_std": [1.0, 1.0],
              "validation_accuracy": 0.5}
    version = publish(config(model={"registry": str(tmp_path)}), export_onnx(net, 2), report, "test", "run-1")
    m = version.manifest
    assert (m.kind, m.labels, m.version) == ("classifier", ("no", "yes"), 1)
    assert [(s.name, s.shape, s.features) for s in m.inputs] == [("features", (-1, 2), ("a", "b"))]
    assert [(s.name, s.shape) for s in m.outputs] == [("scores", (-1, 2))]
    assert m.provenance["attempts"] == 2 and m.provenance["converter"]["name"] == "pytorch"
    assert m.provenance["rewrites"] == [] and m.metrics == {"validation_accuracy": 0.5}
