"""``streamhydro models add | list | show | promote | rollback``: fill, look at and steer the model registry.
Runs on the driver machine, once per command; file operations and (``add``) onnx/ONNX Runtime on the
CPU, no Spark. ``add`` is :func:`streamhydro.models_add.add_model` behind flags."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from streamhydro.errors import ConfigError, ModelError
from streamhydro.registry import KINDS, Registry, Selector, parse_version

SHOWN_METRICS = ("validation_accuracy", "validation_loss", "validation_rows")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="add, list, show, promote or roll back model versions in the registry",
        description="Add ONNX models to the registry, inspect it and choose the version 'promoted' resolves to.",
    )
    parser.add_argument("--registry", default="models", help="registry directory (default: models)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = actions.add_parser(
        "add",
        help="add an ONNX model (from any converter) as the next version of a model",
        description="Read the ONNX graph, decide the model kind, labels and input mapping, rewrite a ZipMap output "
        "into a score tensor, check the model on ONNX Runtime and publish it. Prints the version, the input "
        "mapping and the prediction's JSON shape.",
    )
    add.add_argument("model", type=Path, metavar="MODEL.onnx")
    add.add_argument("--name", required=True, help="model name in the registry")
    add.add_argument("--kind", choices=KINDS, help="what the prediction is (default: detected from the graph)")
    add.add_argument("--labels", help="classifier: comma-separated class labels, one per score column")
    add.add_argument("--targets", help="regressor with several values: comma-separated names, one per value")
    add.add_argument("--mapping", type=Path, metavar="FILE.toml", help="input mapping: [inputs.NAME] features = [...] or field = '...'")
    add.add_argument("--feature", action="append", default=[], metavar="INPUT=PATH1,PATH2",
                     help="read INPUT's columns from these dotted paths, in order (repeatable)")
    add.add_argument("--field", action="append", default=[], metavar="INPUT=PATH",
                     help="read INPUT from one dotted path holding a list of its values (repeatable)")
    add.add_argument("--description", default="", help="free text stored in the manifest")
    add.add_argument("--promote", action="store_true", help="promote the new version")
    add.set_defaults(run=run_add)

    listing = actions.add_parser("list", help="every model's versions with their metrics; * marks the promoted one")
    listing.add_argument("name", nargs="?", help="only this model")
    listing.set_defaults(run=run_list)

    show = actions.add_parser("show", help="a version's manifest, with its checksum verified")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default="promoted", help="latest | promoted | a number (default: promoted)")
    show.set_defaults(run=run_show)

    promote = actions.add_parser("promote", help="make a version the one 'promoted' resolves to")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.set_defaults(run=run_promote)

    rollback = actions.add_parser("rollback", help="undo the last promotion")
    rollback.add_argument("name")
    rollback.set_defaults(run=run_rollback)


def run_list(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    names = [args.name] if args.name else registry.models()
    if not names:
        print(f"no models in {registry.root}")
        return 0
    for name in names:
        current = registry.resolve(name, Selector.PROMOTED)
        explicit = registry.promoted(name) is not None
        print(f"{name} (promoted: {current}{'' if explicit else ', the latest: nothing promoted yet'})")
        for version in registry.versions(name):
            manifest = registry.manifest(name, version)
            metrics = " ".join(f"{key}={_format(manifest.metrics[key])}" for key in SHOWN_METRICS if key in manifest.metrics)
            marker = "*" if version == current else " "
            print(f" {marker} {version:>4}  {manifest.created}  {metrics}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from streamhydro.models_add import add_model, describe

    try:
        data = args.model.read_bytes()
    except OSError as exc:
        raise ConfigError("MODEL.onnx", f"cannot read {args.model} ({exc.strerror})", "give the path of an ONNX file") from exc
    version = add_model(
        Registry(args.registry),
        data,
        args.name,
        kind=args.kind,
        labels=_names(args.labels),
        targets=_names(args.targets),
        mapping=input_mapping(args.mapping, args.feature, args.field),
        description=args.description,
        provenance={"file": str(args.model)},
        promote=args.promote,
    )
    promoted = ", promoted" if args.promote else ""
    print(f"added {version.label} (kind {version.manifest.kind}, sha256 {version.digest[:12]}{promoted})")
    print("\n".join(describe(version.manifest)))
    return 0


def input_mapping(path: Path | None, features: list[str], fields: list[str]) -> dict[str, dict[str, Any]]:
    """The ``[inputs]`` table of a mapping file with ``--feature``/``--field`` flags over it (a flag wins per input)."""
    mapping: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("--mapping", f"cannot read {path} as TOML ({exc})", "give a TOML file with [inputs.NAME] tables") from exc
        unknown = sorted(set(document) - {"inputs"})
        if unknown or not isinstance(document.get("inputs", {}), dict):
            raise ConfigError(
                "--mapping", f"{path} has {unknown or ['inputs']} where only [inputs.NAME] tables belong",
                'write [inputs.NAME] tables with features = [...] or field = "..."',
            )
        mapping.update(document.get("inputs", {}))
    flagged: set[str] = set()
    for flag, key, values in (("--feature", "features", features), ("--field", "field", fields)):
        for value in values:
            name, sep, paths = value.partition("=")
            if not sep or not name or not paths:
                raise ConfigError(flag, f"'{value}' is not INPUT=PATH", f"write {flag} INPUT=user.age" + (",tx.amount" if key == "features" else ""))
            if name in flagged:
                raise ConfigError(flag, f"input '{name}' is mapped twice on the command line", "give one --feature or --field per input")
            flagged.add(name)
            mapping[name] = {key: _names(paths) if key == "features" else paths.strip()}
    return mapping


def run_show(args: argparse.Namespace) -> int:
    from streamhydro.models_add import input_lines, prediction_schema

    model = Registry(args.registry).get(args.name, parse_version(args.version, "version"))
    model.read_bytes()
    shown = {**model.manifest.to_json(), "path": str(model.path), "checksum": "ok"}
    shown.update(input_mapping=input_lines(model.manifest), prediction_schema=prediction_schema(model.manifest))
    print(json.dumps(shown, indent=2))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    registry.get(args.name, args.version).read_bytes()
    registry.promote(args.name, args.version)
    print(f"promoted {args.name}:{args.version}")
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    current = registry.promoted(args.name)
    if current is None:
        raise ModelError(args.name, "nothing was promoted, so there is nothing to roll back")
    version = registry.rollback(args.name)
    print(f"rolled back {args.name}: promoted {current} -> {version}")
    return 0


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",")) if text else ()


def _format(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
