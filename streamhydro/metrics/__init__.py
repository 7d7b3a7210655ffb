"""Prometheus metrics. The modules mirror the processes that record them:

- :mod:`~streamhydro.metrics.definitions` -- every metric streamhydro exports (all processes);
- :mod:`~streamhydro.metrics.driver`, :mod:`~streamhydro.metrics.listener` -- the driver of
  ``serve``/``demo``: query progress, Kafka lag, model in use, and the endpoint;
- :mod:`~streamhydro.metrics.executor` -- executor Python workers (multiprocess files);
- :mod:`~streamhydro.metrics.multiprocess` -- the directory those files live in;
- :mod:`~streamhydro.metrics.gpu` -- NVML readings, in whichever process serves a machine;
- :mod:`~streamhydro.metrics.trainer` -- trainer ranks (Pushgateway or served);
- :mod:`~streamhydro.metrics.exporter` -- the per-node exporter for cluster mode;
- :mod:`~streamhydro.metrics.endpoint` -- the HTTP(S) server they share.

Nothing is imported or registered here; import the module you need.
"""
