"""A rank that dies in epoch 2 of the first attempt: Spark retries the barrier stage, the retry
resumes from the epoch-1 checkpoint, and one model is published.

Runs ``streamhydro train`` in a subprocess: the retry needs its own SparkContext (local[2] becomes
local[2,F], which allows task retries), and a test process may hold only one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamhydro.registry import Registry
from streamhydro.trainer.rank.checkpoint import RunDirectory

pytestmark = [pytest.mark.spark, pytest.mark.slow]

EPOCHS = 4


def run_train(tmp_path: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "STREAMHYDRO_MODEL_REGISTRY": str(tmp_path / "models"),
        "STREAMHYDRO_TRAINING_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "STREAMHYDRO_TRAINING_EPOCHS": str(EPOCHS),
        "STREAMHYDRO_TRAINING_TIMEOUT_SECONDS": "120",
        **extra_env,
    }
    return subprocess.run(
        [sys.executable, "-m", "streamhydro.cli", "--log-dir", str(tmp_path / "log"), "train", "--config",
         "models/training/breast_cancer.toml"],
        env=env, capture_output=True, text=True, timeout=420, check=False,
    )


def test_dead_rank_is_retried_and_resumes_from_the_checkpoint(tmp_path):
    done = run_train(tmp_path, {"STREAMHYDRO_TRAINING_INJECT_FAILURE": "1:2"})
    assert done.returncode == 0, done.stderr[-5000:]
    # The rank's own line comes from a Spark task, whose output is in the log file.
    logged = (tmp_path / "log" / "streamhydro-train.log").read_text(errors="replace")
    assert "training.inject_failure: rank 1 exits at the start of epoch 2" in logged
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    run = RunDirectory(summary["run_dir"])

    assert [a["attempt"] for a in run.attempts()] == [0, 1]
    history = run.history()
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1)), "every epoch trained exactly once"
    assert [h["attempt"] for h in history] == [0] + [1] * (EPOCHS - 1), "epoch 1 was not trained again"

    registry = Registry(tmp_path / "models")
    assert registry.versions("breast_cancer") == [1]
    manifest = registry.get("breast_cancer").manifest
    assert manifest.provenance["attempts"] == 2
    assert manifest.metrics["validation_accuracy"] >= 0.9
