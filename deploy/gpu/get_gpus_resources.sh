#!/usr/bin/env bash
# Spark GPU discovery script: prints {"name":"gpu","addresses":["0","1",...]} for the NVIDIA GPUs
# this executor/worker may use. Runs once per executor (and worker) start, on that host.
# Honours CUDA_VISIBLE_DEVICES when a cluster manager (YARN/Kubernetes device plugin) already set it,
# so Spark's addresses then are the indices the process sees.
set -euo pipefail
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  count=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  addresses=$(seq -s, 0 $((count - 1)) | sed 's/\([0-9]\+\)/"\1"/g')
else
  addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/ //g' -e 's/.*/"&"/' | paste -sd, -)
fi
echo "{\"name\":\"gpu\",\"addresses\":[${addresses}]}"
