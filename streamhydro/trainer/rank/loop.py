"""The DDP training loop. Runs in each trainer rank, once per stage attempt.

Every rank runs the same number of steps per epoch: the largest partition's step count (from the
:class:`~streamhydro.trainer.rank.statistics.Statistics` all ranks share), with smaller partitions
cycling through their (reshuffled) rows. A collective that one rank skipped would hang the others
until the group timeout, so the loop has no per-rank branch around a collective. After each epoch
rank 0 saves a checkpoint and every rank waits for it, so a rank dying in epoch N leaves the
checkpoint of epoch N-1 behind, and the retried stage resumes there.

Every rank reports its own training metrics through one
:class:`~streamhydro.metrics.trainer.TrainerReporter` (``[metrics]`` of the trainer config): loss
after every optimizer step; epoch and the rank's samples/s after every epoch, when they are pushed
to the Pushgateway if one is configured. A failed push is logged and training goes on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from streamhydro.metrics.trainer import TrainerReporter
from streamhydro.trainer.model import mlp
from streamhydro.trainer.plan import RankPlan
from streamhydro.trainer.rank.arrays import PartitionArrays
from streamhydro.trainer.rank.checkpoint import RunDirectory
from streamhydro.trainer.rank.rendezvous import Group
from streamhydro.trainer.rank.statistics import Statistics

log = logging.getLogger(__name__)

INJECTED_EXIT_CODE = 17


def train(
    plan: RankPlan, data: PartitionArrays, stats: Statistics, group: Group, run_dir: RunDirectory
) -> tuple[nn.Module, dict[str, Any]]:
    """Train from the last checkpoint (or from scratch); return the trained network and a report.

    ``stats`` must have passed :func:`~streamhydro.trainer.rank.statistics.problem` (every rank has rows).
    """
    started = time.perf_counter()
    steps = math.ceil(max(stats.rows_per_rank) / plan.batch_size)

    torch.manual_seed(plan.seed)
    net = mlp(stats.mean, stats.std, plan.hidden, len(plan.labels)).to(group.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=plan.learning_rate)
    resumed = _resume(net, optimizer, group, run_dir)
    model = DistributedDataParallel(net, device_ids=[group.device.index] if group.device.type == "cuda" else None)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(data.x_train).to(group.device)
    y = torch.from_numpy(data.y_train).to(group.device)

    samples = 0
    loop_started = time.perf_counter()
    with _reporter(plan, group) as metrics:
        for epoch in range(resumed + 1, plan.epochs + 1):
            _maybe_die(plan, group, epoch)
            epoch_started = time.perf_counter()
            order = _epoch_order(len(y), steps * plan.batch_size, plan.seed, epoch, group.rank)
            model.train()
            total = 0.0
            for step in range(steps):
                idx = order[step * plan.batch_size : (step + 1) * plan.batch_size].to(group.device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                step_loss = float(loss.detach())
                total += step_loss
                metrics.step(step_loss, len(idx))
            samples += steps * plan.batch_size
            mean_loss = group.all_reduce([total / steps])[0] / group.world_size
            if group.rank == 0:
                run_dir.save(epoch, {"model": net.state_dict(), "optimizer": optimizer.state_dict()})
                run_dir.append_history(
                    {"epoch": epoch, "attempt": group.attempt, "loss": mean_loss, "steps": steps,
                     "seconds": round(time.perf_counter() - epoch_started, 4)}
                )
            group.sync()
            metrics.epoch_end(epoch, steps * plan.batch_size / (time.perf_counter() - epoch_started))
        train_seconds = time.perf_counter() - loop_started

    net.eval()
    train_correct, train_loss = _evaluate(net, data.x_train, data.y_train, group.device)
    holdout_correct, holdout_loss = _evaluate(net, data.x_holdout, data.y_holdout, group.device)
    totals = group.all_reduce(
        [train_correct, train_loss, len(data.y_train), holdout_correct, holdout_loss, len(data.y_holdout), samples]
    )
    train_rows, holdout_rows = int(totals[2]), int(totals[5])
    report = {
        "validation_accuracy": totals[3] / holdout_rows if holdout_rows else None,
        "validation_loss": totals[4] / holdout_rows if holdout_rows else None,
        "validation_rows": holdout_rows,
        "train_accuracy": totals[0] / train_rows,
        "train_loss": totals[1] / train_rows,
        "train_rows": train_rows,
        "rows_per_rank": list(stats.rows_per_rank),
        "steps_per_epoch": steps,
        "epochs": plan.epochs,
        "resumed_after_epoch": resumed,
        "attempt": group.attempt,
        "train_seconds": round(train_seconds, 4),
        "samples_per_second": round(totals[6] / train_seconds, 1) if train_seconds > 0 else None,
        "rank_seconds": round(time.perf_counter() - started, 4),
        "feature_mean": list(stats.mean),
        "feature_std": list(stats.std),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return net, report


def _reporter(plan: RankPlan, group: Group) -> TrainerReporter:
    """This rank's metrics: pushed to ``plan.metrics.pushgateway``, or served while it trains (URL logged)."""
    m = plan.metrics
    reporter = TrainerReporter(group.rank, group.world_size, pushgateway=m.pushgateway, host=m.host, port=m.port)
    if reporter.url:
        log.info("rank %d serves its training metrics at %s", group.rank, reporter.url)
    else:
        log.info("rank %d pushes its training metrics to %s at every epoch end", group.rank, m.pushgateway)
    return reporter


def _resume(net: nn.Module, optimizer: torch.optim.Optimizer, group: Group, run_dir: RunDirectory) -> int:
    """Load rank 0's latest checkpoint into every rank; return the epoch it ended (0 if none)."""
    box = [run_dir.latest() if group.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=group.device if group.device.type == "cuda" else None)
    checkpoint = box[0]
    if checkpoint is None:
        return 0
    net.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if group.rank == 0:
        log.info("attempt %d resumes after epoch %d from %s", group.attempt, checkpoint["epoch"], run_dir.path)
    return int(checkpoint["epoch"])


def _epoch_order(rows: int, needed: int, seed: int, epoch: int, rank: int) -> torch.Tensor:
    """A fresh permutation of this rank's rows, repeated cyclically up to ``needed`` indexes."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
    permutation = torch.randperm(rows, generator=generator)
    return permutation[torch.arange(needed) % rows]


def _evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[int, float]:
    """(correct predictions, summed cross-entropy) over the rows; (0, 0.0) for none."""
    if len(y) == 0:
        return 0, 0.0
    with torch.no_grad():
        logits = net(torch.from_numpy(x).to(device))
        target = torch.from_numpy(y).to(device)
        correct = int((logits.argmax(dim=1) == target).sum())
        loss = float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    return correct, loss


def _maybe_die(plan: RankPlan, group: Group, epoch: int) -> None:
    """``training.inject_failure``: end this rank's process as a crash would, first attempt only."""
    if plan.inject_failure == (group.rank, epoch) and group.attempt == 0:
        log.error("training.inject_failure: rank %d exits at the start of epoch %d (attempt 0)", group.rank, epoch)
        os._exit(INJECTED_EXIT_CODE)
