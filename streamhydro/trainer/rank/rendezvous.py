"""Forming the process group of a barrier stage. Runs in each trainer rank, once per stage attempt.

Rank 0 opens the listening socket of a ``TCPStore`` on a port the OS picks (no race for a "free"
port) and records the stage attempt in the run directory; ``allGather`` spreads both to every rank;
then every rank joins ``torch.distributed`` over that store: nccl pinned to the one GPU Spark
assigned the task (Spark does not set CUDA_VISIBLE_DEVICES; :func:`streamhydro.devices.cuda_ordinal`
maps its address), gloo on CPU otherwise. ``timeout_seconds`` bounds the allGather, the store, the
group's collectives, and so how long a rank waits for a lost peer.

The rendezvous is split in two so that it costs the rank nothing but the wait for the slowest
peer. :func:`start` runs first thing in the task, before torch is imported, and leaves the
``allGather`` in a thread: Spark's barrier sync checks for completion once a second
(``BarrierTaskContext`` sleeps 1 s between checks), so every rank but the last to arrive waits up
to a second, which now overlaps the rank's imports and data loading.
:meth:`Rendezvous.process_group` then takes the allGather's answer and joins the group. torch is
imported inside the functions that need it, for the same reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from streamhydro.devices import cuda_ordinal
from streamhydro.trainer.errors import ClusterError

if TYPE_CHECKING:
    import torch
    from pyspark import BarrierTaskContext

    from streamhydro.trainer.rank.checkpoint import RunDirectory

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Group:
    """This rank's place in the process group."""

    rank: int
    world_size: int
    device: torch.device
    attempt: int

    def all_reduce(self, values: list[float]) -> list[float]:
        """Elementwise sum over the ranks (a collective: every rank calls it)."""
        return self._reduce(values, "SUM")

    def all_max(self, values: list[float]) -> list[float]:
        """Elementwise maximum over the ranks (a collective: every rank calls it)."""
        return self._reduce(values, "MAX")

    def sync(self) -> None:
        """Every rank waits here for every other (a collective, so it honours the group timeout)."""
        self.all_reduce([0.0])

    def _reduce(self, values: list[float], op: str) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor.tolist()


def task_device(context: BarrierTaskContext) -> tuple[torch.device, str]:
    """The GPU Spark assigned this task, with nccl; else the CPU, with gloo."""
    import torch

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


def start(context: BarrierTaskContext, run_dir: RunDirectory, timeout_seconds: int) -> Rendezvous:
    """Begin the rendezvous: rank 0 listens and records the attempt; every rank's allGather runs in a thread."""
    rank = context.partitionId()
    infos = context.getTaskInfos()
    listener = None
    message = ""
    if rank == 0:
        listener = _listen()
        message = json.dumps({"port": listener.getsockname()[1], "attempt": run_dir.record_attempt()})
    return Rendezvous(
        context=context, rank=rank, world_size=len(infos), host=infos[0].address.split(":")[0],
        timeout_seconds=timeout_seconds, listener=listener, gather=_Gather(context, message),
    )


@dataclasses.dataclass
class Rendezvous:
    """A rendezvous under way (made by :func:`start`)."""

    context: BarrierTaskContext
    rank: int
    world_size: int
    host: str
    timeout_seconds: int
    listener: socket.socket | None
    gather: _Gather

    @contextlib.contextmanager
    def process_group(self) -> Iterator[Group]:
        """Wait for the allGather, join the stage's process group; leave it on exit, whether training finished or failed."""
        import torch.distributed as dist

        device, backend = task_device(self.context)
        leader = json.loads(self.gather.result(self.timeout_seconds)[0])
        timeout = datetime.timedelta(seconds=self.timeout_seconds)
        if self.listener is not None:
            fd = self.listener.detach()
            try:
                store = dist.TCPStore(
                    self.host, leader["port"], self.world_size, True, timeout=timeout, wait_for_workers=False,
                    master_listen_fd=fd,
                )
            except BaseException:
                os.close(fd)
                raise
        else:
            store = dist.TCPStore(self.host, leader["port"], self.world_size, False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        log.info(
            "rank %d/%d joined %s group at %s:%d on %s (attempt %d)",
            self.rank, self.world_size, backend, self.host, leader["port"], device, leader["attempt"],
        )
        try:
            yield Group(self.rank, self.world_size, device, leader["attempt"])
        finally:
            dist.destroy_process_group()


class _Gather:
    """``context.allGather(message)`` in a daemon thread. Spark ends the call when the stage's tasks
    end or ``spark.barrier.sync.timeout`` passes, so the thread never outlives a failed stage for long."""

    def __init__(self, context: BarrierTaskContext, message: str) -> None:
        self._done = threading.Event()
        self._messages: list[str] = []
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(context, message), name="streamhydro-rendezvous", daemon=True).start()

    def _run(self, context: BarrierTaskContext, message: str) -> None:
        try:
            self._messages = context.allGather(message)
        except Exception as exc:  # noqa: BLE001 -- not swallowed: result() raises it in the rank's main thread
            self._error = exc
        finally:
            self._done.set()

    def result(self, timeout_seconds: int) -> list[str]:
        if not self._done.wait(timeout_seconds):
            raise ClusterError(
                "training.timeout_seconds", f"the ranks did not all reach the rendezvous within {timeout_seconds} s",
                "look in the executor logs for a rank that did not start, or raise training.timeout_seconds",
            )
        if self._error is not None:
            raise self._error
        return self._messages


def _listen() -> socket.socket:
    """A listening socket on every interface and a port the OS picks, as TCPStore's own server binds."""
    if socket.has_dualstack_ipv6():
        with contextlib.suppress(OSError):
            return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", 0))
