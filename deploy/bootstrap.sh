#!/usr/bin/env bash
# Set up a fresh machine and run streamhydro: `bash deploy/bootstrap.sh demo` or `bash deploy/bootstrap.sh test`.
#   demo  -- a virtualenv in .venv with streamhydro and the CPU build of ONNX Runtime (about 1 GB), the JVM
#            jars (Apache Kafka, Spark's Kafka connector) from Maven Central, then `streamhydro demo`
#            (extra arguments are passed on)
#   test  -- the same plus the trainer's PyTorch (PyPI's torch is the CUDA build: about 4 GB with its
#            nvidia-* wheels), the test extras and the Debian packages the integration tests use, then pytest
# Needs Python >= 3.11, Java 17 (Spark, Kafka) and Maven (installed from Debian when missing).
# Re-running skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
shift || true
venv=${STREAMHYDRO_VENV:-.venv}
python=${PYTHON:-python3}

# Debian packages the integration tests start for real: Prometheus (+ promtool), the Pushgateway, PostgreSQL and its JDBC driver.
test_debs=(prometheus prometheus-pushgateway postgresql libpostgresql-jdbc-java libmariadb-java)

# setup_python EXTRAS: the virtualenv with streamhydro and the given extras.
setup_python() {
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/pip" install -q -e ".[$1]"
}

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

setup_java() {
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
}

# Apache Kafka (the local broker) and Spark's Kafka connector, resolved once into the jar cache.
setup_jars() {
  "$venv/bin/streamhydro" --log-level WARNING jars >/dev/null
}

setup_debs() {
  local missing=()
  for deb in "${test_debs[@]}"; do
    dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing+=("$deb")
  done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

case "$mode" in
  demo)
    setup_java
    setup_python cpu
    setup_jars
    exec "$venv/bin/streamhydro" demo "$@"
    ;;
  test)
    setup_java
    setup_debs
    setup_python cpu,train,test
    setup_jars
    exec "$venv/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: bash deploy/bootstrap.sh demo [demo options] | test [pytest options]" >&2
    exit 64
    ;;
esac
