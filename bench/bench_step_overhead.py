"""Training-step time of CLoRA vs plain PEFT LoRA on the same LLaMA, in the same run.

A step is forward + backward + torch.optim.AdamW step over the trainable (LoRA) parameters, batch of
random token ids with labels = inputs. Three variants, each its own model built from the same seed
(same base weights, same LoraConfig):
  lora        peft.get_peft_model with the LoraConfig that attach_clora built (no CLoRA attached);
              loss = out.loss
  clora       clora_ds.attach_clora(..., lam=1.0); loss = model.clora.penalty_term(out.loss)
  clora_lam0  the same with lam=0.0 (penalties still evaluated in the hooks for logging, no gradient)
After warmup the variants are interleaved (order rotated each round: ABC, BCA, CAB, ...) so
background load hits all of them alike; the table gives medians, the ratio of medians, and the
median of the per-round paired ratios. Target: clora / lora <= 1.03.

Default (CPU, fp32, about 3 minutes on an idle 2-core machine, 1.5 GiB peak RAM): LlamaConfig hidden 512, intermediate
1376, 4 layers, 8 heads, 4 KV heads, vocab 1000, seq 2048, batch 1, sdpa attention; LoRA r=32,
alpha=64 on q,k,v,up,down; k = hidden/8 = 64.
    python bench/bench_step_overhead.py
Time only on an otherwise idle machine (other processes make 2-thread CPU steps vary up to 4×).
Add --profile to print a torch.profiler table of one step of each variant.
Full size (LLaMA-2-7B shapes) on a GPU box; bf16 base weights so the three models fit on one 80 GB GPU:
    python bench/bench_step_overhead.py --device cuda --dtype bf16 --layers 32 --hidden 4096 \
        --intermediate 11008 --heads 32 --kv-heads 32 --vocab 32000 --k 512
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft -> transformers 5 deprecation

from clora_ds.adapter import attach_clora  # noqa: E402
from clora_ds.config import CLoRAConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_base(args, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 2048),
    )
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # a 7B base initialised on the CPU first takes minutes per variant
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="base model dtype")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--k", type=int, default=0, help="subspace dim (0: hidden/8)")
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=2, help="warmup rounds (each runs every variant once)")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (each runs every variant once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also profile one step of each variant")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    k = args.k or args.hidden // 8

    from peft import get_peft_model

    def clora_model(lam):
        cfg = CLoRAConfig(r=args.r, alpha=2.0 * args.r, dropout=0.0, target_modules=TARGETS, k=k, lam=lam,
                          seed=args.seed)
        return attach_clora(build_base(args, dtype), cfg).to(device)

    models = {}
    models["clora"] = clora_model(args.lam)
    lora_cfg = copy.deepcopy(models["clora"].peft_config["default"])  # exactly the LoraConfig CLoRA used
    torch.manual_seed(args.seed + 1)
    models["lora"] = get_peft_model(build_base(args, dtype), lora_cfg).to(device)
    models["clora_lam0"] = clora_model(0.0)
    order = ["lora", "clora", "clora_lam0"]
    # identical LoRA init across variants (PEFT draws lora_A from the global RNG): copy clora's adapter weights
    ref = {n: p for n, p in models["clora"].named_parameters() if p.requires_grad}
    for name in ("lora", "clora_lam0"):
        with torch.no_grad():
            for n, p in models[name].named_parameters():
                if p.requires_grad:
                    p.copy_(ref[n])
    n_train = {m: sum(p.numel() for p in models[m].parameters() if p.requires_grad) for m in order}
    assert len(set(n_train.values())) == 1, n_train
    assert not hasattr(models["lora"], "clora")

    opts = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4) for m in order}
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    for m in order:
        models[m].train()

    def step(m):
        model, opt = models[m], opts[m]
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss if m == "lora" else model.clora.penalty_term(out.loss)
        loss.backward()
        opt.step()
        return loss.detach()

    attn = models["lora"].get_base_model().config._attn_implementation
    print(f"# Step time: CLoRA vs plain PEFT LoRA (forward + backward + AdamW step)\n")
    print(f"device={device} dtype={args.dtype} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"attn={attn}; LLaMA hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"{args.heads} heads, {args.kv_heads} KV heads, vocab {args.vocab}; batch {args.batch} × seq {args.seq} "
          f"= {args.batch * args.seq} tokens/micro-batch; LoRA r={args.r} alpha={2 * args.r} on {','.join(TARGETS)} "
          f"({n_train['lora']:,} trainable params); CLoRA k={k}, lam={args.lam}, "
          f"P = {models['clora'].clora.p_nbytes / 2**20:.2f} MiB")
    print(f"warmup {args.warmup} rounds, then {args.rounds} timed rounds, variants interleaved (order rotated each "
          f"round); loadavg at start {os.getloadavg()[0]:.2f}\n")

    for _ in range(args.warmup):
        for m in order:
            step(m)
    times = {m: [] for m in order}
    cpu = {m: [] for m in order}
    losses = {m: None for m in order}
    for i in range(args.rounds):
        for m in order[i % 3:] + order[:i % 3]:
            gc.collect()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            losses[m] = step(m)
            sync(device)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)

    # the regularizer's own work in isolation: what attach_clora's hooks compute, same weights and P
    from clora_ds.penalty import SubspacePenalty

    cm = models["clora"]
    named = dict(cm.named_modules())
    pairs = []
    for name, sub in cm.clora.subspaces.items():
        layer = named["base_model.model." + name]
        sub.on(device)
        pairs.append((layer.lora_A["default"].weight, sub.p_in))
        pairs.append((layer.lora_B["default"].weight.t(), sub.p_out))
    reg_params = [p for p in cm.parameters() if p.requires_grad]

    def reg_once():
        for p in reg_params:
            p.grad = None
        torch.stack([SubspacePenalty.apply(x, p) for x, p in pairs]).sum().backward()

    for _ in range(5):
        reg_once()
    reg_t = []
    for _ in range(50):
        sync(device)
        t0 = time.perf_counter()
        reg_once()
        sync(device)
        reg_t.append(time.perf_counter() - t0)
    reg_med = statistics.median(reg_t)

    med = {m: statistics.median(v) for m, v in times.items()}
    mins = {m: min(v) for m, v in times.items()}
    paired = {m: statistics.median(a / b for a, b in zip(times[m], times["lora"])) for m in order}
    print("| variant | loss used | median step s | min s | max s | ratio of medians vs lora | "
          "median paired ratio vs lora | ratio of mins vs lora | median CPU s (process) | CPU ratio vs lora |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    cmed = {m: statistics.median(v) for m, v in cpu.items()}
    desc = {"lora": "out.loss", "clora": f"penalty_term(out.loss), λ={args.lam}", "clora_lam0": "penalty_term(out.loss), λ=0"}
    for m in order:
        print(f"| {m} | {desc[m]} | {med[m]:.3f} | {mins[m]:.3f} | {max(times[m]):.3f} | "
              f"{med[m] / med['lora']:.3f}× | {paired[m]:.3f}× | {mins[m] / mins['lora']:.3f}× | {cmed[m]:.3f} | "
              f"{cmed[m] / cmed['lora']:.3f}× |")
    r = med["clora"] / med["lora"]
    print(f"\nCLoRA / LoRA (ratio of medians) = {r:.3f}× -> target ≤ 1.03×: {'met' if r <= 1.03 else 'NOT met'}; "
          f"loadavg at end {os.getloadavg()[0]:.2f}")
    print(f"Regularizer alone (fused SubspacePenalty forward+backward over the {len(pairs)} terms of this model, "
          f"median of 50): {reg_med * 1e3:.2f} ms = {100 * reg_med / med['lora']:.2f}% of the LoRA median step "
          f"(the extra arithmetic CLoRA adds; the rest of any gap is hook/autograd bookkeeping or noise).")
    print(f"last CLoRA penalty R = {models['clora'].clora.last_penalty.item():.4g}; "
          f"last losses: " + ", ".join(f"{m} {losses[m].item():.4f}" for m in order))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for m in order:
            with profile(activities=acts) as prof:
                step(m)
                sync(device)
            print(f"\n## profile: one {m} step (top 15 by self time)\n")
            key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=15))


if __name__ == "__main__":
    main()
