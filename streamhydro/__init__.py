"""streamhydro: streaming inference on Apache Spark (Project Hydrogen, in Python).

The package tree follows the processes that run it:

- ``streamhydro.driver``   -- the Spark driver: the ``serve`` and ``demo`` daemons.
- ``streamhydro.executor`` -- executor Python workers: the ``mapInArrow`` scoring tasks.
- ``streamhydro.kafka``    -- the Kafka data source and sink; each class says which half runs where.
- ``streamhydro.payload``, ``streamhydro.registry``, ``streamhydro.config`` -- pure code used by all.
"""

__version__ = "0.1.0"
