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
import enum
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from streamhydro.choices import allowed
from streamhydro.errors import ConfigError, ModelError

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
PROMOTED_FILE = "PROMOTED"


class Selector(enum.StrEnum):
    """A version named by what it is rather than by its number (``model.version``, ``models show``)."""

    LATEST = "latest"  # the highest version
    PROMOTED = "promoted"  # the last line of PROMOTED, or the highest version when nothing was promoted


def parse_version(value: object, key: str) -> Selector | int:
    """A :class:`Selector`, or a pinned version number (>= 1) from an int or a string of digits; a
    ConfigError naming ``key`` for anything else."""
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and int(text) >= 1:
            return int(text)
        for member in Selector:
            if member.value == text.lower():
                return member
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(key, f"{value!r} is not a version", f"use {allowed(Selector)}, or a version number (pinned)")


KIND_CLASSIFIER = "classifier"
KIND_REGRESSOR = "regressor"
KIND_SCORE = "score"
KIND_EMBEDDING = "embedding"
KIND_OUTPUTS = "outputs"
# What a model's prediction is; each kind has its own prediction JSON (streamhydro.payload.predictions).
KINDS = (KIND_CLASSIFIER, KIND_REGRESSOR, KIND_SCORE, KIND_EMBEDDING, KIND_OUTPUTS)

# Tensor element types a manifest may name, with the numpy dtype of the arrays that carry them.
DTYPES = {
    "float16": np.dtype("float16"),
    "float32": np.dtype("float32"),
    "float64": np.dtype("float64"),
    "int32": np.dtype("int32"),
    "int64": np.dtype("int64"),
    "bool": np.dtype("bool"),
    "string": np.dtype("object"),
}
NUMERIC_DTYPES = ("float16", "float32", "float64", "int32", "int64")
FLOAT_DTYPES = ("float16", "float32", "float64")

_SPEC_KEYS = {"name", "dtype", "shape", "features", "field"}
_MANIFEST_KEYS = {
    "name", "version", "sha256", "created", "description", "provenance", "metrics", "kind", "inputs", "outputs",
    "labels", "targets",
}


def _strings(value: Any, key: str) -> tuple[str, ...]:
    """A JSON list of strings as a tuple; ValueError naming ``key`` for anything else."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"'{key}' must be a list of strings, not {value!r}")
    return tuple(value)


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of arrays holding manifest dtype ``dtype`` (strings are object arrays of ``str``)."""
    return DTYPES[dtype]


