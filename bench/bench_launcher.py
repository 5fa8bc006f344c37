"""launch/train.py throughput: CLoRA vs plain LoRA (λ=0), and packing vs padding on skewed lengths.

    python bench/bench_launcher.py                       # CPU, one process, ~5 minutes on 2 cores
    python bench/bench_launcher.py --llama2_7b --bf16 --rounds 1   # one GPU: LLaMA-2-7B shapes, vocab 32000

Builds a LLaMA of the given size (random init) with a locally trained sentencepiece tokenizer, writes two
alpaca-style datasets and runs the real launcher (`python launch/train.py`, ZeRO-2 config) on each variant
in the same session. Real (non-pad) tokens per second come from the launcher's own metrics.jsonl; the
first logging window (warm-up) is dropped and the median of the others is reported.
  1. CLoRA (λ=1, k = hidden/8) vs λ=0 (no penalty tap, plain LoRA) on packed rows of --seq tokens.
  2. Packing vs padding on a length-skewed dataset (90% short answers, 10% long), same micro-batch.
--variants picks a subset; --checkpointing off,on runs each variant without and with activation checkpointing
(--gradient_checkpointing, which engages: the launcher trains every module in train mode) and reports both, so the
memory it saves and the time it costs come from the same session. On CUDA the model is built on the GPU and saved
in the training dtype, so a 7B checkpoint takes 13.5 GB on disk rather than 27. Peak memory: the GPU's
max_memory_allocated, or the process's max RSS on CPU (what the launcher logs as peak_mem_gb).

    python bench/bench_launcher.py --variants pack --checkpointing off,on --rounds 1   # checkpointing's effect, CPU
    python bench/bench_launcher.py --variants lora --qlora ...           # QLoRA: compare with the same run without
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
sys.path.insert(0, str(ROOT / "bench"))

from model_shapes import add_shape_args, apply_shapes, save_random_llama  # noqa: E402


def build(root: Path, model_dir: Path, args):
    """Data under root; tokenizer and model in model_dir unless one is already there (--model_dir reuse)."""
    from clora_ds.tiny import record_text, sample_records

    write_data(root, args)
    if not (model_dir / "config.json").is_file():
        save_random_llama(model_dir, [record_text(r) for r in sample_records(512)], args)


def write_data(root: Path, args):
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
           "--model_name_or_path", str(args.model_path), "--output_dir", str(out), "--max_seq_length", str(args.seq),
           "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0", "--clora_k", str(args.hidden // 8),
           "--logging_steps", "2", "--save_steps", "0", "--learning_rate", "1e-4", "--max_steps", str(args.steps),
           "--target_modules", "q_proj,k_proj,v_proj,up_proj,down_proj", "--attn_implementation", args.attn]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--load_in_4bit", "--optim", "paged_adamw_8bit"] if args.qlora else []
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "tokens_per_s" in l]
    return statistics.median(r["tokens_per_s"] for r in rows[1:]), rows[-1]["peak_mem_gb"]


def attention_used(out: Path) -> str:
    return json.loads((out / "train_config.json").read_text())["attention"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--attn", default="auto", help="--attn_implementation passed to the launcher")
    ap.add_argument("--checkpointing", default="off", help="comma-separated off,on: run every variant without / with "
                    "activation checkpointing")
    ap.add_argument("--gradient_checkpointing", action="store_true", help="same as --checkpointing on")
    ap.add_argument("--qlora", action="store_true", help="every variant with a 4-bit NF4 base and paged 8-bit AdamW "
                    "(--load_in_4bit --optim paged_adamw_8bit); run once with and once without to compare")
    ap.add_argument("--variants", default="lora,clora,pad,pack", help="comma-separated subset of lora,clora,pad,pack")
    ap.add_argument("--pad_batch", type=int, default=8, help="examples per micro-batch when padding")
    ap.add_argument("--pack_batch", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--model_dir", help="build the model here, or reuse the one already here (default: a temp dir)")
    args = ap.parse_args()
    apply_shapes(args)
    import torch

    wanted = args.variants.split(",")
    unknown = set(wanted) - {"lora", "clora", "pad", "pack"}
    if unknown:
        ap.error(f"--variants: unknown {sorted(unknown)}")
    modes = ["on"] if args.gradient_checkpointing else args.checkpointing.split(",")
    if not modes or set(modes) - {"on", "off"}:
        ap.error("--checkpointing: give off, on or off,on")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        root = Path(tmp)
        args.model_path = Path(args.model_dir) if args.model_dir else root / "model"
        build(root, args.model_path, args)
        print(f"# launch/train.py throughput on {device}, torch {torch.__version__}: hidden {args.hidden}, "
              f"intermediate {args.intermediate}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
              f"vocab {max(args.vocab, 300)}, seq {args.seq}, {'bf16' if args.bf16 else 'fp32'}, r=32, k={args.hidden // 8}, "
              f"attn {args.attn}, activation checkpointing {'/'.join(modes)}"
              f"{', QLoRA (4-bit NF4 base, paged 8-bit AdamW)' if args.qlora else ''}; one process, "
              f"ZeRO-2 config, {args.steps} steps, median of logging windows after the first\n")
        variants = {  # name: (data, flags)
            "lora": ("long", {"packing": "true", "clora_lambda": 0, "per_device_train_batch_size": 1}),
            "clora": ("long", {"packing": "true", "clora_lambda": 1, "per_device_train_batch_size": 1}),
            "pad": ("skewed", {"per_device_train_batch_size": args.pad_batch}),
            "pack": ("skewed", {"packing": "true", "per_device_train_batch_size": args.pack_batch}),
        }
        variants = {(name, mode): (variants[name][0], {**variants[name][1],
                                                       **({"gradient_checkpointing": "true"} if mode == "on" else {})})
                    for name in wanted for mode in modes}  # in the order asked: what matters most runs first
        # rounds interleave the variants, so a slow spell of the machine hits all of them alike
        got = {key: [] for key in variants}
        for r in range(args.rounds):
            for (name, mode), (data, flags) in variants.items():
                got[name, mode].append(run(root, f"{name}-{mode}-{r}", args, train_file=root / f"{data}.jsonl", **flags))
                print(f"  done {name} (checkpointing {mode}) round {r}: {got[name, mode][-1][0]:.0f} tokens/s, "
                      f"{got[name, mode][-1][1]:.2f} GiB", file=sys.stderr, flush=True)
        tok = {key: statistics.median(t for t, _ in runs) for key, runs in got.items()}
        mem = {key: max(m for _, m in runs) for key, runs in got.items()}
        print(f"rounds: {args.rounds} (each cell: median over rounds of each run's median); "
              f"loadavg at end {os.getloadavg()[0]:.2f}\n")
        print("| variant | data | attention | act. ckpt | real tokens/s | per round | peak mem GiB | ratio |\n"
              "|---|---|---|---|---:|---|---:|---:|")
        labels = {"lora": ("λ=0 (plain LoRA), 1 row/micro-batch", "packed long rows"),
                  "clora": ("CLoRA λ=1, 1 row/micro-batch", "packed long rows"),
                  "pad": (f"padding, {args.pad_batch} examples/micro-batch", "skewed"),
                  "pack": (f"packing, {args.pack_batch} rows of <= {args.seq} tokens/micro-batch", "skewed")}
        for mode in modes:
            for name in ("lora", "clora", "pad", "pack"):
                if (name, mode) not in got:
                    continue
                ratio = "1.000"
                if name == "clora" and ("lora", mode) in tok:
                    ratio = f"step time {tok['lora', mode] / tok['clora', mode]:.3f}× of LoRA"
                elif name == "pack" and ("pad", mode) in tok:
                    ratio = f"{tok['pack', mode] / tok['pad', mode]:.2f}× padding"
                if mode == "on" and (name, "off") in got:
                    ratio += (f"; vs off: {tok[name, 'on'] / tok[name, 'off']:.2f}× tokens/s, "
                              f"{mem[name, 'on'] / mem[name, 'off']:.2f}× memory")
                rounds = ", ".join(f"{t:.0f}" for t, _ in got[name, mode])
                label, data = labels[name]
                print(f"| {label} | {data} | {attention_used(root / f'{name}-{mode}-0')} | {mode} | {tok[name, mode]:.0f} | "
                      f"{rounds} | {mem[name, mode]:.2f} | {ratio} |")

if __name__ == "__main__":
    main()
