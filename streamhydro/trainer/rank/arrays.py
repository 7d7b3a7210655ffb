"""Arrow batches to training arrays. Runs in each trainer rank, once per stage attempt; pure
(pyarrow and numpy only), so it is tested without Spark.

Columns reach numpy through DLPack (zero-copy per batch), not ``to_numpy``: pyarrow's ``to_numpy``
imports pandas, which costs every rank about 0.3 s for no use. DLPack takes no nulls, and the rows
have none (:func:`streamhydro.trainer.data.prepare` drops them); booleans, which Arrow packs into
bits, are cast to uint8 first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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
    if collected[0].num_columns != n_features + 2:
        raise ValueError(f"expected {n_features} feature columns + label + holdout, got {collected[0].num_columns} columns")
    x = np.empty((sum(b.num_rows for b in collected), n_features), dtype=np.float32)
    for i in range(n_features):
        x[:, i] = _column(collected, i)
    y = _column(collected, n_features).astype(np.int64)
    holdout = _column(collected, n_features + 1).astype(bool)
    return PartitionArrays(x[~holdout], y[~holdout], x[holdout], y[holdout])


def _column(batches: list[pa.RecordBatch], i: int) -> np.ndarray:
    """Column ``i`` of all batches as one numpy array."""
    parts = []
    for batch in batches:
        column = batch.column(i)
        parts.append(np.from_dlpack(pc.cast(column, pa.uint8()) if pa.types.is_boolean(column.type) else column))
    return np.concatenate(parts)
