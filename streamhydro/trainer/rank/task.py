"""The function Spark runs in each barrier task. Runs in a trainer rank's Python worker, once per
stage attempt; :class:`RankTask` is made on the driver and pickled into the tasks (it holds only
the :class:`~streamhydro.trainer.plan.RankPlan`).

The partition's Arrow batches are the rank's data; nothing goes back to the driver but one small
row from rank 0 (the checked ONNX model and the training report). Publishing happens on the
driver after the whole stage succeeded, so a stage that fails after rank 0 finished and is then
retried still publishes exactly one model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from streamhydro.trainer.plan import RankPlan

RESULT_SCHEMA = pa.schema([("rank", pa.int32()), ("model", pa.binary()), ("report", pa.string())])
RESULT_DDL = "rank int, model binary, report string"

log = logging.getLogger(__name__)


class RankTask:
    def __init__(self, plan: RankPlan) -> None:
        self.plan = plan

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import sys as _s; _e = time.time(); _p = time.perf_counter()
        import torch
        from pyspark import BarrierTaskContext

        from streamhydro.trainer.rank.arrays import partition_arrays
        from streamhydro.trainer.rank.checkpoint import RunDirectory
        from streamhydro.trainer.rank.export import export_checked
        from streamhydro.trainer.rank.loop import train
        from streamhydro.trainer.rank.rendezvous import process_group

        context = BarrierTaskContext.get()
        torch.set_num_threads(max(1, context.cpus()))
        _i = time.perf_counter()
        data = partition_arrays(batches, self.plan.n_features)
        _l = time.perf_counter()
        run_dir = RunDirectory(Path(self.plan.checkpoint_dir) / self.plan.run_id)
        rendezvous_started = time.perf_counter()
        with process_group(context, run_dir, self.plan.timeout_seconds) as group:
            rendezvous_seconds = time.perf_counter() - rendezvous_started
            print(f"XX rank {context.partitionId()} entered {_e:.3f} imports {_i-_p:.2f} load {_l-_i:.2f} rdv {rendezvous_seconds:.2f}", file=_s.stderr, flush=True)
            net, report = train(self.plan, data, group, run_dir)
            if group.rank != 0:
                return
            rows = data.x_holdout if len(data.x_holdout) else data.x_train
            _x = time.perf_counter()
            model, difference = export_checked(net, rows, self.plan.tolerance)
            print(f"XX export {time.perf_counter()-_x:.2f} end {time.time():.3f}", file=_s.stderr, flush=True)
        report.update(onnx_max_abs_diff=difference, onnx_check_rows=len(rows), rendezvous_seconds=round(rendezvous_seconds, 4))
        log.info("rank 0 exported the model: %s", report)
        yield pa.RecordBatch.from_pydict({"rank": [0], "model": [model], "report": [json.dumps(report)]}, schema=RESULT_SCHEMA)
