"""The fused LoRA projection against PEFT's lora.Linear, and the chunked loss against HF's full-logits loss (CPU or GPU).

    python bench/bench_fused.py                      # CPU, ~3 minutes on 2 idle cores
    python bench/bench_fused.py --tokens 8192 --dim 4096 --dtype bf16   # one GPU: 7B-like projection and loss sizes

1. One projection, forward + backward (x needs its gradient, as inside a network): PEFT's ``lora.Linear``
   (base_layer(x) + lora_B(lora_A(x)) * scaling) vs ``FusedLoraLinear`` (clora_ds/fused_lora.py), both with the CLoRA
   penalty of A and B attached (what training runs), the same weights; --tokens rows of --dim, r = --rank.
2. The causal-LM loss from a last hidden state [1, --tokens, --hidden] through an output layer of V = 32,000 and
   128,256: HF's (the model's ``loss_function`` on the full logits, upcast to float32) vs ``chunked_causal_lm_loss``
   (clora_ds/loss.py) at the default chunk and at a 4x smaller one; peak = the most bytes alive at once during forward +
   backward (CPU: torch.profiler's memory timeline, ``allocation_peak``; CUDA: max_memory_allocated above the start).
   Half the tokens carry a label (a prompt-masked batch): the chunked loss skips the others, HF's does not.
Times: median of --repeats, variants interleaved in each round, after one warm-up round; ratios from the same run.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clora_ds import CLoRAConfig  # noqa: E402
from clora_ds.adapter import attach_clora  # noqa: E402
from clora_ds.loss import CHUNK_LOGITS, allocation_peak, chunked_causal_lm_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _rounds(variants: dict, repeats: int, device) -> dict:
    """name -> median seconds of fn(), interleaved, after one warm-up round."""
    times = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, fn in variants.items():
            seconds = _timed(fn, device)
            if round_:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def _peak(fn, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return allocation_peak(fn)[0]


def bench_projection(args, device, dtype):
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(args.dim, args.dim, bias=False)

        def forward(self, x):
            return self.proj(x)

        def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's causal-LM wrapper reads it; never called
            raise NotImplementedError

    models = {}
    for mode in ("off", "auto"):
        torch.manual_seed(0)
        base = One().to(device, dtype)
        cfg = CLoRAConfig(r=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules="proj", k=args.rank * 2, lam=1.0)
        models[mode] = attach_clora(base, cfg, fused_lora=mode).to(device, dtype).train()
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.dim, device=device, dtype=dtype)

    def step(model):
        def run():
            y = model.get_base_model()(x)  # One's forward: CLoRA's per-forward hook runs there
            loss = model.clora.penalty_term((y * grad).sum())
            loss.backward()
            x.grad = None
            model.zero_grad(set_to_none=True)
        return run

    times = _rounds({"PEFT lora.Linear": step(models["off"]), "FusedLoraLinear": step(models["auto"])}, args.repeats, device)
    print(f"\n1. LoRA projection, forward + backward with the CLoRA penalty: {args.tokens} x {args.dim} -> {args.dim}, "
          f"r = {args.rank}, {args.dtype}, {device.type}\n")
    print("| projection | ms / fwd+bwd | vs PEFT |\n|---|---:|---:|")
    ref = times["PEFT lora.Linear"]
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.2f} | {ref / t:.2f}x |")


def bench_loss(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    print(f"\n2. Causal-LM loss from the last hidden state: {args.tokens} tokens (half with a label), hidden "
          f"{args.hidden}, {args.dtype}, {device.type}\n")
    print("| vocabulary | loss | chunk rows | peak MiB | vs full | ms / fwd+bwd | vs full |\n|---:|---|---:|---:|---:|---:|---:|")
    for vocab in (32000, 128256):
        # HF's own loss_function of a LLaMA of this vocabulary: exactly what the model runs on its logits
        hf_loss = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                               num_attention_heads=1, num_key_value_heads=1)).loss_function
        torch.manual_seed(0)
        weight = (torch.randn(vocab, args.hidden, device=device) / args.hidden ** 0.5).to(dtype)
        hidden = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (1, args.tokens), device=device)
        labels[:, : args.tokens // 2] = -100
        n_items = int((labels[:, 1:] != -100).sum())

        def full():
            hf_loss(logits=hidden @ weight.t(), labels=labels, vocab_size=vocab, num_items_in_batch=n_items).backward()
            hidden.grad = None

        def chunked(rows):
            def run():
                chunked_causal_lm_loss(hidden, weight, labels, n_items, rows).backward()
                hidden.grad = None
            return run

        default_rows = max(1, CHUNK_LOGITS // vocab)
        variants = {("full (HF)", args.tokens): full, ("chunked", default_rows): chunked(default_rows),
                    ("chunked", max(1, default_rows // 4)): chunked(max(1, default_rows // 4))}
        times = _rounds(variants, args.repeats, device)
        peaks = {key: _peak(fn, device) for key, fn in variants.items()}
        ref_key = ("full (HF)", args.tokens)
        for key in variants:
            rows = min(key[1], args.tokens)
            print(f"| {vocab:,} | {key[0]} | {rows:,} | {peaks[key] / 2**20:,.0f} | {peaks[key] / peaks[ref_key]:.2f}x | "
                  f"{times[key] * 1e3:,.0f} | {times[ref_key] / times[key]:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=1024, help="projection in = out features")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the loss benchmark")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", choices=["projection", "loss"], default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    if args.skip != "projection":
        bench_projection(args, device, dtype)
    if args.skip != "loss":
        bench_loss(args, device, dtype)


if __name__ == "__main__":
    main()
