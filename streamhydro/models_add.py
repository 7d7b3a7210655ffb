"""Adding an ONNX model to the registry: read its graph, decide its kind, labels and input mapping,
rewrite what serving does not take, check it, publish it.

Runs on the driver machine: once per ``streamhydro models add`` and once per training run (the
trainer publishes through :func:`add_model` too). Pure: onnx and ONNX Runtime on the CPU, files; no
Spark.

What is read from the graph (``onnx``):

* every graph input, in graph order, with its element type and shape: the batch axis must be
  dynamic, every other dimension static; dtypes are ``streamhydro.registry.DTYPES``;
* ZipMap: a graph output made by an ``ai.onnx.ml`` ZipMap node (a sequence of maps, as skl2onnx
  classifiers write by default) is replaced by the ZipMap's input, a float tensor [N, k], and the
  node is removed; the labels come from its ``classlabels_strings`` / ``classlabels_int64s``;
* classifier nodes (``ai.onnx.ml`` LinearClassifier, TreeEnsembleClassifier, SVMClassifier): their
  ``classlabels_*`` are the labels when there is no ZipMap, and a graph output that is the node's
  label output (directly or through Identity/Cast/Reshape/Squeeze/Flatten) is left out of the
  manifest: a prediction's label is the argmax of its scores;
* metadata props: ``streamhydro.labels`` (a JSON list of labels) and ``streamhydro.features.<input>``
  (a JSON list of dotted paths for that input).

Kind: ``kind`` when given; else a classifier when labels are known (ZipMap, a classifier node,
``labels``, the metadata prop), a regressor when the one output is a float of width 1, ``outputs``
when there are several outputs. Anything else is refused, naming ``--kind``.

Input mapping, later sources winning: an input of width 1 reads ``features = [<input name>]``, a
wider one ``field = <input name>``; then the metadata props; then ``mapping`` (``{input: {"features":
[...]} | {"field": "..."}}``, the ``[inputs]`` table of a mapping file, with command-line flags
merged in by the caller).

Provenance gains ``original_sha256`` (of the bytes given), ``rewrites`` (what was changed, in words)
and ``converter`` (the ONNX file's producer name and version). The stored model is the rewritten
graph, checked with ``onnx.checker`` and, with its manifest, loaded and run on zeros by ONNX
Runtime (:func:`streamhydro.executor.sessions.validate_model`) before it is published.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
from onnx import TensorProto, helper

from streamhydro.errors import ConfigError, ModelError
from streamhydro.executor.sessions import onnxruntime, validate_model, zero_rows
from streamhydro.registry import (
    FLOAT_DTYPES,
    KIND_CLASSIFIER,
    KIND_OUTPUTS,
    KIND_REGRESSOR,
    KINDS,
    Manifest,
    ModelVersion,
    Registry,
    TensorSpec,
    check_path,
    sha256_bytes,
)

ONNX_DTYPES = {
    TensorProto.FLOAT16: "float16",
    TensorProto.FLOAT: "float32",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.BOOL: "bool",
    TensorProto.STRING: "string",
}
ML_DOMAIN = "ai.onnx.ml"
CLASSIFIER_OPS = ("LinearClassifier", "TreeEnsembleClassifier", "SVMClassifier")
# Ops a classifier's label output may pass through on its way to a graph output.
PASS_THROUGH_OPS = ("Identity", "Cast", "Reshape", "Squeeze", "Flatten")
LABELS_PROP = "streamhydro.labels"
FEATURES_PROP = "streamhydro.features."
MAPPING_KEYS = ("features", "field")
BATCH_DIM = "N"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a registry directory name: no path separators, no dot files


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A graph input or output as read from the graph: static dims as ints, dynamic ones as None."""

    name: str
    dtype: str
    dims: tuple[int | None, ...]

    def spec(self) -> TensorSpec:
        """The manifest's spec of this tensor (every dimension after the batch axis known by now)."""
        return TensorSpec(self.name, self.dtype, (-1, *(d for d in self.dims[1:] if d is not None)))


