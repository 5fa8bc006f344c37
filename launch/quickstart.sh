#!/usr/bin/env bash
# Set up clora_ds (idempotent) and run one of its jobs.
#
#   bash launch/quickstart.sh demo [train flags]   # CPU demo: tiny LLaMA + tokenizer + data built locally, then
#                                                  # launch/train.py with 2 CPU ranks (ZeRO-2) -> out/demo/run/adapter
#   bash launch/quickstart.sh test [pytest flags]  # the test suite (what .ci/run runs)
#
# Needs Python >= 3.10 with pip and a C compiler (DeepSpeed JIT-builds its CPU ops on first use).
# An installed torch is kept as it is (a CUDA build on a cluster); without one, the CPU build 2.13.0
# is installed. Set PYTHON to pick the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
job="${1:-}"
case "$job" in
  demo|test) shift ;;
  *) echo "usage: bash launch/quickstart.sh demo|test [args...]" >&2; exit 2 ;;
esac

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "[quickstart] installing torch==2.13.0 (CPU build)"
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
stamp=".quickstart-installed"
want="$("$PYTHON" -c 'import sys, hashlib; print(sys.executable, hashlib.sha256(open("setup.py","rb").read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PYTHON" -m pip show --quiet clora_ds >/dev/null 2>&1; then
  echo "[quickstart] installing clora_ds and its dependencies (pip install -e .[dev])"
  "$PYTHON" -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$job" = demo ]; then
  "$PYTHON" launch/make_demo_assets.py out/demo/assets
  "$PYTHON" -m deepspeed.launcher.runner --num_gpus 2 launch/train.py --deepspeed ds_configs/zero2.json \
    --model_name_or_path out/demo/assets/model --train_file out/demo/assets/data/train.jsonl \
    --eval_file out/demo/assets/data/test.jsonl --output_dir out/demo/run --overwrite_output_dir \
    --max_steps 400 --per_device_train_batch_size 8 --learning_rate 1e-2 --max_seq_length 256 \
    --lora_r 16 --lora_alpha 32 --lora_dropout 0 --target_modules all-linear --clora_k 5 --clora_lambda 1 \
    --logging_steps 50 --save_steps 400 --eval_steps 200 "$@"
  # the adapter against its base on the held-out split (80 questions in wordings never trained): generation, the
  # LLM-Adapters answer extraction; tests/test_demo.py checks that rounding cannot change the figure
  exec "$PYTHON" launch/evaluate.py --run_dir out/demo/run --task_file facts=out/demo/assets/data/test.jsonl \
    --output_dir out/demo/eval --overwrite
else
  exec "$PYTHON" -m pytest tests -p no:cacheprovider -rs --durations=25 "$@"  # the 25 slowest: where the suite's time goes
fi
