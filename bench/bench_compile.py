"""--compile_layers against eager, the launcher's model (fused LoRA, chunked loss, CLoRA penalty), same run.

    OMP_NUM_THREADS=2 python bench/bench_compile.py                       # CPU, ~5 minutes on 2 idle cores
    python bench/bench_compile.py --llama2_7b --bf16 --seq 2048 --batch 4   # one GPU, LLaMA-2-7B shapes

For each --checkpointing policy: one model eager and one with every decoder layer compiled
(``clora_ds.compile.compile_decoder_layers``, --backend), the same random-init LLaMA of the shape flags (r = 32 on
q, k, v, up, down; k = 128), the same batches: --batch rows whose lengths vary between 7/8 and all of --seq (packed
rows are as long as their longest); AdamW on the LoRA weights. The first --warmup steps compile (their time, less an
eager step's, is the compile cost); the median of the next --steps is the step time. Eager and compiled alternate step
by step, so load on the machine hits both alike. Also: graphs compiled (no more after the warm-up), and the largest
loss difference between the two (they start equal and see the same data).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from clora_ds import CLoRAConfig  # noqa: E402
from clora_ds.activation_memory import configure_activation_memory  # noqa: E402
from clora_ds.adapter import attach_clora  # noqa: E402
from clora_ds.compile import compile_decoder_layers, compiled_graphs  # noqa: E402
from clora_ds.loss import ChunkedCausalLMLoss, chunked_loss_problem  # noqa: E402
from model_shapes import add_shape_args, apply_shapes  # noqa: E402


def build(args, device, dtype, policy):
    from clora_ds.tiny import build_tiny_llama

    with torch.device(device):
        model = build_tiny_llama(args.vocab or 32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq)
    model = model.to(dtype)
    model.config.use_cache = False
    cfg = CLoRAConfig(r=32, alpha=64, k=min(128, args.hidden * args.kv_heads // args.heads), dropout=0.0, lam=1.0, target_modules="q_proj,k_proj,v_proj,up_proj,down_proj")
    torch.manual_seed(0)
    model = attach_clora(model, cfg, subspace_device=device, fused_lora="auto")
    if chunked_loss_problem(model) is None:
        model.chunked_loss = ChunkedCausalLMLoss.install(model)
    configure_activation_memory(model, policy)
    model.train()
    return model


def step(model, opt, ids):
    loss = model.clora.penalty_term(model(input_ids=ids, labels=ids).loss)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # a sync


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_args(ap)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--checkpointing", default="off,full,selective")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    apply_shapes(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    g = torch.Generator().manual_seed(0)
    lengths = [args.seq - int(torch.randint(0, args.seq // 8 + 1, (1,), generator=g)) for _ in range(args.warmup + args.steps)]
    vocab = args.vocab or 32000
    batches = [torch.randint(3, vocab, (args.batch, n), generator=g).to(device) for n in lengths]
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {device_name}, torch {torch.__version__}, {dtype}, hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch} x {min(lengths)}-{max(lengths)} tokens, backend {args.backend}", flush=True)
    results = []
    for policy in args.checkpointing.split(","):
        import torch._dynamo as dynamo

        dynamo.reset()
        before = compiled_graphs()  # the count is per process: this policy's graphs are the difference
        eager = build(args, device, dtype, policy)
        compiled = build(args, device, dtype, policy)  # the same seeds: the same weights, LoRA init and P
        compile_decoder_layers(compiled, args.backend)
        opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for m in (eager, compiled)]
        times = {"eager": [], "compiled": []}
        losses = {"eager": [], "compiled": []}
        graphs_after_warmup = None
        for i, ids in enumerate(batches):
            for name, model, opt in (("eager", eager, opts[0]), ("compiled", compiled, opts[1])):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                losses[name].append(step(model, opt, ids))
                times[name].append(time.perf_counter() - t)
            if i == args.warmup - 1:
                graphs_after_warmup = compiled_graphs() - before
        e, c = (statistics.median(times[k][args.warmup:]) for k in ("eager", "compiled"))
        tokens = statistics.median(int(b.numel()) for b in batches[args.warmup:])
        row = {"policy": policy, "eager_s": e, "compiled_s": c, "speedup": e / c,
               "eager_tokens_per_s": tokens / e, "compiled_tokens_per_s": tokens / c,
               "compile_s": sum(times["compiled"][:args.warmup]) - args.warmup * e,
               "graphs_after_warmup": graphs_after_warmup, "graphs_at_end": compiled_graphs() - before,
               "max_loss_diff": max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"]))}
        results.append(row)
        print(f"{policy:>10}: eager {e * 1e3:8.1f} ms  compiled {c * 1e3:8.1f} ms  {row['speedup']:.2f}x  "
              f"compile {row['compile_s']:.1f} s  graphs {graphs_after_warmup}->{row['graphs_at_end']}  "
              f"max |loss diff| {row['max_loss_diff']:.2e}", flush=True)
        del eager, compiled, opts
    print("\n| checkpointing | eager ms/step | compiled ms/step | speedup | tokens/s eager | tokens/s compiled | compile s | graphs after warm-up / at end | max loss diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['policy']} | {r['eager_s'] * 1e3:,.0f} | {r['compiled_s'] * 1e3:,.0f} | {r['speedup']:.2f}x | "
              f"{r['eager_tokens_per_s']:,.0f} | {r['compiled_tokens_per_s']:,.0f} | {r['compile_s']:.0f} | "
              f"{r['graphs_after_warmup']} / {r['graphs_at_end']} | {r['max_loss_diff']:.1e} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device_name, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
