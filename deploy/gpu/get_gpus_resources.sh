#!/usr/bin/env bash
# Spark GPU discovery script: prints {"name":"gpu","addresses":["0","1",...]} for the NVIDIA GPUs
# this executor/worker may use. Runs once per executor (and worker) start, on that host.
# With CUDA_VISIBLE_DEVICES set (by YARN, the Kubernetes device plugin, or by hand) the addresses are
# the positions 0..n-1 in that list, which is how the process numbers what it sees; set but empty
# means no GPU. Unset: every GPU, by nvidia-smi index (PCI bus order; executors get
# CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA numbers them the same way).
set -euo pipefail
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  count=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
  addresses=""
  if [ "$count" -gt 0 ]; then
    addresses=$(seq -s, 0 $((count - 1)) | sed 's/\([0-9]\+\)/"\1"/g')
  fi
else
  addresses=$(nvidia-smi --query-gpu=index --format=csv,noheader | sed -e 's/ //g' -e 's/.*/"&"/' | paste -sd, -)
fi
echo "{\"name\":\"gpu\",\"addresses\":[${addresses}]}"
