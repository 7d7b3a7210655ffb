"""Errors the trainer raises on purpose. Raised on the driver (start checks, publishing) and in
trainer ranks (data that cannot be trained on, an export that fails its checks)."""

from __future__ import annotations

from streamhydro.errors import StreamhydroError


class TrainingError(StreamhydroError):
    """Training could not run or did not produce a model."""


class ClusterError(TrainingError):
    """The Spark cluster cannot run the barrier stage as configured. Raised before launching it."""

    def __init__(self, setting: str, problem: str, fix: str) -> None:
        self.setting = setting
        self.problem = problem
        self.fix = fix
        super().__init__(f"{setting}: {problem}. Fix: {fix}")


class DataError(TrainingError):
    """The training data does not fit the configuration (labels, features, too few rows)."""


class ExportError(TrainingError):
    """The exported ONNX model failed a check (onnx.checker, ONNX Runtime vs PyTorch)."""

