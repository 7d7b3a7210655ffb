#!/usr/bin/env bash
# The demo pipeline on a real Spark standalone cluster on this machine:
#
#   bash deploy/standalone/demo.sh --events 20000 [other streamhydro demo options]
#
# Starts a master and two workers (Spark's own daemons, from the pyspark package in .venv), runs
# `streamhydro demo --master spark://...` on it (embedded broker, load generator, scoring on the
# executors), stops everything, and ends with the demo's JSON line. GPUs: the workers offer the host's
# NVIDIA GPUs (deploy/gpu/get_gpus_resources.sh) when nvidia-smi lists any, else none.
# Set up .venv first: bash deploy/bootstrap.sh demo --events 1 (or pip install -e '.[cpu]').
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${STREAMHYDRO_VENV:-.venv}
export SPARK_LOCAL_IP=127.0.0.1
# The executors' Python workers run the same interpreter as the driver.
export PYSPARK_PYTHON="$PWD/$venv/bin/python"

cluster=(--workers 2 --cores 1 --memory 1g)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  cluster+=(--discovery-script "$PWD/deploy/gpu/get_gpus_resources.sh")
fi
exec "$venv/bin/python" deploy/standalone/cluster.py "${cluster[@]}" -- \
  sh -c 'exec "$0" demo --master "$SPARK_MASTER_URL" --metrics-port 0 "$@"' "$venv/bin/streamhydro" "$@"
