"""Packed-row attention inside a LLaMA: clora_packed_sdpa (SDPA per group of equal-length sequences) against
clora_packed_varlen (PyTorch's flash varlen kernel, one call per layer), forward + backward, same batch, same run.

    python bench/bench_attention.py                      # one GPU, bf16: LLaMA-2-7B attention shapes, 2 layers
    python bench/bench_attention.py --small              # CPU smoke run (varlen needs CUDA: only SDPA is timed)

Needs torch, transformers and this repository only (no DeepSpeed, no datasets), so it runs on a bare GPU image.
The batch is --rows rows of --seq tokens, each packed from sequences of skewed lengths (most short, a few long),
which is what packing produces from instruction data. Reports ms per forward + backward (median of --iters after
--warmup), peak memory, and the largest logit difference between the two implementations on the same input.
"""
import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def packed_positions(rows: int, seq: int, seed: int):
    """position_ids [rows, seq] restarting at each packed sequence (80% of lengths 16-256, 20% 512-2048)."""
    import torch

    rng = random.Random(seed)
    out, count = [], 0
    for _ in range(rows):
        pos, left = [], seq
        while left:
            n = min(left, rng.randint(16, 256) if rng.random() < 0.8 else rng.randint(512, 2048))
            pos.extend(range(n))
            left -= n
            count += 1
        out.append(pos)
    return torch.tensor(out), count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import clora_ds.attention as attention

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.small:
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=args.layers,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq)
        args.seq = min(args.seq, 512)
    else:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=args.seq)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    pos, n_seq = packed_positions(args.rows, args.seq, seed=0)
    ids = torch.randint(0, cfg.vocab_size, pos.shape)
    pos, ids = pos.to(device), ids.to(device)
    impls = [attention.PACKED_SDPA] + ([attention.PACKED_VARLEN] if attention.varlen_available() else [])
    print(f"# {device} {dtype}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{args.rows} rows x {args.seq} tokens = {pos.numel()} tokens in {n_seq} packed sequences")
    if not attention.varlen_available():
        print("# torch.nn.attention.varlen is unavailable here (it needs CUDA): only SDPA is timed")
    results, logits = {}, {}
    for impl in impls:
        model.set_attn_implementation(impl)
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.iters):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            out.float().logsumexp(-1).mean().backward()
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float().cpu()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        results[impl] = (statistics.median(times) * 1e3, peak)
    print("| attention | ms / fwd+bwd | tokens/s | peak GiB |")
    print("|---|---:|---:|---:|")
    for impl, (ms, peak) in results.items():
        print(f"| {impl} | {ms:.1f} | {pos.numel() / ms * 1e3:,.0f} | {peak:.2f} |")
    if len(results) == 2:
        a, b = (logits[i] for i in impls)
        print(f"# max |logit diff| varlen vs sdpa: {(a - b).abs().max().item():.4f} "
              f"(logit scale {a.abs().max().item():.2f}); speed-up {results[impls[0]][0] / results[impls[1]][0]:.2f}x")


if __name__ == "__main__":
    main()
