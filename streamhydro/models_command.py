"""``streamhydro models list | show | promote | rollback``: look at and steer the model registry.
Runs on the driver machine, once per command; plain file operations, no Spark."""

from __future__ import annotations

import argparse
import json

from streamhydro.errors import ModelError
from streamhydro.registry import Registry

SHOWN_METRICS = ("validation_accuracy", "validation_loss", "validation_rows")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list, show, promote or roll back model versions in the registry",
        description="Inspect the model registry and choose the version 'promoted' resolves to.",
    )
    parser.add_argument("--registry", default="models", help="registry directory (default: models)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

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
        current = registry.resolve(name, "promoted")
        explicit = registry.promoted(name) is not None
        print(f"{name} (promoted: {current}{'' if explicit else ', the latest: nothing promoted yet'})")
        for version in registry.versions(name):
            manifest = registry.manifest(name, version)
            metrics = " ".join(f"{key}={_format(manifest.metrics[key])}" for key in SHOWN_METRICS if key in manifest.metrics)
            marker = "*" if version == current else " "
            print(f" {marker} {version:>4}  {manifest.created}  {metrics}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    model = Registry(args.registry).get(args.name, args.version)
    model.read_bytes()
    print(json.dumps({**model.manifest.to_json(), "path": str(model.path), "checksum": "ok"}, indent=2))
    return 0


def run_promote(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    registry.get(args.name, str(args.version)).read_bytes()
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


def _format(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
