"""Evaluation throughput: batched greedy generation vs one prompt at a time, and lm-eval's wall time on a 1,000-item
local-file task for the base model and an adapter.

    python bench/bench_eval.py                      # CPU: a LLaMA of hidden 512, 4 layers (random init), fp32
    python bench/bench_eval.py --llama2_7b --bf16   # one GPU: LLaMA-2-7B shapes (random init), bf16

Generation: the package's own generator (clora_ds.evaluation.generation.generate_greedy: left padding, KV cache,
greedy) over the same prompts, with --batch_size B and with 1, each after a warm-up pass of its own shapes; generated
tokens/s = generated token ids (up to EOS) / wall time.
lm-eval: the clora_mc task (multiple choice by log-likelihood, rendered from a local file) on N commonsense-format
records, through lm-eval's HFLM, for the base model and for the base with a random LoRA adapter (r = 32, q,k,v,up,down).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model_shapes import add_shape_args, apply_shapes  # noqa: E402


def build(args, tokenizer_dir: Path):
    import torch

    from clora_ds.tiny import build_tiny_llama, fact_splits, train_tokenizer

    train, test = fact_splits()
    tok = train_tokenizer([f"{r['instruction']} {r['output']}" for r in train + test], tokenizer_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = build_tiny_llama(max(args.vocab, len(tok)), hidden_size=args.hidden, intermediate_size=args.intermediate,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    model = model.to(torch.bfloat16 if args.bf16 else torch.float32).eval()
    return model, tok


def records(n: int):
    from clora_ds.tiny import FRUITS, ANIMALS, fact_record

    words = FRUITS + ANIMALS
    return [fact_record(words[i % len(words)], ("bool", "option")[(i // len(words)) % 2]) for i in range(n)]


def time_generation(model, tok, prompts, max_new_tokens, batch_size):
    import torch

    from clora_ds.evaluation.generation import generate_greedy

    generate_greedy(model, tok, prompts[:batch_size], max_new_tokens, batch_size)  # warm-up: these shapes' kernels
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    counts: list = []
    start = time.perf_counter()
    generate_greedy(model, tok, prompts, max_new_tokens, batch_size, token_counts=counts)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(counts), time.perf_counter() - start


def time_lm_eval(model, tok, data_file: Path, work: Path, batch_size: int):
    from clora_ds.evaluation.harness import plan_tasks, render_tasks, run_lm_eval

    names, problems = plan_tasks(["clora_mc"], {"bench": data_file}, None)
    assert not problems, problems
    include = render_tasks(names, {"bench": data_file}, None, work / "tasks")
    start = time.perf_counter()
    result = run_lm_eval(model, tok, names, include, batch_size=batch_size)
    return time.perf_counter() - start, result[names[0]]["acc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--prompts", type=int, default=64, help="prompts generated from, in both modes")
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lm_eval_items", type=int, default=1000)
    ap.add_argument("--skip_lm_eval", action="store_true")
    args = ap.parse_args()
    apply_shapes(args)
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from clora_ds.evaluation.protocols import protocol_for

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, tok = build(args, work / "tok")
        recs = records(args.prompts)
        protocol = protocol_for(recs, "bench")
        prompts = [protocol.prompt(r) for r in recs]
        print(f"# evaluation throughput on {device}, torch {torch.__version__}: hidden {args.hidden}, {args.layers} layers, "
              f"{args.heads}/{args.kv_heads} heads, {'bf16' if args.bf16 else 'fp32'}; {len(prompts)} prompts of "
              f"{sum(len(tok(p)['input_ids']) for p in prompts) / len(prompts):.0f} tokens, greedy, "
              f"max_new_tokens {args.max_new_tokens}\n")
        rows = []
        for batch in (args.batch_size, 8, 1) if args.batch_size > 8 else (args.batch_size, 1):
            n, s = time_generation(model, tok, prompts, args.max_new_tokens, batch)
            rows.append((batch, n, s))
            print(f"  batch {batch}: {n} tokens in {s:.2f} s", file=sys.stderr, flush=True)
        print("| generation | new tokens | seconds | generated tokens/s | speedup |\n|---|---:|---:|---:|---:|")
        single = rows[-1][1] / rows[-1][2]
        for batch, n, s in rows:
            print(f"| batch {batch} | {n} | {s:.2f} | {n / s:.1f} | {n / s / single:.2f}× |")
        if args.skip_lm_eval:
            return
        data = work / "items.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records(args.lm_eval_items)))
        lines = []
        base_s, base_acc = time_lm_eval(model, tok, data, work / "base", args.batch_size)
        lines.append(("base", base_s, base_acc))
        targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        peft_model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=targets)).eval()
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        ad_s, ad_acc = time_lm_eval(peft_model, tok, data, work / "adapter", args.batch_size)
        lines.append(("base + LoRA adapter (PEFT, unmerged)", ad_s, ad_acc))
        print(f"\n| lm-eval clora_mc, {args.lm_eval_items} items ({2 * args.lm_eval_items} log-likelihood requests), "
              f"batch {args.batch_size} | seconds | acc |\n|---|---:|---:|")
        for name, s, acc in lines:
            print(f"| {name} | {s:.1f} | {acc:.3f} |")
        print(f"| both | {base_s + ad_s:.1f} | |")


if __name__ == "__main__":
    main()