def add_model(
    registry: Registry,
    onnx_bytes: bytes,
    name: str,
    *,
    kind: str | None = None,
    labels: Sequence[str] = (),
    targets: Sequence[str] = (),
    mapping: Mapping[str, Mapping[str, Any]] | None = None,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    promote: bool = False,
) -> ModelVersion:
    """Publish ``onnx_bytes`` as the next version of model ``name``; return the new version.

    Raises :class:`ConfigError` for an argument that cannot apply to this model (naming the
    argument, or the mapping key, and the fix) and :class:`ModelError` for a graph that cannot be
    served as it is. Nothing is written unless every check passes.
    """
    if not NAME.fullmatch(name):
        raise ConfigError("--name", f"'{name}' is not a model name", "use letters, digits, '.', '_' and '-', starting with a letter or digit")
    if kind is not None and kind not in KINDS:
        raise ConfigError("--kind", f"'{kind}' is not a model kind", f"use one of {', '.join(KINDS)}")
    model = _parse(onnx_bytes, name)
    props = {prop.key: prop.value for prop in model.metadata_props}
    rewrites: list[str] = []
    zipmap_labels = _remove_zipmap(model, name, rewrites)
    classifier_labels, label_outputs = _classifier_nodes(model)
    found_labels = zipmap_labels or classifier_labels or _prop_list(props, LABELS_PROP, name)
    data = onnx_bytes
    if rewrites:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise ModelError(
                name, f"the graph fails onnx.checker after {rewrites} ({exc}); convert the model with the zipmap option off"
            ) from exc
        data = model.SerializeToString()

    inputs = [_tensor(value, "input", name) for value in _graph_inputs(model)]
    outputs = _resolve_output_dims(data, name, inputs, [_tensor(value, "output", name) for value in model.graph.output])
    kind = kind or _detect_kind(name, found_labels or tuple(labels), [o for o in outputs if o.name not in label_outputs])
    chosen = outputs if kind == KIND_OUTPUTS else [o for o in outputs if o.name not in label_outputs]
    labels, targets = _labels_and_targets(name, kind, chosen, tuple(labels), found_labels, tuple(targets))
    specs = _mapped_inputs(name, inputs, props, mapping or {})
    manifest = Manifest(
        name=name,
        version=0,
        sha256=sha256_bytes(data),
        inputs=tuple(specs),
        outputs=tuple(o.spec() for o in chosen),
        labels=labels,
        targets=targets,
        kind=kind,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        description=description,
        provenance={
            **(provenance or {}),
            "original_sha256": sha256_bytes(onnx_bytes),
            "rewrites": rewrites,
            "converter": {"name": model.producer_name, "version": model.producer_version},
        },
        metrics=dict(metrics or {}),
    )
    manifest.check()
    validate_model(manifest, data)
    version = registry.publish(manifest, data)
    if promote:
        registry.promote(name, version.manifest.version)
    return version


def input_lines(manifest: Manifest) -> list[str]:
    """One line per input for people: name, dtype, shape <- the paths it reads."""
    width = max(len(spec.name) for spec in manifest.inputs)
    lines = []
    for spec in manifest.inputs:
        source = ", ".join(spec.features) if spec.features else f"field {spec.field} (a list of {spec.width})"
        lines.append(f"{spec.name:<{width}}  {spec.dtype:<7}  {list(spec.shape)}  <- {source}")
    return lines


def prediction_schema(manifest: Manifest) -> str:
    """The JSON shape of this model's ``"prediction"``, value types in place of values."""
    from streamhydro.payload.predictions import prediction_for

    return prediction_for(manifest).schema()


def describe(manifest: Manifest) -> list[str]:
    """Lines for people: the input mapping, then the prediction's JSON shape."""
    return ["inputs:", *(f"  {line}" for line in input_lines(manifest)), f"prediction ({manifest.kind}): {prediction_schema(manifest)}"]