def check_path(path: str) -> bool:
    """Whether ``path`` is a dotted path: non-empty names joined by dots ("user.age")."""
    return isinstance(path, str) and all(part.strip() == part and part for part in path.split("."))


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    ``shape`` starts with the batch axis (-1); the other dimensions are static. For an input,
    ``features`` names one dotted path per value of a row ("user.age" reads event["user"]["age"]),
    in the input's column order; ``field`` instead names one dotted path holding a list of ``width``
    values. An input with neither reads ``field`` = its own name. Outputs use neither.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    features: tuple[str, ...] = ()
    field: str = ""

    def __post_init__(self) -> None:
        if not self.features and not self.field:
            object.__setattr__(self, "field", self.name)

    @property
    def width(self) -> int:
        """Values per row: the product of every dimension after the batch axis."""
        width = 1
        for dim in self.shape[1:]:
            width *= dim
        return width

    @property
    def paths(self) -> tuple[str, ...]:
        """The dotted paths this input is read from: its features, or its one field."""
        return self.features or (self.field,)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        unknown = set(data) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"tensor {data.get('name')!r} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
        field = data.get("field", "")
        if not isinstance(field, str):
            raise ValueError(f"tensor {data.get('name')!r}: 'field' must be a string, not {field!r}")
        return cls(
            name=data["name"],
            dtype=data.get("dtype", "float32"),
            shape=tuple(int(d) for d in data["shape"]),
            features=_strings(data.get("features", []), "features"),
            field=field,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.features:
            out["features"] = list(self.features)
        elif self.field != self.name:
            out["field"] = self.field
        return out

    def problem(self) -> str | None:
        """What is wrong with this spec on its own, or None."""
        if not isinstance(self.name, str) or not self.name:
            return f"tensor name {self.name!r} is not a non-empty string"
        if self.dtype not in DTYPES:
            return f"'{self.name}' has dtype {self.dtype!r}; supported: {', '.join(DTYPES)}"
        if not self.shape or self.shape[0] != -1 or any(d <= 0 for d in self.shape[1:]):
            return f"'{self.name}' has shape {list(self.shape)}; it must be [-1, d1, ...]: -1 the batch axis, the others static and positive"
        if self.features and self.field:
            return f"'{self.name}' has both features and field; give one"
        if self.features and len(self.features) != self.width:
            return f"'{self.name}' names {len(self.features)} features but its width (shape {list(self.shape)}) is {self.width}"
        return None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a model version is. Stored as ``manifest.json`` beside ``model.onnx``.

    ``kind`` says what the prediction is and so how it is written (see
    :mod:`streamhydro.payload.predictions`); a manifest without ``kind`` is a classifier.
    ``inputs`` are every ONNX graph input, in graph order; ``outputs`` the graph outputs the
    prediction is built from. By kind:

    * ``classifier``: one float output of class scores, one column per entry of ``labels``;
    * ``regressor``: one numeric output; ``targets`` optionally names its columns (width > 1);
    * ``score``: one numeric output of width 1;
    * ``embedding``: one numeric output of any width;
    * ``outputs``: any outputs, each written under its own name.

    ``labels`` is empty for every kind but a classifier, ``targets`` for every kind but a regressor.
    ``provenance`` records how the model was made (data source, parameters, command, converter,
    rewrites), ``metrics`` its validation results; both are free-form JSON objects.
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
    kind: str = KIND_CLASSIFIER
    targets: tuple[str, ...] = ()

    @property
    def scores_output(self) -> TensorSpec:
        """A classifier's output of class scores."""
        return self.outputs[0]

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}"

    def check(self) -> None:
        """Raise :class:`ModelError` naming the manifest key that is wrong, and how to fix it."""
        problem = self.problem()
        if problem is not None:
            raise ModelError(self.label, problem)

    def problem(self) -> str | None:
        """What is wrong with this manifest (its key first), or None."""
        if self.kind not in KINDS:
            return f"manifest key 'kind' is {self.kind!r}; use one of {', '.join(KINDS)}"
        for key, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not specs:
                return f"manifest key '{key}' is empty; a model needs at least one"
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                return f"manifest key '{key}' names a tensor twice: {names}"
            for spec in specs:
                problem = spec.problem()
                if problem is not None:
                    return f"manifest key '{key}': {problem}"
        seen: dict[str, str] = {}
        for spec in self.inputs:
            bad = [path for path in spec.paths if not check_path(path)]
            if bad:
                return f"manifest key 'inputs': '{spec.name}' reads from {bad}; a path is names joined by dots, like \"user.age\""
            for path in spec.paths:
                if path in seen:
                    return (
                        f"manifest key 'inputs': path '{path}' feeds both '{seen[path]}' and '{spec.name}'; "
                        "map each input from its own paths"
                    )
                seen[path] = spec.name
        if self.labels and self.kind != KIND_CLASSIFIER:
            return f"manifest key 'labels' is for kind classifier, not {self.kind}; leave it empty"
        if self.targets and self.kind != KIND_REGRESSOR:
            return f"manifest key 'targets' is for kind regressor, not {self.kind}; leave it empty"
        return self._kind_problem()

    def _kind_problem(self) -> str | None:
        if self.kind == KIND_OUTPUTS:
            return None
        if len(self.outputs) != 1:
            names = [o.name for o in self.outputs]
            return f"manifest key 'outputs': kind {self.kind} reads one output, not {names}; use kind outputs for several"
        out = self.outputs[0]
        if self.kind == KIND_CLASSIFIER:
            if out.dtype not in FLOAT_DTYPES:
                return f"manifest key 'outputs': classifier scores '{out.name}' are {out.dtype}, not a float type"
            if out.width != len(self.labels) or len(set(self.labels)) != len(self.labels):
                return (
                    f"manifest key 'labels': a classifier needs one distinct label per score column; "
                    f"'{out.name}' has {out.width} columns, labels are {list(self.labels)}"
                )
            return None
        if out.dtype not in NUMERIC_DTYPES:
            return f"manifest key 'outputs': kind {self.kind} needs a numeric output; '{out.name}' is {out.dtype}: use kind outputs"
        if self.kind == KIND_SCORE and out.width != 1:
            return f"manifest key 'outputs': kind score needs width 1; '{out.name}' has {out.width}: use kind embedding or regressor"
        if self.targets and (len(self.targets) != out.width or len(set(self.targets)) != len(self.targets)):
            return (
                f"manifest key 'targets': a regressor names each of its {out.width} values once; "
                f"targets are {list(self.targets)}"
            )
        return None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        """A manifest from its JSON form, checked; :class:`ModelError` names what is wrong."""
        name = data.get("name", "?") if isinstance(data, dict) else "?"
        try:
            unknown = set(data) - _MANIFEST_KEYS
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_MANIFEST_KEYS)}")
            manifest = cls(
                name=data["name"],
                version=int(data["version"]),
                sha256=data["sha256"],
                inputs=tuple(TensorSpec.from_json(i) for i in data["inputs"]),
                outputs=tuple(TensorSpec.from_json(o) for o in data["outputs"]),
                labels=_strings(data.get("labels", []), "labels"),
                created=data["created"],
                description=data.get("description", ""),
                provenance=dict(data.get("provenance", {})),
                metrics=dict(data.get("metrics", {})),
                kind=data.get("kind", KIND_CLASSIFIER),
                targets=_strings(data.get("targets", []), "targets"),
            )
        except KeyError as exc:
            raise ModelError(name, f"manifest is malformed: key {exc} is missing") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelError(name, f"manifest is malformed: {exc}") from exc
        manifest.check()
        return manifest

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "kind": self.kind,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "labels": list(self.labels),
            "targets": list(self.targets),
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

    def resolve(self, name: str, selector: Selector | int = Selector.LATEST) -> int:
        """The version number that ``selector`` (a :class:`Selector` or a pinned number) names."""
        versions = self.versions(name)
        if not versions:
            raise ModelError(name, f"no versions under {self.root / name}")
        if selector == Selector.LATEST:
            return versions[-1]
        if selector == Selector.PROMOTED:
            promoted = self.promoted(name)
            return versions[-1] if promoted is None else promoted
        if selector in versions:
            return selector
        raise ModelError(name, f"version '{selector}' not found; have {versions}, or use {allowed(Selector)}")

    def manifest(self, name: str, version: int) -> Manifest:
        path = self.root / name / str(version) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"{name}:{version}", f"no manifest at {path}") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"{name}:{version}", f"manifest {path} is not JSON ({exc})") from exc
        return Manifest.from_json(data)

    def get(self, name: str, selector: Selector | int = Selector.LATEST) -> ModelVersion:
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

        The sha256 in the stored manifest is computed here from ``model_bytes``; a manifest that
        fails :meth:`Manifest.check` is refused.
        """
        manifest.check()
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
