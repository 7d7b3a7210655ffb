#!/usr/bin/env bash
# Launch the inference service with spark-submit.
#
#   deploy/serve/submit.sh CONFIG [spark-submit options...]
#
# e.g. deploy/serve/submit.sh /etc/streamhydro/serve.toml --master spark://head:7077 --deploy-mode cluster --supervise
#
# The master and deploy mode come from spark-submit (--master, --deploy-mode), not from the config's
# spark.master. In cluster deploy mode CONFIG, this directory and the Python environment must exist at
# the same paths on the node that runs the driver (or ship them: --files, --archives; see README.md here).
# Spark refuses Python applications in standalone cluster deploy mode; for that case this script submits
# Spark's own Python launcher (org.apache.spark.deploy.PythonRunner, a JVM main class) with serve_job.py.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [spark-submit options...]" >&2
    exit 64
fi
config=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
spark_home=${SPARK_HOME:-$(python3 -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')}

master="" mode=client
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --master) master=${args[i + 1]:-} ;;
        --master=*) master=${args[i]#*=} ;;
        --deploy-mode) mode=${args[i + 1]:-} ;;
        --deploy-mode=*) mode=${args[i]#*=} ;;
    esac
done

app=("$here/serve_job.py" --config "$config")
if [[ $master == spark://* && $mode == cluster ]]; then
    core_jars=("$spark_home"/jars/spark-core_*.jar)
    app=(--class org.apache.spark.deploy.PythonRunner "${core_jars[0]}" "$here/serve_job.py" "" --config "$config")
fi

exec "$spark_home/bin/spark-submit" \
    --name streamhydro-serve \
    --conf spark.dynamicAllocation.enabled=false \
    "$@" \
    "${app[@]}"
