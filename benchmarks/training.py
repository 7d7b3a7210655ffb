"""Training benchmark: the barrier-mode trainer against the same training in one plain process.

Runs on the driver machine. It tiles the demo data set (models/training/breast_cancer.csv) to
``--rows`` rows in a Parquet file, then

1. trains with ``streamhydro.trainer`` in a fresh SparkSession (``--ranks`` barrier tasks, gloo):
   session start, the whole ``train`` call (read, statistics job, barrier stage, export, publish),
   and from rank 0's report the rendezvous time and the training loop's time and samples/s;
2. runs the same loop (:func:`streamhydro.trainer.rank.loop.train`, DDP over a one-process gloo
   group) on the same rows in this process, without Spark, with ``--single-threads`` torch threads
   (1 by default, like each rank, which gets one per task CPU).

Prints one JSON line. ``launch_overhead_s`` is what Spark adds around the training loop: the
``train`` call's time minus rank 0's loop time (reading, the statistics job, scheduling the barrier
stage, Python workers, imports, rendezvous, export and publishing).

    python benchmarks/training.py --rows 100000 --epochs 3 --batch-size 256
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "models" / "training" / "breast_cancer.toml"
DEMO_DATA = ROOT / "models" / "training" / "breast_cancer.csv"


def tiled_parquet(rows: int, path: Path) -> None:
    with DEMO_DATA.open() as f:
        header, *records = list(csv.reader(f))
    x = np.array([[float(v) for v in r[:-1]] for r in records], dtype=np.float32)
    labels = np.array([r[-1] for r in records])
    reps = -(-rows // len(records))
    noise = np.random.default_rng(0).normal(1.0, 0.01, size=(reps * len(records), x.shape[1])).astype(np.float32)
    tiled_x = (np.tile(x, (reps, 1)) * noise)[:rows]
    columns = {name: tiled_x[:, i] for i, name in enumerate(header[:-1])}
    pq.write_table(pa.table({**columns, header[-1]: np.tile(labels, reps)[:rows]}), path)


def spark_run(config, workdir: Path) -> dict:
    from streamhydro.trainer.launch import build_session, train

    started = time.perf_counter()
    spark = build_session(config)
    session_s = time.perf_counter() - started
    try:
        started = time.perf_counter()
        result = train(spark, config, command="benchmarks/training.py")
        job_s = time.perf_counter() - started
    finally:
        spark.stop()
    report = result.report
    return {
        "session_start_s": round(session_s, 2),
        "train_call_s": round(job_s, 2),
        "rendezvous_s": report["rendezvous_seconds"],
        "train_loop_s": report["train_seconds"],
        "samples_per_s": report["samples_per_second"],
        "launch_overhead_s": round(job_s - report["train_seconds"], 2),
        "validation_accuracy": round(report["validation_accuracy"], 4),
    }


def single_process_run(config, parquet: Path, workdir: Path, threads: int) -> dict:
    import torch
    import torch.distributed as dist

    from streamhydro.trainer.plan import RankPlan
    from streamhydro.trainer.rank.arrays import PartitionArrays
    from streamhydro.trainer.rank.checkpoint import RunDirectory
    from streamhydro.trainer.rank.loop import train
    from streamhydro.trainer.rank.rendezvous import Group

    torch.set_num_threads(threads)
    started = time.perf_counter()
    table = pq.read_table(parquet)
    d = config.data
    x = np.column_stack([table.column(f).to_numpy() for f in d.features]).astype(np.float32)
    y = np.array([d.labels.index(v) for v in table.column(d.label).to_pylist()], dtype=np.int64)
    holdout = np.random.default_rng(config.training.seed).random(len(y)) < d.validation_fraction
    data = PartitionArrays(x[~holdout], y[~holdout], x[holdout], y[holdout])
    t = config.training
    plan = RankPlan(
        run_id="single", features=d.features, labels=d.labels, mean=tuple(x[~holdout].mean(0).tolist()),
        std=tuple(x[~holdout].std(0).tolist()), hidden=config.model.hidden, epochs=t.epochs,
        batch_size=t.batch_size, learning_rate=t.learning_rate, seed=t.seed,
        checkpoint_dir=str(workdir / "single"), timeout_seconds=t.timeout_seconds, tolerance=t.tolerance,
    )
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        _, report = train(plan, data, Group(0, 1, torch.device("cpu"), 0), RunDirectory(workdir / "single"))
    finally:
        dist.destroy_process_group()
    return {
        "total_s": round(time.perf_counter() - started, 2),
        "train_loop_s": report["train_seconds"],
        "samples_per_s": report["samples_per_second"],
        "torch_threads": torch.get_num_threads(),
        "validation_accuracy": round(report["validation_accuracy"], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument(
        "--single-threads", type=int, default=1,
        help="torch threads of the plain process (default 1, as each rank: one per task CPU)",
    )
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    from streamhydro.trainer.config import load

    with tempfile.TemporaryDirectory(prefix="streamhydro-bench-") as tmp:
        workdir = Path(tmp)
        parquet = workdir / "data.parquet"
        tiled_parquet(args.rows, parquet)
        config = load(DEMO_CONFIG, environ={
            "STREAMHYDRO_DATA_FORMAT": "parquet", "STREAMHYDRO_DATA_PATH": str(parquet),
            "STREAMHYDRO_MODEL_REGISTRY": str(workdir / "models"),
            "STREAMHYDRO_TRAINING_CHECKPOINT_DIR": str(workdir / "checkpoints"),
            "STREAMHYDRO_TRAINING_EPOCHS": str(args.epochs), "STREAMHYDRO_TRAINING_BATCH_SIZE": str(args.batch_size),
            "STREAMHYDRO_TRAINING_RANKS": str(args.ranks), "STREAMHYDRO_SPARK_MASTER": args.master,
        })
        spark = spark_run(config, workdir)
        single = single_process_run(config, parquet, workdir, args.single_threads)
    print(json.dumps({
        "benchmark": "training", "rows": args.rows, "epochs": args.epochs, "batch_size_per_rank": args.batch_size,
        "ranks": args.ranks, "master": args.master, "cpus": os.cpu_count(), "spark": spark, "single_process": single,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
