"""clora_ds against what a user would otherwise run: the same model, data and LoRA settings, real tokens/s side by side.

    python bench/bench_peers.py                          # CPU, small LLaMA, ~10 minutes on 2 cores
    python bench/bench_peers.py --llama2_7b --bf16       # one GPU: LLaMA-2-7B shapes, vocab 32000

    python bench/bench_peers.py --llama2_7b --bf16 --systems clora_ds \
        --checkpointing off,full,selective,every_2,full+offload,offload   # the activation-memory policies, one GPU

Systems (--systems picks; each run once per --checkpointing setting, all in this one session):
  clora_ds   launch/train.py, CLoRA k = hidden/8, λ = 1, packing (--pack_batch rows of --seq tokens per micro-batch),
             attention auto (on CUDA in bf16: torch's flash varlen kernel; on CPU: per-sequence SDPA)
  clora_sdpa the same with --attn_implementation sdpa (per-sequence SDPA groups), to isolate the attention kernel
  hf_flat    HF Trainer + PEFT LoRA, SDPA, DataCollatorWithFlattening (padding-free: position_ids, no mask), batches
             of as many examples as fill --pack_batch × --seq tokens on average
  hf_pad     HF Trainer + PEFT LoRA, SDPA, padded batches of --pad_batch examples (DataCollatorForSeq2Seq)
All: LoRA r = 32, alpha 64, dropout 0 on q,k,v,up,down; lr 1e-4 AdamW (DeepSpeed's FusedAdam for clora_ds on CUDA,
torch's for HF); bf16 with --bf16; the same --records alpaca-style records of realistic, skewed lengths (reported),
tokenized with the launcher's own alpaca template and prompt masking for everyone; prompt+response cut at --seq.
Checkpointing (--checkpointing, comma-separated modes): off | on (= full) | full | selective | every_N, each optionally
+offload (the launcher's --activation_offloading); offload alone is off+offload. clora_ds runs every mode with
--gradient_checkpointing POLICY; HF Trainer's gradient_checkpointing (non-reentrant) runs off and full only (the other
modes are clora_ds-only and skipped for the HF systems). Both engage.

Measured the same way for all: wall time of the steps after --warmup steps (CUDA synchronised at each step end for HF;
the launcher reads a loss every step) and the real (non-pad) input tokens of those steps. Each run is a separate
process; peak memory is its max_memory_allocated on CUDA, its max RSS on CPU. MFU is the issue's convention: 4·N
FLOPs per token (a frozen-base LoRA step: forward 2N, backward through the activations 2N, no weight gradients; the
recomputed forward of checkpointing not counted) over --peak_tflops (default 790, the bf16 matrix rate the issue
takes for an H200; H100/H200 SXM datasheets say 989 dense).
"""
import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model_shapes import add_shape_args, apply_shapes, save_random_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
WORDS = ("the a of to and in is for on with as by at from that this it be are was can will not more time people "
         "water river stone cloud tiger maple ocean pepper garden window market letter summer winter number answer "
         "explain describe list write give three steps reason because first second finally example simple").split()


def write_data(root: Path, n: int, seed: int) -> Path:
    """Alpaca-style records: a short instruction, sometimes an input, a response of log-normal length (most short,
    a long tail), which is what instruction data looks like (mean ~270 tokens like the issue's data; a tail to the --seq cap)."""
    rng = random.Random(seed)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for _ in range(n):
        rec = {"instruction": words(rng.randint(5, 30)).capitalize() + "?",
               "input": words(rng.randint(5, 60)) if rng.random() < 0.4 else "",
               "output": words(max(1, min(1500, int(rng.lognormvariate(math.log(100), 1.0)))))}
        rows.append(rec)
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_model(model_dir: Path, data: Path, args) -> None:
    if not (model_dir / "config.json").is_file():
        save_random_llama(model_dir, [json.loads(l)["output"] for l in data.read_text().splitlines()[:500]], args)


