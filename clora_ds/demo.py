"""CPU demo: build a tiny LLaMA, a sentencepiece tokenizer and sample data locally, train CLoRA, save.

    clora-ds-demo --output_dir out/demo --steps 30

Prints the task loss and the penalty R each step, then writes a PEFT adapter to OUTPUT_DIR/adapter
that ``peft.PeftModel.from_pretrained`` loads without clora_ds.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from .adapter import attach_clora, save_clora_adapter
from .config import CLoRAConfig
from .data import alpaca_prompt, pad_batch, tokenize_example
from .tiny import make_tiny_assets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="out/demo", help="where assets, the adapter and metrics.jsonl go")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=float, default=16.0, help="usually 2*r")
    parser.add_argument("--clora_k", type=int, default=5, help="subspace dimension; hidden/8 for the tiny model")
    parser.add_argument("--clora_lambda", type=float, default=1.0, help="0 gives plain LoRA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace an existing OUTPUT_DIR/adapter")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    out = Path(args.output_dir)
    if (out / "adapter").exists() and not args.overwrite_output_dir:
        sys.exit(f"error: {out / 'adapter'} exists; pass --overwrite_output_dir to replace it")
    torch.manual_seed(args.seed)
    assets = out / "assets"
    if not (assets / "model" / "config.json").exists():
        print(f"building a tiny LLaMA, tokenizer and sample data in {assets}", flush=True)
        make_tiny_assets(assets, seed=args.seed)
    tokenizer = LlamaTokenizer.from_pretrained(str(assets / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(assets / "model"), dtype=torch.float32)
    config = CLoRAConfig(r=args.lora_r, alpha=args.lora_alpha, k=args.clora_k, lam=args.clora_lambda, seed=args.seed)
    model = attach_clora(model, config).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"CLoRA: {len(model.clora.subspaces)} modules, r={config.r}, k={config.k}, λ={config.lam}, "
          f"{trainable} trainable parameters, P = {model.clora.p_nbytes / 1024:.1f} KiB (not saved)", flush=True)

    records = [json.loads(line) for line in (assets / "data" / "train.jsonl").read_text().splitlines()]
    examples = [tokenize_example(tokenizer, alpaca_prompt(r), r["output"], max_len=256) for r in records]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0)
    metrics = (out / "metrics.jsonl").open("w")
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = pad_batch(rng.sample(examples, args.batch_size), pad_id)
        task = model(**batch).loss
        loss = model.clora.penalty_term(task)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step, "task_loss": task.item(), "penalty": model.clora.last_penalty.item(), "loss": loss.item()}
        metrics.write(json.dumps(row) + "\n")
        print(f"step {step:3d}  task loss {row['task_loss']:.4f}  penalty R {row['penalty']:.5f}  total {row['loss']:.4f}", flush=True)
    metrics.close()
    adapter = save_clora_adapter(model, out / "adapter", overwrite=args.overwrite_output_dir)
    print(f"done in {time.time() - start:.1f}s; adapter in {adapter} (load with peft.PeftModel.from_pretrained)")


if __name__ == "__main__":
    main()
