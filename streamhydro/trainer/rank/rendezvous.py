"""Forming the process group of a barrier stage. Runs in each trainer rank, once per stage attempt.

Rank 0 starts a ``TCPStore`` on a port the OS picks (no race for a "free" port), records the stage
attempt in the run directory, and ``allGather`` spreads both to every rank; then every rank joins
``torch.distributed`` over that store: nccl pinned to the one GPU Spark assigned the task (Spark does
not set CUDA_VISIBLE_DEVICES; :func:`streamhydro.devices.cuda_ordinal` maps its address), gloo on CPU
otherwise. ``timeout_seconds`` bounds the store, the
group's collectives, and so how long a rank waits for a lost peer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from streamhydro.devices import cuda_ordinal
from streamhydro.trainer.errors import ClusterError
from streamhydro.trainer.rank.checkpoint import RunDirectory

if TYPE_CHECKING:
    from pyspark import BarrierTaskContext

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Group:
    """This rank's place in the process group."""

    rank: int
    world_size: int
    device: torch.device
    attempt: int

    def all_reduce(self, values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def sync(self) -> None:
        """Every rank waits here for every other (a collective, so it honours the group timeout)."""
        self.all_reduce([0.0])


def task_device(context: BarrierTaskContext) -> tuple[torch.device, str]:
    """The GPU Spark assigned this task, with nccl; else the CPU, with gloo."""
    gpus = context.resources().get("gpu")
    addresses = list(gpus.addresses) if gpus is not None else []
    if not addresses:
        return torch.device("cpu"), "gloo"
    if len(addresses) > 1:
        raise ClusterError(
            "spark.gpus_per_rank", f"rank {context.partitionId()} was given GPUs {addresses}, but a rank trains on one",
            "ask for 1 GPU per rank (spark.gpus_per_rank = 1) and more ranks",
        )
    index = cuda_ordinal(addresses[0])
    torch.cuda.set_device(index)
    return torch.device("cuda", index), "nccl"


@contextlib.contextmanager
def process_group(context: BarrierTaskContext, run_dir: RunDirectory, timeout_seconds: int) -> Iterator[Group]:
    """Join the stage's process group; leave it on exit, whether training finished or failed."""
    rank = context.partitionId()
    world_size = len(context.getTaskInfos())
    host = context.getTaskInfos()[0].address.split(":")[0]
    timeout = datetime.timedelta(seconds=timeout_seconds)
    device, backend = task_device(context)
    store = None
    message = ""
    import time, sys
    _a = time.perf_counter()
    if rank == 0:
        store = dist.TCPStore(host, 0, world_size, True, timeout=timeout, wait_for_workers=False)
        message = json.dumps({"port": store.port, "attempt": run_dir.record_attempt()})
    _b = time.perf_counter()
    leader = json.loads(context.allGather(message)[0])
    _c = time.perf_counter()
    if store is None:
        store = dist.TCPStore(host, leader["port"], world_size, False, timeout=timeout)
    _d = time.perf_counter()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    print(f"XX rdv rank {rank} pre {_b-_a:.3f} allgather {_c-_b:.3f} store {_d-_c:.3f} initpg {time.perf_counter()-_d:.3f}", file=sys.stderr, flush=True)
    log.info("rank %d/%d joined %s group at %s:%d on %s (attempt %d)", rank, world_size, backend, host, leader["port"], device, leader["attempt"])
    try:
        yield Group(rank, world_size, device, leader["attempt"])
    finally:
        dist.destroy_process_group()
