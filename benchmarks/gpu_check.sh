#!/usr/bin/env bash
# The GPU acceptance run (see benchmarks/gpu_check.py): one JSON line with the device and provider options each
# task got, GPU vs CPU scores against the stated tolerance, rows/s sequential vs pipelined with per-stage times,
# GPU busy % and peak memory for the demo model and a compute-bound model (and the same on the CPU), the GPU
# tests' result, and the trainer's nccl all-reduce with 2 GPUs. Needs no pyspark, Java or registry. Exits 1
# when a GPU is present but not used, scores differ beyond the tolerance, or the GPU tests fail; on a host
# without a GPU it measures the CPU, prints "gpu": false and exits 0. Bounded to 330 s.
#   bash benchmarks/gpu_check.sh [--rows N] [--heavy-rows N] [--cpu-heavy-rows N] [--allow-tf32] ...
set -euo pipefail
cd "$(dirname "$0")/.."
# Spark's GPU addresses are nvidia-smi indices, which CUDA uses only in PCI bus order.
export CUDA_DEVICE_ORDER=PCI_BUS_ID
exec timeout 330 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