def tokenized(model_dir: Path, data: Path, seq: int):
    from transformers import AutoTokenizer

    from clora_ds.data import alpaca_prompt, tokenize_example

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    records = [json.loads(l) for l in data.read_text().splitlines()]
    return tok, [tokenize_example(tok, alpaca_prompt(r), r["output"], seq) for r in records]


# ---------------------------------------------------------------------------------------------- HF Trainer + PEFT
def hf_worker(cfg: dict) -> None:
    """One HF Trainer + PEFT run in this process; prints one RESULT line of JSON."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer,
                              TrainerCallback, TrainingArguments)

    from clora_ds.engine import peak_memory_gb

    cuda = torch.cuda.is_available()
    tok, examples = tokenized(Path(cfg["model"]), Path(cfg["data"]), cfg["seq"])
    if tok.pad_token is None:  # what every LLaMA fine-tuning script does; labels of pads are -100 anyway
        tok.pad_token = tok.unk_token or tok.eos_token
    dtype = torch.bfloat16 if cfg["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype, attn_implementation="sdpa",
                                                 device_map="cuda" if cuda else None)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    if cfg["collator"] == "flat":
        collator = DataCollatorWithFlattening(return_position_ids=True)
    else:
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    tokens, ends = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return super().training_step(model, inputs, *a, **k)

    targs = TrainingArguments(
        output_dir=cfg["out"], per_device_train_batch_size=cfg["batch"], max_steps=cfg["steps"], learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, bf16=cfg["bf16"], optim="adamw_torch",
        gradient_checkpointing=cfg["checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg["steps"], save_strategy="no", report_to=[], dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, seed=0, use_cpu=not cuda)
    trainer = CountingTrainer(model=model, args=targs, train_dataset=Examples(), data_collator=collator,
                              callbacks=[Clock()])
    trainer.train()
    w = cfg["warmup"]
    layers = model.base_model.model.model.layers
    print("RESULT " + json.dumps({
        "tokens_per_s": sum(tokens[w:len(ends)]) / (ends[-1] - ends[w - 1]),
        "tokens_per_step": statistics.mean(tokens[w:len(ends)]), "peak_gb": peak_memory_gb(),
        "attention": model.config._attn_implementation, "layers_training": all(l.training for l in layers),
        "steps": len(ends)}), flush=True)


def checkpointing_mode(mode: str):
    """A --checkpointing mode -> (the launcher's --gradient_checkpointing policy, --activation_offloading)."""
    from clora_ds.activation_memory import checkpointing_policy

    policy, plus, extra = mode.partition("+")
    if policy == "offload" and not plus:
        return "off", True
    if (plus and extra != "offload") or policy not in ("on", "off", "full", "selective") and not policy.startswith("every_"):
        raise ValueError(mode)
    policy = str(checkpointing_policy("full" if policy == "on" else policy))
    if policy.startswith("every_") and int(policy[len("every_"):]) < 1:
        raise ValueError(mode)
    return policy, bool(plus)


def run_hf(root: Path, name: str, args, collator: str, batch: int, checkpointing: bool) -> dict:
    cfg = {"model": str(args.model_path), "data": str(args.data), "seq": args.seq, "bf16": args.bf16,
           "collator": collator, "batch": batch, "steps": args.steps, "warmup": args.warmup,
           "checkpointing": checkpointing, "out": str(root / name)}
    done = subprocess.run([sys.executable, __file__, "--_hf_worker", json.dumps(cfg)], capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------- clora_ds launcher
def run_ours(root: Path, name: str, args, attn: str, mode: str) -> dict:
    out = root / name
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
           "--model_name_or_path", str(args.model_path), "--train_file", str(args.data), "--output_dir", str(out),
           "--max_seq_length", str(args.seq), "--packing", "true", "--per_device_train_batch_size", str(args.pack_batch),
           "--lora_r", "32", "--lora_alpha", "64", "--lora_dropout", "0", "--target_modules", ",".join(TARGETS),
           "--clora_k", str(args.hidden // 8), "--clora_lambda", "1", "--learning_rate", "1e-4",
           "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--max_steps", str(args.steps),
           "--logging_steps", str(args.warmup), "--save_steps", "0", "--attn_implementation", attn]
    cmd += ["--bf16"] if args.bf16 else []
    policy, offload = checkpointing_mode(mode)
    cmd += ["--gradient_checkpointing", policy] if policy != "off" else []
    cmd += ["--activation_offloading"] if offload else []
    cmd += ["--profile_steps", f"{args.warmup}-{args.warmup}"] if args.profile else []  # the last untimed step
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "tokens_per_s" in l]
    timed = rows[1:]  # the first window is the warm-up
    tokens = sum(r["real_tokens"] for r in timed)
    seconds = sum(r["real_tokens"] / r["tokens_per_s"] for r in timed)
    steps = rows[-1]["step"] - rows[0]["step"]
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / steps, "peak_gb": rows[-1]["peak_mem_gb"],
            "attention": json.loads((out / "train_config.json").read_text())["attention"], "steps": rows[-1]["step"]}


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--_hf_worker":
        return hf_worker(json.loads(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--seq", type=int, default=2048, help="sequence cap (prompt + response), and packed row length")
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=2, help="steps not timed; the launcher logs every --warmup steps, "
                    "so (steps - warmup) should be a multiple of it")
    ap.add_argument("--systems", default="clora_ds,hf_flat,hf_pad", help="comma-separated subset of "
                    "clora_ds,clora_sdpa,hf_flat,hf_pad, run in this order")
    ap.add_argument("--checkpointing", default="on,off", help="comma-separated modes: off, on (= full), full, selective, "
                    "every_N, each optionally +offload; offload = off+offload (clora_ds only beyond off and full/on)")
    ap.add_argument("--pack_batch", type=int, default=4, help="clora_ds: packed rows per micro-batch")
    ap.add_argument("--pad_batch", type=int, default=8, help="hf_pad: examples per batch")
    ap.add_argument("--flat_batch", type=int, default=0, help="hf_flat: examples per batch (default: as many as fill "
                    "pack_batch × seq tokens on average)")
    ap.add_argument("--peak_tflops", type=float, default=790.0, help="bf16 matrix rate of the GPU in TFLOP/s, for MFU")
    ap.add_argument("--model_dir", help="build the model here, or reuse the one already here (default: a temp dir)")
    ap.add_argument("--profile", action="store_true", help="clora_ds runs profile their last warm-up step "
                    "(--profile_steps; outside the timed steps); with --save_dir their top ops are kept")
    ap.add_argument("--save_dir", help="keep results.json (and the profiles' top_ops) here")
    args = ap.parse_args()
    apply_shapes(args)
    systems = args.systems.split(",")
    if set(systems) - {"clora_ds", "clora_sdpa", "hf_flat", "hf_pad"}:
        ap.error(f"--systems: unknown {sorted(set(systems) - {'clora_ds', 'clora_sdpa', 'hf_flat', 'hf_pad'})}")
    modes = args.checkpointing.split(",")
    for mode in modes:
        try:
            checkpointing_mode(mode)
        except Exception:  # ValueError, or ConfigError from the policy parser
            ap.error(f"--checkpointing {mode!r}: give off, on, full, selective or every_N (N >= 1), each optionally "
                     "+offload, or offload; comma-separated")
    if args.steps - args.warmup < args.warmup or (args.steps - args.warmup) % args.warmup:
        ap.error("--steps - --warmup must be a positive multiple of --warmup")
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMPDIR")) as tmp:
        root = Path(tmp)
        args.data = write_data(root, args.records, seed=0)
        args.model_path = Path(args.model_dir) if args.model_dir else root / "model"
        build_model(args.model_path, args.data, args)
        _, examples = tokenized(args.model_path, args.data, args.seq)
        lengths = sorted(len(e["input_ids"]) for e in examples)
        mean = statistics.mean(lengths)
        flat_batch = args.flat_batch or max(1, round(args.pack_batch * args.seq / mean))
        from transformers import AutoConfig

        n_params = _param_count(AutoConfig.from_pretrained(str(args.model_path)))
        print(f"# bench_peers on {device}, torch {torch.__version__}: hidden {args.hidden}, intermediate "
              f"{args.intermediate}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, N = {n_params / 1e9:.3f}B, "
              f"{'bf16' if args.bf16 else 'fp32'}, LoRA r=32 on {','.join(TARGETS)}, seq cap {args.seq}")
        print(f"# data: {len(lengths)} records, tokens per example mean {mean:.0f}, median "
              f"{lengths[len(lengths) // 2]}, p95 {lengths[int(0.95 * len(lengths))]}, max {lengths[-1]}; "
              f"{args.steps} steps per run, the first {args.warmup} not timed\n")
        results = {}
        for mode in modes:
            ck = checkpointing_mode(mode) == ("full", False)
            for system in systems:
                name = f"{system}-{mode}"
                if system in ("hf_flat", "hf_pad") and checkpointing_mode(mode) not in (("off", False), ("full", False)):
                    print(f"  skip {name}: HF Trainer runs off and full only", file=sys.stderr, flush=True)
                    continue
                if system in ("clora_ds", "clora_sdpa"):
                    got = run_ours(root, name, args, "auto" if system == "clora_ds" else "sdpa", mode)
                    batching = f"packing, {args.pack_batch} rows × {args.seq}"
                elif system == "hf_flat":
                    got = run_hf(root, name, args, "flat", flat_batch, ck)
                    batching = f"DataCollatorWithFlattening, {flat_batch} examples"
                else:
                    got = run_hf(root, name, args, "pad", args.pad_batch, ck)
                    batching = f"padded batches of {args.pad_batch}"
                results[system, mode] = got
                print(f"  done {name}: {got['tokens_per_s']:.0f} tokens/s, {got['peak_gb']:.2f} GiB",
                      file=sys.stderr, flush=True)
                got["batching"] = batching
        print("| system | batching | attention | checkpointing | real tokens/s | tokens/step | peak GiB | "
              "MFU (4N) | vs hf_flat |\n|---|---|---|---|---:|---:|---:|---:|---:|")
        label = {"clora_ds": f"clora_ds (CLoRA k = {args.hidden // 8})", "clora_sdpa": f"clora_ds (CLoRA k = "
                 f"{args.hidden // 8}), --attn sdpa", "hf_flat": "HF Trainer + PEFT LoRA", "hf_pad": "HF Trainer + PEFT LoRA"}
        for (system, mode), got in results.items():
            mfu = f"{4 * n_params * got['tokens_per_s'] / (args.peak_tflops * 1e12):.1%}" if cuda else "-"
            ref = results.get(("hf_flat", mode))
            ratio = f"{got['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref else "-"
            print(f"| {label[system]} | {got['batching']} | {got['attention']} | {mode} | {got['tokens_per_s']:,.0f} | "
                  f"{got['tokens_per_step']:,.0f} | {got['peak_gb']:.2f} | {mfu} | {ratio} |")
        if args.save_dir:
            save = Path(args.save_dir)
            save.mkdir(parents=True, exist_ok=True)
            (save / "results.json").write_text(json.dumps({f"{s}-{m}": v for (s, m), v in results.items()}, indent=1))
            for top in root.glob("*/profile/top_ops.txt"):
                shutil.copy(top, save / f"top_ops-{top.parent.parent.name}.txt")
        print(f"\nloadavg at end {os.getloadavg()[0]:.2f}")


def _param_count(cfg) -> int:
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    return L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + 2 * v * h + h


if __name__ == "__main__":
    main()
