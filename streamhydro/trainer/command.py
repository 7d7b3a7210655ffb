"""``streamhydro train --config FILE``. Runs on the driver, once; the same entry point serves
``spark-submit`` (see deploy/train/)."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model with PyTorch DDP as one barrier Spark stage and publish it to the registry",
        description=(
            "Read training data with Spark (Parquet, CSV, Hive, JDBC), train an MLP with PyTorch "
            "DistributedDataParallel in a barrier mapInArrow stage (one rank per task, checkpointed "
            "every epoch, resumed on stage retry), export ONNX, check it, publish it. Prints one JSON "
            "line with the published version and its metrics. Needs the 'train' extra (torch)."
        ),
    )
    parser.add_argument("--config", required=True, help="trainer TOML file (see docs/trainer.md)")
    parser.set_defaults(run=run, third_party_log="streamhydro-train.log")


def run(args: argparse.Namespace) -> int:
    from streamhydro.internals import check_versions
    from streamhydro.trainer.config import load
    from streamhydro.trainer.launch import build_session, train

    check_versions()
    config = load(args.config)
    spark = build_session(config)
    try:
        result = train(spark, config, command=f"streamhydro train --config {args.config}")
    finally:
        spark.stop()
    print(json.dumps({"model": result.version.label, "sha256": result.version.digest, **result.version.manifest.metrics,
                      "run_dir": str(result.run_dir)}))
    return 0
