"""Training benchmark: the barrier-mode trainer against the same training in one plain process.

Runs on the driver machine and needs the 'train' extra (torch). Rerun with

    python benchmarks/training.py                  # 100k rows, 3 epochs, 2 ranks x 256 rows per step, 1 round
    python benchmarks/training.py --rounds 3       # what docs/trainer.md reports: medians of 3 rounds

It tiles the demo data set (models/training/breast_cancer.csv) to ``--rows`` rows in a Parquet
file; then each round runs

1. **barrier_trainer**: ``streamhydro.trainer`` as ``streamhydro train`` runs it: a fresh Python
   process (so a fresh JVM), a SparkSession on ``--master``, ``--ranks`` barrier tasks of
   ``--batch-size`` rows per step each, each rank with the torch threads of its task
   (``spark.task.cpus``: 1 unless ``--conf spark.task.cpus=N``);
2. **single_process**: the same training loop (:func:`streamhydro.trainer.rank.loop.train` and the
   same statistics, over a one-process gloo group) in this process, without Spark, on the same
   rows with the same held-out split (the trainer's own prepared DataFrame, collected once), with
   the trainer's global batch (ranks x batch size rows per step) and its total torch threads
   (ranks x threads per rank): the same number of optimizer steps, epochs and samples on the same
   cores. What differs is only how the work is spread: R processes with an allreduce per step,
   or one process with R times the threads.

The last line of the output is one JSON object: ``barrier_trainer`` and ``single_process`` (medians
over the rounds), ``ratio`` (barrier trainer / single process: ``samples_per_s`` of the training
loops, > 1 when the trainer is faster; ``train_loop_s``), and ``rounds`` (every round's numbers).
In ``barrier_trainer``, ``launch_overhead_s`` is the ``train`` call minus rank 0's training loop
(what README.md and docs/trainer.md call Spark launch + rendezvous), split into ``prepare_s``
(driver: start checks, the source's schema, planning), ``stage_spark_s`` (inside the barrier job
but outside rank 0's function: the shuffle into ranks, task launch, Python worker start, returning
the model), rank 0's ``imports_s``, ``load_s``, ``rendezvous_s``, ``statistics_s``, ``setup_s``
(model, optimizer, DDP, evaluation, stopping the rank's metrics endpoint), ``export_s``, and
``publish_s``. ``session_start_s`` (the JVM and SparkContext) and ``driver_imports_s`` come before
the ``train`` call. ``warm`` is a second ``train`` call in the same process and session, as a
driver that trains repeatedly would make it: the JVM is warm and the ranks' Python workers, with
torch imported, are reused.

Every wait is bounded: ``--timeout-s`` is the trainer's ``training.timeout_seconds`` (rendezvous,
collectives, barrier sync) and the single process's store and group timeout; each barrier trainer
round must end within ``--round-timeout-s`` (its process is killed otherwise).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "models" / "training" / "breast_cancer.toml"
DEMO_DATA = ROOT / "models" / "training" / "breast_cancer.csv"
PREPARED = "prepared.parquet"


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


def bench_config(args: argparse.Namespace, workdir: Path):
    from streamhydro.trainer.config import load

    config = load(DEMO_CONFIG, environ={
        "STREAMHYDRO_DATA_FORMAT": "parquet", "STREAMHYDRO_DATA_PATH": str(workdir / "data.parquet"),
        "STREAMHYDRO_MODEL_REGISTRY": str(workdir / "models"),
        "STREAMHYDRO_TRAINING_CHECKPOINT_DIR": str(workdir / "checkpoints"),
        "STREAMHYDRO_TRAINING_EPOCHS": str(args.epochs), "STREAMHYDRO_TRAINING_BATCH_SIZE": str(args.batch_size),
        "STREAMHYDRO_TRAINING_RANKS": str(args.ranks), "STREAMHYDRO_TRAINING_TIMEOUT_SECONDS": str(args.timeout_s),
        "STREAMHYDRO_SPARK_MASTER": args.master,
    })
    extra = dict(item.split("=", 1) for item in args.conf)
    return dataclasses.replace(config, spark=dataclasses.replace(config.spark, conf={**config.spark.conf, **extra}))


def trainer_round(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One barrier trainer run in a fresh Python process (this script with --trainer-round)."""
    command = [sys.executable, __file__, "--trainer-round", str(workdir), *_shared_args(args)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.round_timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise SystemExit(f"a barrier trainer round ran past --round-timeout-s {args.round_timeout_s}") from exc
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"the barrier trainer round failed (exit code {done.returncode}); its stderr is above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _shared_args(args: argparse.Namespace) -> list[str]:
    shared = ["--rows", str(args.rows), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--ranks", str(args.ranks), "--master", args.master, "--timeout-s", str(args.timeout_s)]
    for item in args.conf:
        shared += ["--conf", item]
    return shared


def run_trainer(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Inside the --trainer-round process: session, ``train`` twice (the second in the warm session),
    and (once) the prepared rows for the single process."""
    started = time.perf_counter()
    from streamhydro.trainer import data
    from streamhydro.trainer.launch import build_session, train

    driver_imports_s = time.perf_counter() - started
    config = bench_config(args, workdir)
    started = time.perf_counter()
    spark = build_session(config)
    session_s = time.perf_counter() - started
    try:
        calls = []
        for _ in range(2):
            started = time.perf_counter()
            result = train(spark, config, command="benchmarks/training.py")
            calls.append((time.perf_counter() - started, result))
        if not (workdir / PREPARED).exists():
            prepared = data.prepare(data.read(spark, config.data), config.data, config.training.seed)
            pq.write_table(prepared.toArrow(), workdir / PREPARED)
    finally:
        spark.stop()
    cold, warm = (split(args, call_s, result) for call_s, result in calls)
    return {
        "driver_imports_s": round(driver_imports_s, 2), "session_start_s": round(session_s, 2), **cold,
        "warm": {key: warm[key] for key in WARM_KEYS},
    }


# What the benchmark reports of the second ``train`` call in the same session (JVM warm, Python workers reused).
WARM_KEYS = ("train_call_s", "launch_overhead_s", "prepare_s", "stage_spark_s", "imports_s", "setup_s", "train_loop_s")


def split(args: argparse.Namespace, call_s: float, result: Any) -> dict[str, Any]:
    """Where one ``train`` call's time went, from the driver's timings and rank 0's report."""
    r, t = result.report, result.timings
    rank0 = r["imports_seconds"] + r["load_seconds"] + r["rendezvous_seconds"] + r["statistics_seconds"] + r["rank_seconds"] + r["export_seconds"]
    return {
        "train_call_s": round(call_s, 2),
        "launch_overhead_s": round(call_s - r["train_seconds"], 2),
        "prepare_s": round(t["prepare_seconds"], 2),
        "stage_spark_s": round(t["stage_seconds"] - rank0, 2),
        "imports_s": round(r["imports_seconds"], 2),
        "load_s": round(r["load_seconds"], 2),
        "rendezvous_s": round(r["rendezvous_seconds"], 2),
        "statistics_s": round(r["statistics_seconds"], 3),
        "setup_s": round(r["rank_seconds"] - r["train_seconds"], 2),
        "train_loop_s": round(r["train_seconds"], 3),
        "export_s": round(r["export_seconds"], 2),
        "publish_s": round(t["publish_seconds"], 3),
        "samples_per_s": r["samples_per_second"],
        "steps_per_epoch": r["steps_per_epoch"],
        "global_batch": args.ranks * args.batch_size,
        "torch_threads": args.ranks * r["torch_threads"],
        "validation_accuracy": round(r["validation_accuracy"], 4),
    }


def single_process_round(args: argparse.Namespace, workdir: Path, threads: int, round_: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from streamhydro.trainer.plan import RankPlan
    from streamhydro.trainer.rank import statistics as rank_statistics
    from streamhydro.trainer.rank.arrays import partition_arrays
    from streamhydro.trainer.rank.checkpoint import RunDirectory
    from streamhydro.trainer.rank.loop import train
    from streamhydro.trainer.rank.rendezvous import Group

    config = bench_config(args, workdir)
    d, t = config.data, config.training
    torch.set_num_threads(threads)
    arrays = partition_arrays(pq.read_table(workdir / PREPARED).to_batches(), len(d.features))
    plan = RankPlan(
        run_id=f"single-{round_}", features=d.features, label=d.label, labels=d.labels, hidden=config.model.hidden,
        epochs=t.epochs, batch_size=args.ranks * args.batch_size, learning_rate=t.learning_rate, seed=t.seed,
        checkpoint_dir=str(workdir / "single"), timeout_seconds=args.timeout_s, tolerance=t.tolerance,
    )
    timeout = datetime.timedelta(seconds=args.timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timeout)
    try:
        group = Group(0, 1, torch.device("cpu"), 0)
        stats = rank_statistics.gather(arrays, group)
        _, report = train(plan, arrays, stats, group, RunDirectory(Path(plan.checkpoint_dir) / plan.run_id))
    finally:
        dist.destroy_process_group()
    return {
        "train_loop_s": round(report["train_seconds"], 3),
        "samples_per_s": report["samples_per_second"],
        "steps_per_epoch": report["steps_per_epoch"],
        "global_batch": plan.batch_size,
        "torch_threads": torch.get_num_threads(),
        "validation_accuracy": round(report["validation_accuracy"], 4),
    }


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        key: medians([row[key] for row in rows]) if isinstance(value, dict) else round(statistics.median(row[key] for row in rows), 3)
        for key, value in rows[0].items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="rows per step on each rank")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark conf for the trainer")
    parser.add_argument("--timeout-s", type=int, default=120, help="training.timeout_seconds, and the single process's")
    parser.add_argument("--round-timeout-s", type=int, default=600, help="longest a barrier trainer round may take")
    parser.add_argument("--trainer-round", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    if args.trainer_round:
        print(json.dumps(run_trainer(args, args.trainer_round)))
        return 0
    rounds = []
    with tempfile.TemporaryDirectory(prefix="streamhydro-bench-") as tmp:
        workdir = Path(tmp)
        tiled_parquet(args.rows, workdir / "data.parquet")
        for i in range(args.rounds):
            trainer = trainer_round(args, workdir)
            single = single_process_round(args, workdir, trainer["torch_threads"], i)
            rounds.append({"barrier_trainer": trainer, "single_process": single})
    trainer = medians([r["barrier_trainer"] for r in rounds])
    single = medians([r["single_process"] for r in rounds])
    print(json.dumps({
        "benchmark": "training", "rows": args.rows, "epochs": args.epochs, "ranks": args.ranks,
        "batch_size_per_rank": args.batch_size, "master": args.master, "conf": args.conf, "cpus": os.cpu_count(),
        "barrier_trainer": trainer, "single_process": single,
        "ratio": {
            "samples_per_s": round(trainer["samples_per_s"] / single["samples_per_s"], 3),
            "train_loop_s": round(trainer["train_loop_s"] / single["train_loop_s"], 3),
        },
        "rounds": rounds,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
