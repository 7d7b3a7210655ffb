"""Which model version scores the next micro-batch. Runs on the driver, at micro-batch boundaries.

The registry is checked every ``refresh_seconds``. A new version is read, checked against its
checksum, loaded into ONNX Runtime and checked against its manifest (every input and output: name,
dtype, shape, and a run on zeros) and the configured payload before it is used; one that fails any
check is refused (a log line and a metric, the reason naming the input or output that does not fit)
and the version in use keeps serving. The model bytes travel to executors as a broadcast variable, so executors
need no access to the registry's filesystem.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pyspark.sql import SparkSession

from streamhydro.config import Config, pipeline_depth
from streamhydro.errors import ModelError
from streamhydro.executor.scoring import EngineSettings, ScoringPlan
from streamhydro.executor.sessions import validate_model
from streamhydro.registry import ModelVersion, Registry

log = logging.getLogger(__name__)

OnSwitch = Callable[[ModelVersion], None]
OnRefuse = Callable[[str, int, str], None]


def engine_settings(config: Config) -> EngineSettings:
    i = config.inference
    return EngineSettings(
        providers=i.providers,
        batch_size=i.batch_size,
        pipeline_depth=pipeline_depth(i),
        intra_op_threads=i.intra_op_threads or None,
        gpu_mem_limit_bytes=i.gpu_mem_limit_mb * 1024 * 1024 or None,
        gpu_share=config.spark.task_gpus or 1.0,
        allow_tf32=i.allow_tf32,
        allow_cpu_fallback=i.allow_cpu_fallback,
        tensorrt_cache_dir=i.tensorrt_cache_dir,
    )


class ModelFollower:
    """Holds the :class:`ScoringPlan` in use and moves it to new registry versions."""

    def __init__(
        self,
        spark: SparkSession,
        config: Config,
        on_switch: OnSwitch = lambda version: None,
        on_refuse: OnRefuse = lambda name, version, reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._spark = spark
        self._config = config
        self._registry = Registry(config.model.registry)
        self._engine = engine_settings(config)
        self._on_switch = on_switch
        self._on_refuse = on_refuse
        self._clock = clock
        self._refused: dict[int, str] = {}
        self._plan: ScoringPlan
        self._broadcast = None
        self._checked_at = float("-inf")
        self._load_initial()

    @property
    def plan(self) -> ScoringPlan:
        """The plan for the next micro-batch, after a registry check when one is due."""
        now = self._clock()
        if now - self._checked_at >= self._config.model.refresh_seconds:
            self._checked_at = now
            self._refresh()
        return self._plan

    @property
    def refused(self) -> dict[int, str]:
        """Versions refused so far, with the reason."""
        return dict(self._refused)

    def close(self) -> None:
        if self._broadcast is not None:
            self._broadcast.unpersist()
            self._broadcast = None

    def _load_initial(self) -> None:
        m = self._config.model
        version = self._registry.get(m.name, m.version)
        self._switch(version)
        self._checked_at = self._clock()

    def _refresh(self) -> None:
        m = self._config.model
        try:
            number = self._registry.resolve(m.name, m.version)
        except ModelError as exc:
            log.warning("registry check failed, keeping %s:%d: %s", m.name, self._plan.manifest.version, exc)
            return
        if number == self._plan.manifest.version or number in self._refused:
            return
        try:
            self._switch(self._registry.get(m.name, number))
        except ModelError as exc:
            self._refused[number] = exc.problem
            log.error(
                "refused model %s:%d, still serving %s:%d: %s",
                m.name, number, m.name, self._plan.manifest.version, exc.problem,
            )
            self._on_refuse(m.name, number, exc.problem)

    def _switch(self, version: ModelVersion) -> None:
        data = version.read_bytes()
        validate_model(version.manifest, data, self._config.payload)
        previous, self._broadcast = self._broadcast, self._spark.sparkContext.broadcast(data)
        old = getattr(self, "_plan", None)
        k = self._config.kafka
        self._plan = ScoringPlan(
            manifest=version.manifest,
            model_bytes=self._broadcast,
            payload=self._config.payload,
            output_topic=k.output_topic,
            dead_letter_topic=k.dead_letter_topic,
            engine=self._engine,
            max_record_bytes=k.max_record_bytes(),
        )
        if previous is not None:
            previous.unpersist(blocking=False)
        log.info(
            "serving model %s (sha256 %s)%s",
            version.label, version.digest[:12], f", was {old.manifest.name}:{old.manifest.version}" if old else "",
        )
        self._on_switch(version)