def _parse(onnx_bytes: bytes, name: str) -> onnx.ModelProto:
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as exc:  # noqa: BLE001 -- protobuf raises its own DecodeError and friends
        raise ModelError(name, f"the file is not an ONNX model ({exc}); export or convert the model to ONNX first") from exc
    if not model.graph.node:
        raise ModelError(name, "the file holds no ONNX graph; export or convert the model to ONNX first")
    return model


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are fed at run time (older IR versions also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _tensor(value: onnx.ValueInfoProto, role: str, model: str) -> _Tensor:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise ModelError(
            model,
            f"{role} '{value.name}' is a {kind or 'untyped value'}, not a tensor; re-export the model so that "
            f"every {role} is a tensor (for a classifier's map output: the converter's zipmap option off)",
        )
    tensor = value.type.tensor_type
    dtype = ONNX_DTYPES.get(tensor.elem_type)
    if dtype is None:
        type_name = TensorProto.DataType.Name(tensor.elem_type)
        raise ModelError(
            model, f"{role} '{value.name}' has element type {type_name}; supported: {', '.join(ONNX_DTYPES.values())} "
            "(add a Cast to the graph)",
        )
    if not tensor.HasField("shape") or not tensor.shape.dim:
        raise ModelError(
            model, f"{role} '{value.name}' has no shape (or rank 0); export it with a batch axis first, like [N, width]"
        )
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    if dims[0] is not None:
        raise ModelError(
            model,
            f"{role} '{value.name}' has a fixed batch size {dims[0]} (shape {list(dims)}); re-export with a dynamic "
            "first axis (torch: dynamic_axes={name: {0: 'batch'}}; skl2onnx/onnxmltools: initial_types [None, ...])",
        )
    if role == "input" and any(d is None for d in dims[1:]):
        raise ModelError(
            model,
            f"input '{value.name}' has a dynamic dimension after the batch axis (shape {_shown(dims)}); serving needs "
            "every other dimension static: re-export with fixed sizes",
        )
    return _Tensor(value.name, dtype, dims)


def _shown(dims: tuple[int | None, ...]) -> list[int | str]:
    return ["?" if d is None else d for d in dims]


def _remove_zipmap(model: onnx.ModelProto, name: str, rewrites: list[str]) -> tuple[str, ...]:
    """Replace a ZipMap output by the ZipMap's float input; return the ZipMap's labels (() without one)."""
    graph = model.graph
    zipmaps = [node for node in graph.node if node.op_type == "ZipMap" and node.domain == ML_DOMAIN]
    if not zipmaps:
        return ()
    if len(zipmaps) > 1:
        raise ModelError(name, f"the graph has {len(zipmaps)} ZipMap nodes; convert it with the zipmap option off")
    node = zipmaps[0]
    made, source = node.output[0], node.input[0]
    outputs = [value.name for value in graph.output]
    if made not in outputs or any(made in other.input for other in graph.node):
        raise ModelError(
            name, f"ZipMap output '{made}' is not just a graph output (other nodes read it); convert the model with the zipmap option off"
        )
    labels = _class_labels(node)
    if not labels:
        raise ModelError(name, f"ZipMap '{node.name or made}' has no class labels; convert it with the zipmap option off")
    graph.node.remove(node)
    position = outputs.index(made)
    graph.output.remove(graph.output[position])
    for value in [v for v in graph.value_info if v.name == made]:
        graph.value_info.remove(value)
    if source not in outputs:
        graph.output.insert(position, helper.make_tensor_value_info(source, TensorProto.FLOAT, [BATCH_DIM, len(labels)]))
    rewrites.append(
        f"ZipMap removed: output '{made}' (a sequence of maps) replaced by its input '{source}' "
        f"(float [N, {len(labels)}], labels {list(labels)})"
    )
    return labels


def _classifier_nodes(model: onnx.ModelProto) -> tuple[tuple[str, ...], set[str]]:
    """Labels of the graph's one classifier node (() when none or several), and the graph outputs that are label outputs."""
    graph = model.graph
    classifiers = [node for node in graph.node if node.op_type in CLASSIFIER_OPS and node.domain == ML_DOMAIN]
    labels = _class_labels(classifiers[0]) if len(classifiers) == 1 else ()
    label_tensors = {node.output[0] for node in classifiers}
    producers = {output: node for node in graph.node for output in node.output}
    label_outputs = set()
    for value in graph.output:
        tensor, seen = value.name, set()
        while tensor not in seen and tensor in producers and producers[tensor].op_type in PASS_THROUGH_OPS:
            seen.add(tensor)
            tensor = producers[tensor].input[0]
        if tensor in label_tensors:
            label_outputs.add(value.name)
    return labels, label_outputs


def _class_labels(node: onnx.NodeProto) -> tuple[str, ...]:
    """A ZipMap's or classifier node's class labels, as strings (int64 labels in decimal)."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    strings = attributes.get("classlabels_strings", ())
    return tuple(label.decode("utf-8") for label in strings) or tuple(str(label) for label in attributes.get("classlabels_int64s", ()))


def _prop_list(props: Mapping[str, str], key: str, model: str) -> tuple[str, ...]:
    if key not in props:
        return ()
    try:
        value = json.loads(props[key])
    except json.JSONDecodeError as exc:
        raise ModelError(model, f"metadata prop '{key}' is not JSON ({exc}); set it to a JSON list of strings") from exc
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ModelError(model, f"metadata prop '{key}' is {props[key]!r}; set it to a non-empty JSON list of strings")
    return tuple(value)


def _resolve_output_dims(data: bytes, name: str, inputs: list[_Tensor], outputs: list[_Tensor]) -> list[_Tensor]:
    """Outputs with every dimension after the batch axis known: dynamic ones read from a run on zero rows."""
    if all(None not in o.dims[1:] for o in outputs):
        return outputs
    ort = onnxruntime()
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        feeds = {t.name: zero_rows(t.spec(), 2) for t in inputs}
        got = dict(zip([o.name for o in outputs], session.run([o.name for o in outputs], feeds)))
    except Exception as exc:  # noqa: BLE001 -- ORT raises its own untyped errors for a bad model
        raise ModelError(
            name, f"an output has dynamic dimensions and a run on zeros to size them failed ({exc}); export static output sizes"
        ) from exc
    resolved = []
    for o in outputs:
        shape = got[o.name].shape
        if len(shape) != len(o.dims):
            raise ModelError(
                name, f"output '{o.name}' has rank {len(shape)} in a run but {len(o.dims)} in the graph; export static output shapes"
            )
        resolved.append(dataclasses.replace(o, dims=(None, *shape[1:])))
    return resolved


def _detect_kind(name: str, labels: tuple[str, ...], outputs: list[_Tensor]) -> str:
    if labels:
        return KIND_CLASSIFIER
    if not outputs:
        raise ModelError(name, "the graph has no output but a classifier's label; pass --kind outputs to serve it")
    if len(outputs) > 1:
        return KIND_OUTPUTS
    only = outputs[0]
    if only.dtype in FLOAT_DTYPES and _width(only) == 1:
        return KIND_REGRESSOR
    raise ModelError(
        name,
        f"cannot tell what output '{only.name}' ({only.dtype}, shape {_shown(only.dims)}) holds; pass "
        "--kind embedding | regressor | score | outputs, or --kind classifier with --labels a,b,...",
    )


def _width(tensor: _Tensor) -> int:
    width = 1
    for dim in tensor.dims[1:]:
        width *= dim or 1
    return width


def _labels_and_targets(
    name: str, kind: str, outputs: list[_Tensor], given: tuple[str, ...], found: tuple[str, ...], targets: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The manifest's labels and targets: ``given`` labels (the caller's) win over those ``found`` in the graph."""
    if kind != KIND_OUTPUTS and len(outputs) != 1:
        raise ModelError(
            name, f"kind {kind} reads one output; the model has {[o.name for o in outputs]}: use --kind outputs"
        )
    if targets and kind != KIND_REGRESSOR:
        raise ConfigError("--targets", f"targets name a regressor's values, and this model is a {kind}", "drop --targets")
    if targets and len(targets) != _width(outputs[0]):
        raise ConfigError(
            "--targets",
            f"{len(targets)} targets {list(targets)} for the {_width(outputs[0])} values of '{outputs[0].name}'",
            f"give exactly {_width(outputs[0])} names, in column order, or none",
        )
    if kind != KIND_CLASSIFIER:
        if given:
            raise ConfigError("--labels", f"labels name a classifier's score columns, and this model is a {kind}", "drop --labels")
        return (), targets
    labels = given or found
    scores = outputs[0]
    if not labels:
        raise ConfigError(
            "--labels",
            f"a classifier needs one label per score column, and nothing in the graph names the {_width(scores)} "
            f"columns of '{scores.name}'",
            f"pass --labels with {_width(scores)} names, or set the metadata prop {LABELS_PROP} to a JSON list",
        )
    if len(labels) != _width(scores):
        raise ConfigError(
            "--labels",
            f"{len(labels)} labels {list(labels)} for the {_width(scores)} score columns of '{scores.name}'",
            f"give exactly {_width(scores)} labels, in column order",
        )
    return labels, ()


def _mapped_inputs(
    name: str, inputs: list[_Tensor], props: Mapping[str, str], mapping: Mapping[str, Mapping[str, Any]]
) -> list[TensorSpec]:
    by_name = {t.name: t for t in inputs}
    for key in props:
        if key.startswith(FEATURES_PROP) and key[len(FEATURES_PROP):] not in by_name:
            raise ModelError(name, f"metadata prop '{key}' names no input of the model (inputs: {sorted(by_name)})")
    for input_name in mapping:
        if input_name not in by_name:
            raise ConfigError(
                f"inputs.{input_name}", f"the model has no input '{input_name}'", f"map one of its inputs: {', '.join(by_name)}"
            )
    specs: list[TensorSpec] = []
    fed_by: dict[str, str] = {}
    for tensor in inputs:
        spec = tensor.spec()
        if spec.width == 1:
            spec = dataclasses.replace(spec, features=(tensor.name,), field="")
        features = _prop_list(props, FEATURES_PROP + tensor.name, name)
        if features:
            spec = _with_features(spec, features, f"metadata prop '{FEATURES_PROP}{tensor.name}'")
        if tensor.name in mapping:
            spec = _overridden(spec, mapping[tensor.name])
        for path in spec.paths:
            if path in fed_by:
                raise ConfigError(
                    f"inputs.{tensor.name}",
                    f"path '{path}' already feeds input '{fed_by[path]}'",
                    "map each input from its own paths",
                )
            fed_by[path] = tensor.name
        specs.append(spec)
    return specs


def _overridden(spec: TensorSpec, entry: Mapping[str, Any]) -> TensorSpec:
    key = f"inputs.{spec.name}"
    if not isinstance(entry, Mapping) or len(entry) != 1 or next(iter(entry)) not in MAPPING_KEYS:
        raise ConfigError(
            key, f"{entry!r} is not a mapping", 'give exactly one of features = ["a.b", ...] or field = "a.b"'
        )
    if "field" in entry:
        field = entry["field"]
        if not check_path(field):
            raise ConfigError(f"{key}.field", f"{field!r} is not a dotted path", 'write names joined by dots, like "doc.vector"')
        return dataclasses.replace(spec, features=(), field=field)
    return _with_features(spec, entry["features"], f"{key}.features")


def _with_features(spec: TensorSpec, features: Any, key: str) -> TensorSpec:
    if isinstance(features, str) or not isinstance(features, Sequence) or not all(check_path(f) for f in features):
        raise ConfigError(key, f"{features!r} is not a list of dotted paths", 'write a list like ["user.age", "tx.amount"]')
    if len(features) != spec.width:
        raise ConfigError(
            key,
            f"{len(features)} paths for input '{spec.name}' of width {spec.width} (shape {list(spec.shape)})",
            f"list exactly {spec.width} paths, one per column in column order, or map a list-valued field instead",
        )
    if len(set(features)) != len(features):
        raise ConfigError(key, f"a path appears twice in {list(features)}", "list each path once")
    return dataclasses.replace(spec, features=tuple(features), field="")
