"""What a trainer rank is told to do. Made on the driver once per run; pickled into every barrier
task, so it holds only plain values (no SparkSession, no config objects with secrets). Imports
nothing heavy: the driver uses it without torch."""

from __future__ import annotations

import dataclasses

# The exported graph's input and output: rank 0 exports under these names, the driver writes them
# into the manifest.
INPUT_NAME = "features"
OUTPUT_NAME = "scores"


@dataclasses.dataclass(frozen=True)
class MetricsPlan:
    """Where a rank's training metrics go: ``pushgateway`` (host:port), or an endpoint on
    ``host:port + rank`` (any free port with ``port`` 0) served while the rank trains."""

    pushgateway: str = ""
    host: str = "127.0.0.1"
    port: int = 0


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """Everything a rank needs besides its partition's rows.

    The partition's Arrow batches carry the feature columns in ``features`` order, then the
    class index (int32) and the held-out flag (bool); see :data:`streamhydro.trainer.data.LABEL` and
    :data:`~streamhydro.trainer.data.HOLDOUT`. ``label`` is the source's label column, named in
    error messages. The features' mean and standard deviation are not here: the ranks compute
    them together (:mod:`streamhydro.trainer.rank.statistics`).
    """

    run_id: str
    features: tuple[str, ...]
    label: str
    labels: tuple[str, ...]
    hidden: tuple[int, ...]
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    checkpoint_dir: str
    timeout_seconds: int
    tolerance: float
    inject_failure: tuple[int, int] | None = None
    metrics: MetricsPlan = dataclasses.field(default_factory=MetricsPlan)

    @property
    def n_features(self) -> int:
        return len(self.features)
