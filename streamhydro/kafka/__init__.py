"""streamhydro's Kafka connector on Spark's Python Data Source API (format ``streamhydro_kafka``).

Driver side: ``options`` (parsing), ``planning`` (offset ranges, admission control), ``offsets`` (true end
offsets), ``source`` (the data source and stream reader's offset hooks), ``admin`` (topics).
Executor Python workers: ``reading`` and ``writing`` (one task's records), ``records`` (Arrow conversions),
``clients`` (per-worker client cache).
"""
