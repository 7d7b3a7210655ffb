"""streamhydro: streaming inference on Apache Spark (Project Hydrogen, in Python).

The package tree follows the processes that run it:

- ``streamhydro.driver``   -- the Spark driver: the ``serve`` and ``demo`` daemons.
- ``streamhydro.executor`` -- executor Python workers: the ``mapInArrow`` scoring tasks.
- ``streamhydro.kafka``    -- streamhydro's Kafka connector; each module says where it runs.
- ``streamhydro.payload``, ``streamhydro.registry``, ``streamhydro.config`` -- pure code used by all.
"""

__version__ = "0.1.0"
