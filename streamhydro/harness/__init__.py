"""What tests and benchmarks run around ``serve``, never part of it: :mod:`.supervisor` starts ``serve`` as users
do and restarts it like systemd's ``Restart=on-failure`` (and finds its Spark processes, for fault injection);
:mod:`.audit` checks the output topics from outside (every event's outcome, duplicates, predictions against ONNX
Runtime). They run in the test or benchmark process, beside the service, and need nothing beyond its own
dependencies. What the demo also uses stays in the package proper: :mod:`streamhydro.brokers`,
:mod:`streamhydro.producer`, :mod:`streamhydro.outputs`."""
