"""The function Spark runs in each barrier task. Runs in a trainer rank's Python worker, once per
stage attempt; :class:`RankTask` is made on the driver and pickled into the tasks (it holds only
the :class:`~streamhydro.trainer.plan.RankPlan`).

The partition's Arrow batches are the rank's data; nothing goes back to the driver but one small
row from rank 0: the checked ONNX model and the training report, or, when the data cannot be
trained on (:func:`~streamhydro.trainer.rank.statistics.problem`), no model and the report
``{"data_error": message}``. Publishing happens on the driver after the whole stage succeeded, so a
stage that fails after rank 0 finished and is then retried still publishes exactly one model.

The rendezvous starts before torch is imported (see :mod:`.rendezvous`). The report says where
rank 0's time went: ``imports_seconds`` (from the task's start, torch and the rank's modules),
``load_seconds`` (the partition into arrays), ``rendezvous_seconds`` (what was left to wait for
the group after that), ``statistics_seconds``, ``rank_seconds`` (the training function, of which
``train_seconds`` is the epochs) and ``export_seconds`` (ONNX export and its checks).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from streamhydro.trainer.plan import RankPlan

RESULT_SCHEMA = pa.schema([("rank", pa.int32()), ("model", pa.binary()), ("report", pa.string())])
RESULT_DDL = "rank int, model binary, report string"
# Key of rank 0's report when the data cannot be trained on; its value is the message.
DATA_ERROR = "data_error"

log = logging.getLogger(__name__)


class RankTask:
    def __init__(self, plan: RankPlan) -> None:
        self.plan = plan

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        started = time.perf_counter()
        from pyspark import BarrierTaskContext

        from streamhydro.trainer.rank import rendezvous
        from streamhydro.trainer.rank.checkpoint import RunDirectory

        context = BarrierTaskContext.get()
        run_dir = RunDirectory(Path(self.plan.checkpoint_dir) / self.plan.run_id)
        meeting = rendezvous.start(context, run_dir, self.plan.timeout_seconds)

        import torch

        from streamhydro.trainer.rank import statistics
        from streamhydro.trainer.rank.arrays import partition_arrays
        from streamhydro.trainer.rank.export import export_checked
        from streamhydro.trainer.rank.loop import train

        imported = time.perf_counter()
        torch.set_num_threads(max(1, context.cpus()))
        data = partition_arrays(batches, self.plan.n_features)
        loaded = time.perf_counter()
        with meeting.process_group() as group:
            joined = time.perf_counter()
            stats = statistics.gather(data, group)
            problem = statistics.problem(stats, self.plan.labels, self.plan.label)
            gathered = time.perf_counter()
            if problem is None:
                net, report = train(self.plan, data, stats, group, run_dir)
        if group.rank != 0:
            return
        if problem is not None:
            log.error("rank 0: the data cannot be trained on: %s", problem)
            yield result_row(b"", {DATA_ERROR: problem})
            return
        exporting = time.perf_counter()
        rows = data.x_holdout if len(data.x_holdout) else data.x_train
        model, difference = export_checked(net, rows, self.plan.tolerance)
        report.update(
            onnx_max_abs_diff=difference, onnx_check_rows=len(rows),
            imports_seconds=round(imported - started, 4), load_seconds=round(loaded - imported, 4),
            rendezvous_seconds=round(joined - loaded, 4), statistics_seconds=round(gathered - joined, 4),
            export_seconds=round(time.perf_counter() - exporting, 4),
        )
        log.info("rank 0 exported the model: %s", report)
        yield result_row(model, report)


def result_row(model: bytes, report: dict[str, Any]) -> pa.RecordBatch:
    """Rank 0's one row, built from buffers: pyarrow imports pandas (about 0.3 s) to convert Python values."""
    rank = pa.Array.from_buffers(pa.int32(), 1, [None, pa.py_buffer(np.zeros(1, np.int32))])
    return pa.RecordBatch.from_arrays(
        [rank, _one(pa.binary(), model), _one(pa.string(), json.dumps(report).encode())], schema=RESULT_SCHEMA
    )


def _one(kind: pa.DataType, value: bytes) -> pa.Array:
    """A one-element binary or string array holding ``value``."""
    offsets = np.array([0, len(value)], np.int32)
    return pa.Array.from_buffers(kind, 1, [None, pa.py_buffer(offsets), pa.py_buffer(value)])
