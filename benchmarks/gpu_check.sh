#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): one JSON line with the provider and device each task used,
# GPU vs CPU scores, heavy-model rows/s pipelined vs sequential, GPU busy %, and the trainer's nccl
# all-reduce with 2 GPUs. Needs no pyspark, Java or registry; on a host without a GPU it prints the
# same line with "gpu": false and exits 0. Bounded to 330 s.
#   bash benchmarks/gpu_check.sh [--heavy-rows N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# Spark's GPU addresses are nvidia-smi indices, which CUDA uses only in PCI bus order.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
exec timeout 330 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
