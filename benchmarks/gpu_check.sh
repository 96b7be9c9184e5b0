#!/usr/bin/env bash
# The GPU check, for a task that is lent a GPU: at most ~10 minutes on one GPU.
#   bash benchmarks/gpu_check.sh            (from the repository root; writes $OUT or ./gpu_check/)
# 1. the CUDA tests (they skip on a CPU-only machine);
# 2. meta-training speed on CUDA: loop vs vmap_tasks, float32 vs bf16 (and learn2learn if installed);
# 3. one row of the pretrained Omniglot recipe on CUDA, 600 fixed test episodes;
# 4. torchrun meta-training throughput on CUDA (NCCL, one GPU per process: 1 process, and 2 with two GPUs).
# Every figure goes to $OUT/gpu_check.txt and the JSON files beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
export METAFEW_DATA="${METAFEW_DATA:-$(cd .. && pwd)/shared/data}"
export METAFEW_CACHE="${METAFEW_CACHE:-$OUT/cache}"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]"; PY=.venv/bin/python; }
log() { echo "== $*" | tee -a "$OUT/gpu_check.txt"; }

log "$(date -u) $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null)"
log "CUDA tests"
timeout 180 "$PY" -m pytest -q -p no:xdist -k "cuda or CUDA or gpu" tests 2>&1 | tail -5 | tee -a "$OUT/gpu_check.txt"

log "speed: loop vs vmap, float32 vs bf16"
timeout 150 "$PY" benchmarks/speed.py --datasets omniglot --methods protonet,maml,fomaml --threads 0 --repeats 2 \
  --iters 20 --json "$OUT/speed_fp32.json" 2>&1 | tail -8 | tee -a "$OUT/gpu_check.txt"
timeout 90 "$PY" benchmarks/speed.py --datasets omniglot --methods maml,fomaml --threads 0 --repeats 2 --iters 20 \
  --amp bf16 --json "$OUT/speed_bf16.json" 2>&1 | tail -6 | tee -a "$OUT/gpu_check.txt"

log "one pretrained-recipe row on CUDA"
timeout 150 .venv/bin/metafew bench --suite omniglot-pretrained --row protonet-5w1s --device cuda --no-progress \
  --out "$OUT/omniglot-pretrained-cuda.json" 2>&1 | tail -4 | tee -a "$OUT/gpu_check.txt"

log "distributed meta-training on CUDA (torchrun, NCCL)"
timeout 120 "$PY" benchmarks/distributed.py --device cuda --learners protonet,maml --steps 20 --warmup 3 \
  --json "$OUT/distributed_cuda.json" 2>&1 | tail -3 | tee -a "$OUT/gpu_check.txt"
log "done $(date -u)"
