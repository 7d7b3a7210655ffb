"""The pipelined engine and ORT sessions without Spark: order, overlap, errors, cancellation, placement."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import traceback

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _inference_models import Holder, feature_spec, json_values, kafka_batch, softmax_model
from streamhydro.config import PayloadSettings
from streamhydro.errors import ModelError
from streamhydro.executor import sessions
from streamhydro.executor.engine import Rebatcher, run_pipeline
from streamhydro.executor.scoring import EngineSettings, ScoringPlan, score_partition
from streamhydro.registry import TensorSpec

WAIT_S = 20


@pytest.fixture(scope="module")
def model():
    return softmax_model([feature_spec("x", 4)])


def _pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("streamhydro-")]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=12), st.integers(1, 40))
def test_rebatcher_keeps_order_and_count(piece_sizes, size):
    rebatcher = Rebatcher(size)
    chunks = []
    start = 0
    for n in piece_sizes:
        rows = np.arange(start, start + n)
        meta = pa.table({"row": rows})
        chunks += list(rebatcher.add(meta, {"x": rows.reshape(-1, 1).astype(np.float32)}))
        start += n
    chunks += list(rebatcher.flush())
    meta_rows = [r for meta, _ in chunks for r in meta.column("row").to_pylist()]
    array_rows = [int(v) for _, arrays in chunks for v in arrays["x"][:, 0]]
    assert meta_rows == array_rows == list(range(start))
    assert all(meta.num_rows == size for meta, _ in chunks[:-1])
    assert all(0 < meta.num_rows <= size for meta, _ in chunks)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.integers(1, 500), st.integers(0, 3))
def test_engine_scores_every_row_once_in_order(model, batch_rows, batch_size, depth):
    data, manifest = model
    rng = np.random.default_rng(len(batch_rows))
    rows = rng.normal(size=(sum(batch_rows), 4)).astype(np.float32)
    batches, start = [], 0
    for n in batch_rows:
        batches.append(kafka_batch(json_values(manifest, rows[start : start + n]), first_offset=start))
        start += n
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", EngineSettings(batch_size=batch_size, pipeline_depth=depth))
    stats = []
    out = list(score_partition(plan, iter(batches), stats.append))
    docs = [json.loads(v) for b in out for v in b.column("value").to_pylist()]
    assert [d["source"]["offset"] for d in docs] == list(range(len(rows)))
    expected = ort.InferenceSession(data).run(None, {"x": rows})[0]
    got = np.array([list(d["prediction"]["scores"].values()) for d in docs])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert stats[0].rows_in == stats[0].rows_scored == len(rows)
    assert sum(stats[0].batch_sizes) == len(rows) and max(stats[0].batch_sizes) <= batch_size


def test_stage_events_show_overlap(model):
    """compute(0) waits until decode(1) began, and compute(1) until encode(0) began: only a pipeline can get past."""
    data, manifest = model
    batches = [kafka_batch(json_values(manifest, np.ones((100, 4))), first_offset=i * 100) for i in range(4)]
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", EngineSettings(batch_size=100, pipeline_depth=2))
    events: list[tuple[str, int, str]] = []
    started = {key: threading.Event() for key in [("decode", 1), ("encode", 0)]}
    waited = {("compute", 0): ("decode", 1), ("compute", 1): ("encode", 0)}
    missed = []

    def trace(stage: str, seq: int, what: str) -> None:
        events.append((stage, seq, what))
        if what == "start" and (stage, seq) in started:
            started[(stage, seq)].set()
        if what == "start" and (stage, seq) in waited and not started[waited[(stage, seq)]].wait(WAIT_S):
            missed.append((stage, seq))

    out = list(score_partition(plan, iter(batches), trace=trace))
    assert sum(b.num_rows for b in out) == 400
    assert missed == []
    assert events.index(("decode", 1, "start")) < events.index(("compute", 0, "end"))
    assert events.index(("encode", 0, "start")) < events.index(("compute", 1, "end"))


def test_a_large_arrow_batch_reaches_compute_one_model_batch_at_a_time(model):
    """An Arrow batch of ten model batches is decoded a model batch at a time: compute starts on the first
    while the rest are still to be decoded, instead of waiting for the whole Arrow batch."""
    data, manifest = model
    batch = kafka_batch(json_values(manifest, np.ones((1000, 4))), first_offset=0)
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", EngineSettings(batch_size=100, pipeline_depth=2))
    events: list[tuple[str, int, str]] = []
    out = list(score_partition(plan, iter([batch]), trace=lambda *event: events.append(event)))
    assert sum(b.num_rows for b in out) == 1000
    assert [seq for stage, seq, what in events if stage == "decode" and what == "start"] == list(range(10))
    assert events.index(("compute", 0, "start")) < events.index(("decode", 9, "start"))


def test_pipelining_off_runs_stages_in_sequence(model):
    data, manifest = model
    batches = [kafka_batch(json_values(manifest, np.ones((10, 4))), first_offset=i * 10) for i in range(3)]
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", EngineSettings(batch_size=10, pipeline_depth=0))
    events = []
    list(score_partition(plan, iter(batches), trace=lambda *e: events.append(e)))
    order = [(stage, seq) for stage, seq, what in events if what == "start"]
    assert order == [(s, i) for i in range(3) for s in ("read", "decode", "h2d", "compute", "d2h", "encode", "write")] + [("read", 3)]
    assert not _pipeline_threads()


class Boom(RuntimeError):
    pass


def _explode(item):
    raise Boom(f"stage failed on {item}")


@pytest.mark.parametrize("where", ["source", "front", "middle", "back"])
@pytest.mark.parametrize("depth", [0, 2])
def test_an_exception_in_any_stage_is_the_original_error(where, depth):
    def source():
        yield from range(3)
        if where == "source":
            _explode("source")
        yield 3

    def front(items):
        for item in items:
            if where == "front" and item == 2:
                _explode(item)
            yield item

    def middle(item):
        return _explode(item) if where == "middle" and item == 1 else item

    def back(item):
        if where == "back" and item == 2:
            _explode(item)
        yield item

    with pytest.raises(Boom) as caught:
        list(run_pipeline(source(), front, middle, back, depth))
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert "_explode" in frames
    assert not _pipeline_threads()


def test_closing_early_leaves_no_threads(model):
    data, manifest = model
    batches = (kafka_batch(json_values(manifest, np.ones((50, 4))), first_offset=i * 50) for i in range(1000))
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "d", EngineSettings(batch_size=10, pipeline_depth=3))
    scored = score_partition(plan, batches)
    first = next(scored)
    assert first.num_rows == 10 and _pipeline_threads()
    scored.close()
    assert not _pipeline_threads()


def test_bad_records_are_counted_by_class(model):
    data, manifest = model
    values = json_values(manifest, np.ones((5, 4))) + [b"", b"[1]", b'{"x_f0":1']
    plan = ScoringPlan(manifest, Holder(data), PayloadSettings(), "o", "dead", EngineSettings(pipeline_depth=2))
    stats = []
    out = pa.Table.from_batches(list(score_partition(plan, iter([kafka_batch(values)]), stats.append)))
    assert out.column("topic").to_pylist().count("dead") == 3
    assert stats[0].dead_letters == {"EmptyValue": 1, "NotAnObject": 1, "InvalidJson": 1}
    assert stats[0].rows_scored == 5 and stats[0].device == "cpu"


def test_validate_model_rejects_what_does_not_fit(model):
    data, manifest = model
    sessions.validate_model(manifest, data, PayloadSettings())
    with pytest.raises(ModelError, match="sha256"):
        sessions.validate_model(manifest, data + b"x", PayloadSettings())
    renamed = dataclasses.replace(manifest, inputs=(feature_spec("y", 4),))
    with pytest.raises(ModelError, match="inputs"):
        sessions.validate_model(renamed, data, PayloadSettings())
    fewer_labels = dataclasses.replace(manifest, labels=("a", "b"), outputs=(TensorSpec("scores", "float32", (-1, 2)),))
    with pytest.raises(ModelError, match="shape"):
        sessions.validate_model(fewer_labels, data, PayloadSettings())
    wide = dataclasses.replace(manifest, inputs=(feature_spec("x", 5),))
    with pytest.raises(ModelError, match="shape"):
        sessions.validate_model(wide, data, PayloadSettings())
    garbage = b"not an onnx model"
    with pytest.raises(ModelError, match="cannot load"):
        sessions.validate_model(dataclasses.replace(manifest, sha256=sessions.hashlib.sha256(garbage).hexdigest()), garbage, PayloadSettings())


def test_no_gpu_assignment_never_takes_device_zero(monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    settings_ = EngineSettings(providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    placement = sessions.place(settings_, sessions.TaskResources(gpu_addresses=(), cpus=2))
    assert placement.device == "cpu" and placement.providers == ("CPUExecutionProvider",)
    assert "not device 0" in placement.note
    pinned = sessions.place(settings_, sessions.TaskResources(gpu_addresses=("1",), cpus=2))
    assert pinned.device == "cuda:1" and pinned.device_id == 1


def test_threads_bounded_by_task_cpus():
    assert sessions.place(EngineSettings(intra_op_threads=8), sessions.TaskResources(cpus=2)).intra_op_threads == 2
    assert sessions.place(EngineSettings(), sessions.TaskResources(cpus=3)).intra_op_threads == 3


def test_cuda_request_on_a_cpu_build_falls_back_visibly(model, caplog, monkeypatch):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA: the fallback cannot be seen here (test_gpu covers the real path)")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    data, manifest = model
    settings_ = EngineSettings(providers=("CUDAExecutionProvider", "CPUExecutionProvider"), allow_cpu_fallback=True)
    placement = sessions.place(settings_, sessions.TaskResources(gpu_addresses=("1",), cpus=1))
    sessions.clear_sessions()
    with caplog.at_level(logging.WARNING, logger="streamhydro.executor.sessions"):
        session = sessions.get_session(manifest, Holder(data), PayloadSettings(), placement, settings_)
    assert session.requested_device == "cuda:1" and session.device == "cpu"
    assert "requested cuda:1" in caplog.text and "using cpu" in caplog.text


def test_session_cache_reuses_and_evicts_old_versions(model):
    data, manifest = model
    sessions.clear_sessions()
    placement = sessions.place(EngineSettings(), sessions.TaskResources(cpus=1))
    first = sessions.get_session(manifest, Holder(data), PayloadSettings(), placement, EngineSettings())
    assert sessions.get_session(manifest, Holder(b"unused"), PayloadSettings(), placement, EngineSettings()) is first
    data2, manifest2 = softmax_model([feature_spec("x", 4)], seed=1)
    manifest2 = dataclasses.replace(manifest2, version=2)
    second = sessions.get_session(manifest2, Holder(data2), PayloadSettings(), placement, EngineSettings())
    assert second is not first
    assert [s.manifest.version for s in sessions._sessions.values()] == [2]
