"""The training rows' statistics over all ranks, and the checks that decide whether they can be
trained on. Runs in each trainer rank, once per stage attempt, right after the rendezvous.

The driver runs no Spark job for them (the source is read once, by the barrier stage): each rank
reduces its own rows to sums with the pure functions below, three allreduces make them global, and
every rank ends with the same :class:`Statistics`. Mean and standard deviation are float64, over
the training rows only, in two passes (sums, then squared deviations from the global mean); a
feature with no spread gets a standard deviation of 1.

As every rank holds the same numbers, :func:`problem` gives every rank the same verdict: when the
data cannot be trained on, all ranks stop before training with no collective left unmatched, and
rank 0 hands the message to the driver, which raises :class:`~streamhydro.trainer.errors.DataError`.
A fault in the data is therefore not retried the way a failed stage is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from streamhydro.trainer.rank.arrays import PartitionArrays

if TYPE_CHECKING:
    from streamhydro.trainer.rank.rendezvous import Group


@dataclasses.dataclass(frozen=True)
class Statistics:
    """What every rank knows about all ranks' rows. ``label_range`` is the smallest and largest
    class index over all rows, training and held out; None when there are no rows at all."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    rows_per_rank: tuple[int, ...]
    holdout_rows: int
    label_range: tuple[int, int] | None

    @property
    def train_rows(self) -> int:
        return sum(self.rows_per_rank)


def gather(data: PartitionArrays, group: Group) -> Statistics:
    """The statistics of all ranks' rows. Three collectives: every rank calls it once."""
    own_rows = [0.0] * group.world_size
    own_rows[group.rank] = float(len(data.y_train))
    totals = group.all_reduce([*own_rows, float(len(data.y_holdout)), *feature_sums(data.x_train)])
    rows = tuple(int(c) for c in totals[: group.world_size])
    holdout_rows = int(totals[group.world_size])
    mean = np.array(totals[group.world_size + 1 :]) / max(sum(rows), 1)
    squares = group.all_reduce(squared_deviations(data.x_train, mean).tolist())
    highest, negated_lowest = group.all_max(label_bounds(data))
    return Statistics(
        mean=tuple(mean.tolist()),
        std=standard_deviations(squares, sum(rows)),
        rows_per_rank=rows,
        holdout_rows=holdout_rows,
        label_range=None if math.isinf(highest) else (int(-negated_lowest), int(highest)),
    )


def feature_sums(x: np.ndarray) -> list[float]:
    return x.sum(axis=0, dtype=np.float64).tolist()


def squared_deviations(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per feature, the sum of (x - mean)^2 over this rank's rows, in float64."""
    return np.square(x.astype(np.float64) - mean).sum(axis=0)


def label_bounds(data: PartitionArrays) -> list[float]:
    """[largest class index, -smallest class index] over this rank's rows (a maximum over ranks
    gives both bounds); -inf for both when the rank has no rows."""
    labels = np.concatenate([data.y_train, data.y_holdout])
    if not len(labels):
        return [-math.inf, -math.inf]
    return [float(labels.max()), float(-labels.min())]


def standard_deviations(squares: Sequence[float], rows: int) -> tuple[float, ...]:
    """Population standard deviations from summed squared deviations; 1 where there is no spread."""
    if not rows:
        return tuple(1.0 for _ in squares)
    return tuple(math.sqrt(s / rows) or 1.0 for s in squares)


def problem(stats: Statistics, labels: Sequence[str], label_column: str) -> str | None:
    """Why these rows cannot be trained on, naming the fix; None when they can."""
    if not stats.train_rows:
        return "no training rows in the data after dropping rows with nulls; check data.path / data.table"
    low, high = stats.label_range or (0, 0)
    if low < 0 or high >= len(labels):
        return (
            f"label column {label_column!r} has values outside data.labels {list(labels)} "
            f"(class indexes {low}..{high}); list every class in data.labels, in index order"
        )
    if 0 in stats.rows_per_rank:
        return (
            f"rank {stats.rows_per_rank.index(0)} has no training rows (rows per rank {list(stats.rows_per_rank)}); "
            "lower training.ranks or use more data"
        )
    return None
