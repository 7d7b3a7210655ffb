"""ONNX export and its checks. Runs in trainer rank 0, once, after the last epoch.

The exported graph is :class:`~streamhydro.trainer.model.Probabilities`: raw features in
(``features``, float32, dynamic batch axis), class probabilities out (``scores``), so serving
reads ``outputs[0]`` as one score per label. Uses PyTorch's TorchScript-based exporter
(``dynamo=False``): the torch.export-based one needs onnxscript, which the project does not carry.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from streamhydro.trainer.errors import ExportError
from streamhydro.trainer.model import Probabilities
from streamhydro.trainer.plan import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def export_onnx(net: nn.Module, n_features: int) -> bytes:
    model = Probabilities(net).to("cpu").eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model,
            (torch.zeros(1, n_features),),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
    data = buffer.getvalue()
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the exported model: {exc}") from exc
    return data


def max_difference(net: nn.Module, onnx_bytes: bytes, rows: np.ndarray) -> float:
    """Largest |ONNX Runtime - PyTorch| over the class probabilities of ``rows``."""
    model = Probabilities(net).to("cpu").eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).numpy()
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: rows})
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX Runtime returned shape {actual.shape}, PyTorch {expected.shape}")
    return float(np.max(np.abs(actual - expected))) if len(rows) else 0.0


def export_checked(net: nn.Module, rows: np.ndarray, tolerance: float) -> tuple[bytes, float]:
    """Export, check with onnx.checker, compare with PyTorch on ``rows``; raise past ``tolerance``."""
    data = export_onnx(net, rows.shape[1])
    difference = max_difference(net, data, rows)
    if difference > tolerance:
        raise ExportError(
            f"ONNX Runtime and PyTorch disagree by {difference:.3g} on {len(rows)} held-out rows "
            f"(training.tolerance = {tolerance:g}); raise training.tolerance only if the difference is expected"
        )
    return data, difference
