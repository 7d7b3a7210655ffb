"""Publishing the trained model into the registry. Runs on the driver, once per run, after the
barrier stage succeeded, so a retried stage never publishes twice. The model goes in through
:func:`streamhydro.models_add.add_model`, as any user's model does: checked on ONNX Runtime, then
written by :meth:`streamhydro.registry.Registry.publish`, staged beside the model directory and
renamed into place, so a half-written version is never visible."""

from __future__ import annotations

from typing import Any

from streamhydro import __version__
from streamhydro.models_add import add_model
from streamhydro.registry import KIND_CLASSIFIER, ModelVersion, Registry
from streamhydro.trainer.config import TrainConfig
from streamhydro.trainer.plan import INPUT_NAME

METRIC_KEYS = (
    "validation_accuracy", "validation_loss", "validation_rows", "train_accuracy", "train_loss", "train_rows",
    "onnx_max_abs_diff", "onnx_check_rows",
)


def provenance(config: TrainConfig, report: dict[str, Any], command: str, run_id: str) -> dict[str, Any]:
    """How the version was made, from rank 0's report.

    ``feature_stats`` keeps the training rows' per-feature mean and standard deviation, which the
    load generator uses to make events that look like the training data; ``torch`` is the ranks'
    torch version (the driver does not import torch).
    """
    d, m, t = config.data, config.model, config.training
    return {
        "command": command,
        "data": config.source_description(),
        "label_column": d.label,
        "parameters": {
            "hidden": list(m.hidden), "epochs": t.epochs, "batch_size": t.batch_size,
            "learning_rate": t.learning_rate, "ranks": t.ranks, "seed": t.seed,
            "validation_fraction": d.validation_fraction,
        },
        "trainer": f"streamhydro {__version__}",
        "torch": report["torch"],
        "run_id": run_id,
        "attempts": report["attempt"] + 1,
        "feature_stats": {"mean": report["feature_mean"], "std": report["feature_std"]},
    }


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The validation and export results of rank 0's report that the manifest keeps."""
    return {key: report[key] for key in METRIC_KEYS if key in report}


def publish(config: TrainConfig, model: bytes, report: dict[str, Any], command: str, run_id: str) -> ModelVersion:
    return add_model(
        Registry(config.model.registry),
        model,
        config.model.name,
        kind=KIND_CLASSIFIER,
        labels=config.data.labels,
        mapping={INPUT_NAME: {"features": list(config.data.features)}},
        description=config.model.description,
        provenance=provenance(config, report, command, run_id),
        metrics=metrics(report),
    )
