"""How closely scores from two devices must agree: the one statement of it, used by every check.

Pure; runs anywhere (the GPU tests, ``benchmarks/gpu_check.py``, the outside audit in
:mod:`streamhydro.harness.audit`). ``docs/inference.md`` states the same numbers.

ONNX Runtime's CUDA provider is asked not to use TF32 (``use_tf32 = 0``) unless
``inference.allow_tf32 = true``. Without TF32 a float32 model on the GPU differs from the CPU only by
the order of its additions: a few float32 ulps, far inside ``rtol 1e-4, atol 1e-5`` (scores are
written as JSON from float32, which round-trips exactly). TF32 keeps 10 of float32's 23 mantissa
bits in matrix products (relative error about 5e-4 per product), so two devices then agree only to
two or three decimals: ``rtol 1e-2, atol 1e-2``.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """``|a - b| <= atol + rtol * |b|`` element-wise, as :func:`numpy.isclose` counts it."""

    rtol: float
    atol: float

    def close(self, actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Element-wise agreement (NaN equals NaN: a NaN score is written as null on both devices)."""
        return np.isclose(actual, expected, rtol=self.rtol, atol=self.atol, equal_nan=True)

    def excess(self, actual: np.ndarray, expected: np.ndarray) -> float:
        """The largest ``|a - b| - (atol + rtol * |b|)``: <= 0 when everything agrees."""
        actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        if actual.size == 0:
            return float("-inf")
        return float(np.nanmax(np.abs(actual - expected) - (self.atol + self.rtol * np.abs(expected))))


FLOAT32 = Tolerance(rtol=1e-4, atol=1e-5)
TF32 = Tolerance(rtol=1e-2, atol=1e-2)


def score_tolerance(allow_tf32: bool) -> Tolerance:
    """How far scores of the same rows may differ between the CPU and a GPU (``inference.allow_tf32``)."""
    return TF32 if allow_tf32 else FLOAT32
