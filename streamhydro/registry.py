"""The model registry: a directory of versioned ONNX models, each with a manifest.

Runs on the driver (resolving which version to serve, publishing) and in executor Python
workers (loading the bytes a task scores with). Pure file operations, no Spark.

Layout::

    <root>/<name>/<version>/model.onnx      the model, as ONNX
    <root>/<name>/<version>/manifest.json   what it is (see :class:`Manifest`)
    <root>/<name>/PROMOTED                  optional: promotion history, one version per line;
                                            the last line is what "promoted" resolves to

Any other directory under the root (training data, say) is not a model and is ignored.

Versions are positive integers. A version directory appears only complete: publishing writes a
hidden staging directory beside it and renames it into place, so readers never see a half-written
model. ``latest`` resolves to the highest version; ``promoted`` to the last version named in
PROMOTED (or the highest, when nothing was promoted); a number pins that version. ``rollback``
drops PROMOTED's last line; PROMOTED is rewritten whole and renamed into place, never edited.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from streamhydro.errors import ModelError

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
PROMOTED_FILE = "PROMOTED"
SELECTORS = ("latest", "promoted")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    An input is fed from event fields named by dotted paths ("user.age" is event["user"]["age"]):
    ``features`` names one scalar field per column, in column order; otherwise ``field`` names
    one field holding an array of ``width`` values (default: the input's name).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    features: tuple[str, ...] = ()
    field: str = ""

    @property
    def width(self) -> int:
        """Values per row: the product of every dimension after the batch axis."""
        width = 1
        for dim in self.shape[1:]:
            width *= dim
        return width

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(
            name=data["name"],
            dtype=data.get("dtype", "float32"),
            shape=tuple(int(d) for d in data["shape"]),
            features=tuple(data.get("features", ())),
            field=data.get("field", ""),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.features:
            out["features"] = list(self.features)
        if self.field:
            out["field"] = self.field
        return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a model version is. Stored as ``manifest.json`` beside ``model.onnx``.

    ``outputs[0]`` holds the class scores, one column per entry of ``labels``.
    ``provenance`` records how the model was made (data source, parameters, command, trainer
    version), ``metrics`` its validation results; both are free-form JSON objects.
    """

    name: str
    version: int
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    created: str
    description: str = ""
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def scores_output(self) -> TensorSpec:
        return self.outputs[0]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        try:
            return cls(
                name=data["name"],
                version=int(data["version"]),
                sha256=data["sha256"],
                inputs=tuple(TensorSpec.from_json(i) for i in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(o) for o in data["outputs"]),
                labels=tuple(data["labels"]),
                created=data["created"],
                description=data.get("description", ""),
                provenance=dict(data.get("provenance", {})),
                metrics=dict(data.get("metrics", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(data.get("name", "?"), f"manifest is malformed ({exc!r})") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "labels": list(self.labels),
            "created": self.created,
            "description": self.description,
            "provenance": self.provenance,
            "metrics": self.metrics,
        }


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """A resolved, verified model version: its manifest and where its ONNX file lies."""

    manifest: Manifest
    path: Path

    @property
    def digest(self) -> str:
        return self.manifest.sha256

    @property
    def label(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    def read_bytes(self) -> bytes:
        """The ONNX bytes, checked against the manifest's sha256."""
        data = self.path.read_bytes()
        actual = sha256_bytes(data)
        if actual != self.manifest.sha256:
            raise ModelError(
                self.label,
                f"checksum mismatch: {self.path} has sha256 {actual}, manifest says {self.manifest.sha256}",
            )
        return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Registry:
    """A registry rooted at a directory. Cheap to create; holds no open files."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def promoted(self, name: str) -> int | None:
        history = self.promotions(name)
        return history[-1] if history else None

    def promotions(self, name: str) -> list[int]:
        """Every promotion still in effect or rolled back to, oldest first; the last is current."""
        pointer = self.root / name / PROMOTED_FILE
        if not pointer.exists():
            return []
        try:
            return [int(line) for line in pointer.read_text().split()]
        except ValueError as exc:
            raise ModelError(name, f"{pointer} is not a list of version numbers ({exc})") from exc

    def resolve(self, name: str, selector: str = "latest") -> int:
        """The version number that ``selector`` (latest | promoted | a number) names."""
        versions = self.versions(name)
        if not versions:
            raise ModelError(name, f"no versions under {self.root / name}")
        if selector == "latest":
            return versions[-1]
        if selector == "promoted":
            promoted = self.promoted(name)
            return versions[-1] if promoted is None else promoted
        if selector.isdigit() and int(selector) in versions:
            return int(selector)
        raise ModelError(name, f"version '{selector}' not found; have {versions}, or use latest | promoted")

    def manifest(self, name: str, version: int) -> Manifest:
        path = self.root / name / str(version) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"{name}:{version}", f"no manifest at {path}") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"{name}:{version}", f"manifest {path} is not JSON ({exc})") from exc
        return Manifest.from_json(data)

    def get(self, name: str, selector: str = "latest") -> ModelVersion:
        """Resolve ``selector`` and return the version, without reading the model bytes."""
        version = self.resolve(name, selector)
        manifest = self.manifest(name, version)
        if manifest.name != name or manifest.version != version:
            raise ModelError(
                f"{name}:{version}",
                f"manifest names {manifest.name}:{manifest.version}, which does not match its directory",
            )
        return ModelVersion(manifest, self.root / name / str(version) / MODEL_FILE)

    def publish(self, manifest: Manifest, model_bytes: bytes) -> ModelVersion:
        """Write a new version atomically. ``manifest.version`` 0 means "the next free number".

        The sha256 in the stored manifest is computed here from ``model_bytes``.
        """
        model_dir = self.root / manifest.name
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
        try:
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from readers running as other users
            (staging / MODEL_FILE).write_bytes(model_bytes)
            while True:
                version = manifest.version or (max(self.versions(manifest.name), default=0) + 1)
                final = dataclasses.replace(manifest, version=version, sha256=sha256_bytes(model_bytes))
                (staging / MANIFEST_FILE).write_text(json.dumps(final.to_json(), indent=2) + "\n")
                _fsync_dir(staging)
                try:
                    os.rename(staging, model_dir / str(version))
                except OSError as exc:
                    if manifest.version or not (model_dir / str(version)).exists():
                        raise ModelError(manifest.name, f"cannot publish version {version}: {exc}") from exc
                    continue
                _fsync_dir(model_dir)
                return ModelVersion(final, model_dir / str(version) / MODEL_FILE)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def promote(self, name: str, version: int) -> None:
        """Make ``version`` the promoted one, atomically, remembering the one before for rollback."""
        if version not in self.versions(name):
            raise ModelError(name, f"cannot promote version {version}: have {self.versions(name)}")
        history = self.promotions(name)
        if history[-1:] != [version]:
            self._write_promotions(name, [*history, version])

    def rollback(self, name: str) -> int:
        """Undo the last promotion: the version promoted before it is promoted again. Returns it."""
        history = self.promotions(name)
        if len(history) < 2:
            raise ModelError(name, f"nothing to roll back to: promotion history is {history}; promote a version first")
        if history[-2] not in self.versions(name):
            raise ModelError(name, f"cannot roll back to version {history[-2]}: it is no longer in {self.root / name}")
        self._write_promotions(name, history[:-1])
        return history[-2]

    def _write_promotions(self, name: str, history: list[int]) -> None:
        pointer = self.root / name / PROMOTED_FILE
        tmp = pointer.with_name(f".{PROMOTED_FILE}.{os.getpid()}")
        tmp.write_text("".join(f"{v}\n" for v in history))
        os.replace(tmp, pointer)


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        if child.is_file():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
