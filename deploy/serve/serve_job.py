"""spark-submit entry point of the inference service: ``spark-submit [options] serve_job.py --config FILE``.

Runs on the driver, for the life of the daemon: in the submitting shell (client deploy mode) or on
a cluster node (cluster deploy mode). The same as ``streamhydro serve``, except that the master is
always spark-submit's ``--master``: the config's ``spark.master`` is ignored here.
"""

import os
import sys

from streamhydro.cli import main

if __name__ == "__main__":
    # Set in the driver process itself, so that it holds in cluster deploy mode too (the submitting shell's
    # environment does not travel to a YARN or Kubernetes driver).
    os.environ["STREAMHYDRO_SPARK_MASTER"] = ""
    sys.exit(main(["serve", *sys.argv[1:]]))
