"""The run directory: checkpoints, the attempt log and the training history. Written by rank 0
(every epoch, and once per stage attempt); read by rank 0 when a stage attempt starts.

Layout of ``<training.checkpoint_dir>/<run id>/``::

    attempts.jsonl    one line per stage attempt, written when rank 0's task starts: {"attempt", "time"}
    history.jsonl     one line per finished epoch: {"epoch", "attempt", "loss", "steps", "seconds"}
    epoch-NNNN.pt     the model and optimizer state after epoch NNNN (only the latest is kept)

Checkpoints are written to a temporary name and renamed, so a rank that dies while saving leaves
the previous checkpoint intact. On a cluster the directory must be one every executor sees.
torch is imported where checkpoints are read or written: the attempt is recorded before the rank
has imported it (see :mod:`.rendezvous`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ATTEMPTS = "attempts.jsonl"
HISTORY = "history.jsonl"


class RunDirectory:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def record_attempt(self) -> int:
        """Append this stage attempt and return its number: 0 for the first."""
        attempt = len(self.attempts())
        self._append(ATTEMPTS, {"attempt": attempt, "time": time.time()})
        return attempt

    def attempts(self) -> list[dict[str, Any]]:
        return self._lines(ATTEMPTS)

    def history(self) -> list[dict[str, Any]]:
        return self._lines(HISTORY)

    def append_history(self, record: dict[str, Any]) -> None:
        self._append(HISTORY, record)

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint's contents, or None before the first epoch finished."""
        import torch

        checkpoints = sorted(self.path.glob("epoch-*.pt"))
        if not checkpoints:
            return None
        return torch.load(checkpoints[-1], map_location="cpu", weights_only=True)

    def save(self, epoch: int, state: dict[str, Any]) -> Path:
        import torch

        self.path.mkdir(parents=True, exist_ok=True)
        final = self.path / f"epoch-{epoch:04d}.pt"
        tmp = self.path / f".{final.name}.{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save({"epoch": epoch, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        for older in self.path.glob("epoch-*.pt"):
            if older.name < final.name:
                older.unlink()
        return final

    def _lines(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _append(self, name: str, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
