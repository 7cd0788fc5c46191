#!/usr/bin/env bash
# Benchmark the built-in workload's gpu profile on an NVIDIA GPU: 60 s of training,
# then tokens/s and MFU (against the card's dense bf16 peak; see harness.CUDA_PEAK_FLOPS).
#
#   bench/gpu.sh                 # from a checkout, with torch (CUDA) and the deps installed
#   PYTHON=.venv/bin/python DATA=climbmix bench/gpu.sh
#
# Uses a throwaway workspace and cache (the stdlib corpus needs no network).
# The 60 s budget is set with AUTORESEARCH_TIME_BUDGET: the figures are about
# throughput, not comparable with a 300 s val_bpb.
set -euo pipefail

PY="${PYTHON:-python}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export AUTORESEARCH_CACHE_DIR="${AUTORESEARCH_CACHE_DIR:-$WORK/cache}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, sys; assert torch.cuda.is_available(), "torch sees no CUDA device"; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

mkdir "$WORK/lab" && cd "$WORK/lab"
printf '[workload]\nprofile = "gpu"\ndata = "%s"\n' "${DATA:-stdlib}" > autoresearch.toml
"$PY" -c 'from autoresearch.trainer import workload_files; open("train.py", "w").write(workload_files("gpu")["train.py"])'
"$PY" -m autoresearch.trainer.prepare
AUTORESEARCH_TIME_BUDGET=60 "$PY" train.py 2>&1 | tee "$WORK/run.log"
echo "=== summary ==="
grep -E '^(export|throughput|val_bpb|mfu_percent|peak_vram_mb|num_steps|total_tokens_M|training_seconds|total_seconds):' "$WORK/run.log"
echo "=== trusted evaluation (the exported graph, in a process of its own) ==="
"$PY" -m autoresearch.trainer.evaluate 2>&1 | grep -E '^(FAIL|eval_seconds|val_bpb):'
