#!/usr/bin/env bash
# One lent-GPU session's checks, in order of importance, each under its own time limit; results go to $OUT.
#
#   bash bench/gpu_checks.sh                 # on the GPU machine, from the repo root (wheels it lacks in .whl/)
#   BENCH="--hidden 256 --intermediate 688 --layers 2 --seq 1024" bash bench/gpu_checks.sh   # a small dry run
#
# 1. tests/test_gpu.py (bf16 penalty, packed rows vs fp64, the launcher on one GPU); also JIT-builds FusedAdam
# 2. bench_launcher.py at LLaMA-2-7B shapes: packing and padding, activation checkpointing off and on
set -uo pipefail
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU";
  python3 -c "import torch, transformers, peft, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)"; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
timeout "${TEST_LIMIT:-200}" python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs > "$OUT/test_gpu.txt" 2>&1
echo "test_gpu: exit $?"; tail -6 "$OUT/test_gpu.txt"
timeout "${BENCH_LIMIT:-330}" python3 bench/bench_launcher.py ${BENCH:---llama2_7b --bf16} --rounds 1 --steps 6 \
  --variants pack,pad --checkpointing off,on --model_dir /tmp/bench_model > "$OUT/bench_launcher.txt" 2>&1
echo "bench_launcher: exit $?"; tail -14 "$OUT/bench_launcher.txt"
