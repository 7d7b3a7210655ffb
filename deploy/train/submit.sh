#!/usr/bin/env bash
# Launch the barrier-mode trainer on a Spark cluster.
#
#   deploy/train/submit.sh CONFIG [spark-submit options...]
#
# e.g. deploy/train/submit.sh train.toml --master spark://head:7077 --executor-cores 4 --num-executors 2
#
# The master comes from spark-submit (--master), not from the config's spark.master (train_job.py
# empties it in the driver process). Every executor needs Python with streamhydro[train] installed
# (or a packed environment shipped with --archives; see README.md here). Settings the trainer sets
# itself (barrier timeout, stage attempts) come from the config's [training] section.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [spark-submit options...]" >&2
    exit 64
fi
config=$1
shift
here=$(cd "$(dirname "$0")" && pwd)

exec "${SPARK_HOME:+$SPARK_HOME/bin/}spark-submit" \
    --name streamhydro-train \
    --conf spark.dynamicAllocation.enabled=false \
    "$@" \
    "$here/train_job.py" --config "$config"
