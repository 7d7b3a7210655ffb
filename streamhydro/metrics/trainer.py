"""Training metrics. Runs in trainer ranks (barrier tasks in executor Python workers, or a plain process).

A training job is a batch job, so the convention is to push: with a Pushgateway address each rank
pushes its metrics at every epoch end and when it finishes, grouped by ``job`` and ``rank`` so ranks
never overwrite each other. Without one, each rank serves its own endpoint while it trains (port
``port + rank``, or any free port with 0; the URL is logged).

Usage, per rank::

    with TrainerReporter(rank, world_size, pushgateway=cfg.pushgateway) as report:
        for epoch in ...:
            for batch in ...:
                report.step(loss=float(loss), samples=len(batch))
            report.epoch_end(epoch, samples_per_second)
"""

from __future__ import annotations

import logging
from types import TracebackType

from prometheus_client import CollectorRegistry, push_to_gateway

from streamhydro.metrics.definitions import TrainerMetricSet
from streamhydro.metrics.endpoint import Endpoint

log = logging.getLogger(__name__)

DEFAULT_JOB = "streamhydro_trainer"


class TrainerReporter:
    """One rank's training metrics. Not shared between processes; make one per rank."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        pushgateway: str = "",
        job: str = DEFAULT_JOB,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.metrics = TrainerMetricSet(self.registry)
        self.metrics.rank.set(rank)
        self.metrics.ranks.set(world_size)
        self._rank = rank
        self._pushgateway = pushgateway
        self._job = job
        self._endpoint: Endpoint | None = None
        self.url: str | None = None
        if not pushgateway:
            self._endpoint = Endpoint(self.registry, host, port + rank if port else 0)
            self.url = self._endpoint.url

    def step(self, loss: float, samples: int) -> None:
        """After every optimizer step."""
        self.metrics.loss.set(loss)
        self.metrics.samples.inc(samples)
        self.metrics.steps.inc()

    def epoch_end(self, epoch: int, samples_per_second: float) -> None:
        """After every epoch; pushes when a Pushgateway is configured."""
        self.metrics.epoch.set(epoch)
        self.metrics.samples_per_second.set(samples_per_second)
        self.push()

    def push(self) -> None:
        """Send the current values to the Pushgateway (no-op when serving). A failed push does not stop training."""
        if not self._pushgateway:
            return
        try:
            push_to_gateway(self._pushgateway, job=self._job, registry=self.registry, grouping_key={"rank": str(self._rank)})
        except OSError as exc:
            log.warning("rank %d: could not push metrics to %s (%s); training goes on", self._rank, self._pushgateway, exc)

    def close(self) -> None:
        """Final push, or stop serving."""
        self.push()
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None

    def __enter__(self) -> "TrainerReporter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
