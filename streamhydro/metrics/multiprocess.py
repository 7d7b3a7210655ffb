"""The directory executor Python workers write their metric files to. Runs on the driver (local
mode: prepared and served by the driver) and in the per-node exporter (cluster mode).

prometheus_client's multiprocess mode is chosen in a process by the environment variable
``PROMETHEUS_MULTIPROC_DIR`` when ``prometheus_client`` is first imported. Spark puts
``spark.executorEnv.*`` into the environment of every Python worker it starts, in local mode (the
daemon that forks the workers runs on the driver's machine) as in cluster mode (on each executor's
node), so :func:`executor_conf` is all the workers need. Each worker writes
``<type>_<pid>.db`` files there; a reader merges every file in the directory.
"""

from __future__ import annotations

from pathlib import Path

from streamhydro.config import MetricsSettings
from streamhydro.errors import ConfigError
from streamhydro.spark import Master

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
EXECUTOR_ENV_KEY = f"spark.executorEnv.{ENV_VAR}"


def multiprocess_dir(settings: MetricsSettings, master: str) -> Path:
    """The directory as the workers see it: relative paths resolve against the driver's working directory.

    On a cluster the workers are elsewhere, so the path must be absolute (and the same on every node).
    """
    path = Path(settings.multiprocess_dir)
    if not path.is_absolute() and not Master.parse(master).workers_here:
        raise ConfigError(
            "metrics.multiprocess_dir",
            f"{settings.multiprocess_dir!r} is relative, but executors on {master} do not share the driver's directory",
            "use an absolute path that exists on every worker node (the per-node exporter serves it)",
        )
    return path.resolve()


def executor_conf(settings: MetricsSettings, master: str) -> dict[str, str]:
    """Spark conf that makes every Python worker write its metrics to the multiprocess directory.

    Merge into the conf the SparkSession is built with; {} when metrics are off.
    """
    if not settings.enabled:
        return {}
    return {EXECUTOR_ENV_KEY: str(multiprocess_dir(settings, master))}


def clean(path: Path) -> Path:
    """Create the directory and delete the metric files of earlier runs in it (only ``*.db`` files)."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    return path
