"""A Spark standalone cluster on loopback, from the pyspark package: one master, N workers, optional GPUs.

Runs on one machine, for the length of a test session or of ``deploy/standalone/demo.sh``:

    python deploy/standalone/cluster.py [--workers 2 --cores 2 --memory 2g --gpus 0,1] -- COMMAND ...

starts the cluster, runs COMMAND with ``SPARK_MASTER_URL`` (and ``SPARK_HOME``) set, stops every
process it started, and exits with COMMAND's status. The tests import :class:`StandaloneCluster`.

The master and workers are Spark's own daemons (``org.apache.spark.deploy.master.Master``,
``...worker.Worker``) started with ``bin/spark-class`` from the pyspark package, which is a
complete SPARK_HOME. Each runs in its own process group, so :meth:`StandaloneCluster.stop` ends it
with everything it started (executors, drivers in cluster deploy mode, their Python workers).
GPUs, when asked for, come from a discovery script written into the work directory that prints
the given addresses: real ones on a GPU host (``deploy/gpu/get_gpus_resources.sh`` instead), fake
ones where there are none.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StandaloneCluster:
    """Master + workers on 127.0.0.1. Use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        workdir: Path,
        workers: int = 2,
        cores: int = 2,
        memory: str = "2g",
        gpus: Sequence[str] = (),
        discovery_script: str = "",
    ) -> None:
        self.workdir = Path(workdir)
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.gpus = tuple(gpus)
        self.discovery_script = discovery_script
        self.port = free_port()
        self.ui_port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self._processes: list[tuple[subprocess.Popen, Path]] = []

    @property
    def env(self) -> dict[str, str]:
        """Environment for the daemons and for clients of the cluster (spark-submit, drivers)."""
        return {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_MASTER_URL": self.url}

    def start(self) -> StandaloneCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn("master", [MASTER_CLASS, "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.ui_port)], {})
            self._wait(lambda state: state.get("status") == "ALIVE", "the master to come up")
            gpu_opts = self._gpu_options()
            for n in range(self.workers):
                args = [WORKER_CLASS, "--host", "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory,
                        "--work-dir", str(self.workdir / f"worker-{n}"), "--webui-port", "0", self.url]
                self._spawn(f"worker-{n}", args, {"SPARK_WORKER_OPTS": gpu_opts})
            self._wait(lambda state: state.get("aliveworkers") == self.workers, f"{self.workers} workers to register")
        except BaseException:
            self.stop()
            raise
        return self

    def state(self) -> dict:
        """The master's JSON status: workers, running and completed applications and drivers."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=5) as response:
            return json.loads(response.read())

    def kill_driver(self, driver_id: str) -> None:
        """Kill a cluster-deploy-mode driver the way the master's web UI does (``spark-submit --kill`` needs
        the master's REST server, which is off by default)."""
        body = urllib.parse.urlencode({"id": driver_id, "terminate": "true"}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/driver/kill/", data=body, timeout=10):
            pass

    def stop(self) -> None:
        """End every daemon's process group (workers first), waiting for each; idempotent."""
        for process, _ in reversed(self._processes):
            _kill_group(process)
        self._processes.clear()

    def executor_logs(self) -> dict[str, str]:
        """``{"<app>/<executor id>": stderr}`` of every executor the workers ran."""
        return {f"{p.parent.parent.name}/{p.parent.name}": p.read_text(errors="replace")
                for p in sorted(self.workdir.glob("worker-*/app-*/*/stderr"))}

    def driver_logs(self) -> dict[str, str]:
        """``{"<driver id>": stdout + stderr}`` of drivers run in cluster deploy mode."""
        return {d.name: (d / "stdout").read_text(errors="replace") + (d / "stderr").read_text(errors="replace")
                for d in sorted(self.workdir.glob("worker-*/driver-*"))}

    def logs(self, tail: int = 4000) -> str:
        """The end of every daemon's, driver's and executor's log, for a failure report."""
        parts = [f"--- {path.name} ---\n{path.read_text(errors='replace')[-tail:]}" for _, path in self._processes]
        parts += [f"--- driver {name} ---\n{text[-tail:]}" for name, text in self.driver_logs().items()]
        parts += [f"--- executor {name} ---\n{text[-tail:]}" for name, text in self.executor_logs().items()]
        return "\n".join(parts)

    def __enter__(self) -> StandaloneCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _gpu_options(self) -> str:
        if not self.gpus and not self.discovery_script:
            return ""
        script = self.discovery_script
        if not script:
            fake = self.workdir / "gpus.sh"
            fake.write_text(f"#!/usr/bin/env bash\necho '{json.dumps({'name': 'gpu', 'addresses': list(self.gpus)})}'\n")
            fake.chmod(0o755)
            script = str(fake)
        found = subprocess.run([script], capture_output=True, text=True, check=True).stdout
        amount = len(self.gpus) or len(json.loads(found)["addresses"])
        return f"-Dspark.worker.resource.gpu.amount={amount} -Dspark.worker.resource.gpu.discoveryScript={script}"

    def _spawn(self, name: str, args: list[str], extra_env: dict[str, str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [str(spark_home() / "bin" / "spark-class"), *args],
                stdout=out, stderr=subprocess.STDOUT, env={**self.env, **extra_env}, start_new_session=True,
            )
        self._processes.append((process, log))

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            for process, log in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{log.stem} exited with {process.returncode} while waiting for {what}:\n{self.logs()}")
            with contextlib.suppress(OSError, ValueError):
                if ready(self.state()):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {what}:\n{self.logs()}")
            time.sleep(0.3)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Children that outlived the daemon (executors, Python workers) are in its group too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def running(args: argparse.Namespace) -> Iterator[StandaloneCluster]:
    with tempfile.TemporaryDirectory(prefix="streamhydro-standalone-") as work:
        cluster = StandaloneCluster(Path(work), args.workers, args.cores, args.memory,
                                    [g for g in args.gpus.split(",") if g], args.discovery_script)
        print(f"starting a standalone cluster: {args.workers} worker(s) x {args.cores} core(s), {args.memory}; "
              f"GPUs: {args.gpus or args.discovery_script or 'none'}", file=sys.stderr, flush=True)
        with cluster:
            print(f"master {cluster.url}, web UI http://127.0.0.1:{cluster.ui_port}", file=sys.stderr, flush=True)
            yield cluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="cores each worker offers")
    parser.add_argument("--memory", default="2g", help="memory each worker offers")
    parser.add_argument("--gpus", default="", help="fake GPU addresses per worker, e.g. 0,1")
    parser.add_argument("--discovery-script", default="", help="a real discovery script (deploy/gpu/get_gpus_resources.sh)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...: run with SPARK_MASTER_URL set")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    with running(args) as cluster:
        done = subprocess.run(command, env=cluster.env)
        if done.returncode != 0:
            print(cluster.logs(), file=sys.stderr)
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())
