"""spark-submit entry point of the trainer: ``spark-submit [options] train_job.py --config FILE``.

Runs on the driver (client or cluster deploy mode), once. The same as ``streamhydro train``; the
master and cluster settings come from spark-submit: ``spark.master`` is emptied here, in the driver
process, so that it holds in cluster deploy mode too.
"""

import os
import sys

from streamhydro.cli import main

if __name__ == "__main__":
    os.environ["STREAMHYDRO_SPARK_MASTER"] = ""
    sys.exit(main(["train", *sys.argv[1:]]))
