"""launch/train.py throughput: CLoRA vs plain LoRA (λ=0), and packing vs padding on skewed lengths.

    python bench/bench_launcher.py                       # CPU, one process, ~5 minutes on 2 cores
    python bench/bench_launcher.py --hidden 4096 --layers 32 --intermediate 11008 --bf16   # on a GPU box

Builds a LLaMA of the given size (random init) with a locally trained sentencepiece tokenizer, writes two
alpaca-style datasets and runs the real launcher (`python launch/train.py`, ZeRO-2 config) on each variant
in the same session. Real (non-pad) tokens per second come from the launcher's own metrics.jsonl; the
first logging window (warm-up) is dropped and the median of the others is reported.
  1. CLoRA (λ=1, k = hidden/8) vs λ=0 (no penalty tap, plain LoRA) on packed rows of --seq tokens.
  2. Packing vs padding on a length-skewed dataset (90% short answers, 10% long), same micro-batch.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(root: Path, args):
    from clora_ds.tiny import build_tiny_llama, record_text, sample_records, train_tokenizer

    tok = train_tokenizer([record_text(r) for r in sample_records(512)], root / "model", vocab_size=300)
    model = build_tiny_llama(len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    model.save_pretrained(str(root / "model"))
    rng = random.Random(0)
    words = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pepper"]

    def record(n_words):
        return {"instruction": "Continue the list.", "input": "", "output": " ".join(rng.choice(words) for _ in range(n_words))}

    long_rows = [record(rng.randint(args.seq // 8, args.seq // 4)) for _ in range(400)]
    skewed = [record(rng.randint(args.seq // 6, args.seq // 3)) if rng.random() < 0.1 else record(rng.randint(2, 12))
              for _ in range(2000)]
    for name, rows in (("long", long_rows), ("skewed", skewed)):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def run(root: Path, name: str, args, **flags):
    out = root / name
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
           "--model_name_or_path", str(root / "model"), "--output_dir", str(out), "--max_seq_length", str(args.seq),
           "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0", "--clora_k", str(args.hidden // 8),
           "--logging_steps", "2", "--save_steps", "0", "--learning_rate", "1e-4", "--max_steps", str(args.steps),
           "--target_modules", "q_proj,k_proj,v_proj,up_proj,down_proj"] + (["--bf16"] if args.bf16 else [])
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "tokens_per_s" in l]
    return statistics.median(r["tokens_per_s"] for r in rows[1:]), rows[-1]["peak_mem_gb"]


def attention_used(out: Path) -> str:
    return json.loads((out / "train_config.json").read_text())["attention"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args)
        print(f"# launch/train.py throughput (hidden {args.hidden}, {args.layers} layers, seq {args.seq}, r=32, "
              f"k={args.hidden // 8}, one process, ZeRO-2 config, {args.steps} steps, median of logging windows after the first)\n")
        variants = {  # name: (data, flags)
            "lora": ("long", {"packing": "true", "clora_lambda": 0}),
            "clora": ("long", {"packing": "true", "clora_lambda": 1}),
            "pad": ("skewed", {"per_device_train_batch_size": 8}),
            "pack": ("skewed", {"packing": "true", "per_device_train_batch_size": 4}),
        }
        # rounds interleave the variants, so a slow spell of the machine hits all of them alike
        got = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, (data, flags) in variants.items():
                got[name].append(run(root, f"{name}-{r}", args, train_file=root / f"{data}.jsonl", **flags))
        tok = {name: statistics.median(t for t, _ in runs) for name, runs in got.items()}
        mem = {name: max(m for _, m in runs) for name, runs in got.items()}
        print(f"rounds: {args.rounds} (each cell: median over rounds of each run's median); "
              f"loadavg at end {os.getloadavg()[0]:.2f}\n")
        print("| variant | data | real tokens/s | per round | peak mem GB | ratio |\n|---|---|---:|---|---:|---:|")

        def row(name, label, data, ratio):
            rounds = ", ".join(f"{t:.0f}" for t, _ in got[name])
            print(f"| {label} | {data} | {tok[name]:.0f} | {rounds} | {mem[name]:.2f} | {ratio} |")

        row("lora", "λ=0 (plain LoRA)", "packed long rows", "1.000")
        row("clora", "CLoRA λ=1", "packed long rows", f"step time {tok['lora'] / tok['clora']:.3f}× of LoRA")
        row("pad", "padding, 8 examples/micro-batch", "skewed", "1.000")
        row("pack", f"packing, 4 rows of <= {args.seq} tokens/micro-batch", "skewed", f"{tok['pack'] / tok['pad']:.2f}×")
        print(f"\nattention with --packing: {attention_used(root / 'pack-0')}")

if __name__ == "__main__":
    main()
