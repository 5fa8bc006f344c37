#!/usr/bin/env bash
# One lent-GPU session's checks, in order of importance, each under its own time limit; results go to $OUT.
#
#   bash bench/gpu_checks.sh                 # on the GPU machine, from the repo root (wheels it lacks in .whl/)
#   BENCH="--hidden 256 --intermediate 688 --layers 2 --seq 1024" bash bench/gpu_checks.sh   # a small dry run
#
# CHECKS picks (default all, in this order):
#   tests     tests/test_gpu.py (bf16 penalty, packed rows vs fp64, the launcher on one GPU); JIT-builds FusedAdam
#   launcher  bench_launcher.py at LLaMA-2-7B shapes: packing and padding, activation checkpointing off and on
#   eval      bench_eval.py at LLaMA-2-7B shapes: batched vs one-at-a-time generation, lm-eval on 1,000 items
#   attention bench_attention.py: packed rows through per-sequence SDPA vs torch's flash varlen, 7B attention shapes
#   peers     bench_peers.py at LLaMA-2-7B shapes: the launcher vs HF Trainer + PEFT (flattening, padding); with
#             --profile and $OUT/peers/ for the results and the launcher's profiled step
#   compile   bench_compile.py at LLaMA-2-7B shapes: --compile_layers against eager, checkpointing off/full/selective
#             (not in the default CHECKS; COMPILE overrides its flags)
#   qlora     bench_launcher.py at 7B shapes, packing + checkpointing: 4-bit base + paged 8-bit AdamW, then the bf16
#             base (needs bitsandbytes: put its wheel in .whl/ too; not in the default CHECKS)
# TEST_K selects tests (pytest -k); PEERS overrides bench_peers' flags.
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
CHECKS="${CHECKS:-tests,launcher,eval}"
if [[ ",$CHECKS," == *,tests,* ]]; then
  timeout "${TEST_LIMIT:-200}" python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rs ${TEST_K:+-k "$TEST_K"} \
    > "$OUT/test_gpu.txt" 2>&1
  echo "test_gpu: exit $?"; tail -6 "$OUT/test_gpu.txt"
fi
if [[ ",$CHECKS," == *,launcher,* ]]; then
  timeout "${BENCH_LIMIT:-330}" python3 bench/bench_launcher.py ${BENCH:---llama2_7b --bf16} --rounds 1 --steps 6 \
    --variants pack,pad --checkpointing off,on --model_dir /tmp/bench_model > "$OUT/bench_launcher.txt" 2>&1
  echo "bench_launcher: exit $?"; tail -14 "$OUT/bench_launcher.txt"
fi
if [[ ",$CHECKS," == *,eval,* ]]; then
  timeout "${EVAL_LIMIT:-300}" python3 bench/bench_eval.py ${EVAL_BENCH:---llama2_7b --bf16} > "$OUT/bench_eval.txt" 2>&1
  echo "bench_eval: exit $?"; grep -E "^(#|\|)" "$OUT/bench_eval.txt"
fi
if [[ ",$CHECKS," == *,attention,* ]]; then
  timeout "${ATTN_LIMIT:-90}" python3 bench/bench_attention.py ${ATTN:-} > "$OUT/bench_attention.txt" 2>&1
  echo "bench_attention: exit $?"; grep -E "^(#|\|)" "$OUT/bench_attention.txt"
fi
if [[ ",$CHECKS," == *,peers,* ]]; then
  timeout "${PEERS_LIMIT:-420}" python3 bench/bench_peers.py ${PEERS:---llama2_7b --bf16 --systems clora_ds,hf_flat,clora_sdpa --checkpointing on,off} \
    --profile --save_dir "$OUT/peers" --model_dir /tmp/peers_model > "$OUT/bench_peers.txt" 2> "$OUT/bench_peers.err"
  echo "bench_peers: exit $?"; grep -E "^  done" "$OUT/bench_peers.err"; grep -E "^(#|\|)" "$OUT/bench_peers.txt"; tail -5 "$OUT/bench_peers.err"
fi
if [[ ",$CHECKS," == *,compile,* ]]; then
  timeout "${COMPILE_LIMIT:-420}" python3 bench/bench_compile.py ${COMPILE:---llama2_7b --bf16 --seq 2048 --batch 4 --steps 4} \
    --out "$OUT/bench_compile.json" > "$OUT/bench_compile.txt" 2>&1
  echo "bench_compile: exit $?"; grep -E "^(#|\|)" "$OUT/bench_compile.txt"
fi
if [[ ",$CHECKS," == *,qlora,* ]]; then
  for q in --qlora ""; do
    timeout "${QLORA_LIMIT:-200}" python3 bench/bench_launcher.py ${QBENCH:---llama2_7b --bf16} $q --variants pack --checkpointing on \
      --rounds 1 --steps 4 --model_dir /tmp/bench_model > "$OUT/qlora${q:+-4bit}.txt" 2>&1
    echo "bench_launcher ${q:-bf16}: exit $?"; grep -E "^\|" "$OUT/qlora${q:+-4bit}.txt" | tail -1
  done
fi
