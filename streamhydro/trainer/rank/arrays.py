"""Arrow batches to training arrays. Runs in each trainer rank, once per stage attempt; pure
(pyarrow and numpy only), so it is tested without Spark."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class PartitionArrays:
    """One rank's rows, split into training and held-out rows."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray


def partition_arrays(batches: Iterable[pa.RecordBatch], n_features: int) -> PartitionArrays:
    """Columns 0..n_features-1 are float32 features, then the int32 class index, then the held-out flag."""
    collected = [b for b in batches if b.num_rows]
    if not collected:
        empty_x = np.zeros((0, n_features), dtype=np.float32)
        empty_y = np.zeros(0, dtype=np.int64)
        return PartitionArrays(empty_x, empty_y, empty_x, empty_y)
    table = pa.Table.from_batches(collected)
    if table.num_columns != n_features + 2:
        raise ValueError(f"expected {n_features} feature columns + label + holdout, got {table.num_columns} columns")
    x = np.empty((table.num_rows, n_features), dtype=np.float32)
    for i in range(n_features):
        x[:, i] = table.column(i).to_numpy()
    y = table.column(n_features).to_numpy().astype(np.int64)
    holdout = table.column(n_features + 1).to_numpy(zero_copy_only=False).astype(bool)
    return PartitionArrays(x[~holdout], y[~holdout], x[holdout], y[holdout])
