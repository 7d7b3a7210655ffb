"""Publishing the trained model into the registry. Runs on the driver, once per run, after the
barrier stage succeeded, so a retried stage never publishes twice. The write is
:meth:`streamhydro.registry.Registry.publish`'s: staged beside the model directory and renamed into
place, so a half-written version is never visible."""

from __future__ import annotations

import datetime
from typing import Any

from streamhydro import __version__
from streamhydro.registry import Manifest, ModelVersion, Registry, TensorSpec
from streamhydro.trainer.config import TrainConfig
from streamhydro.trainer.plan import INPUT_NAME, OUTPUT_NAME

METRIC_KEYS = (
    "validation_accuracy", "validation_loss", "validation_rows", "train_accuracy", "train_loss", "train_rows",
    "onnx_max_abs_diff", "onnx_check_rows",
)


def manifest(config: TrainConfig, report: dict[str, Any], command: str, run_id: str) -> Manifest:
    """The manifest of a new version (number and sha256 are filled in by the registry), from rank 0's report.

    ``provenance.feature_stats`` keeps the training rows' per-feature mean and standard deviation,
    which the load generator uses to make events that look like the training data; ``provenance.torch``
    is the ranks' torch version (the driver does not import torch).
    """
    d, m, t = config.data, config.model, config.training
    n, k = len(d.features), len(d.labels)
    return Manifest(
        name=m.name,
        version=0,
        sha256="",
        inputs=(TensorSpec(INPUT_NAME, "float32", (-1, n), features=d.features),),
        outputs=(TensorSpec(OUTPUT_NAME, "float32", (-1, k)),),
        labels=d.labels,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        description=m.description,
        provenance={
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
        },
        metrics={key: report[key] for key in METRIC_KEYS if key in report},
    )


def publish(config: TrainConfig, model: bytes, report: dict[str, Any], command: str, run_id: str) -> ModelVersion:
    return Registry(config.model.registry).publish(manifest(config, report, command, run_id), model)
