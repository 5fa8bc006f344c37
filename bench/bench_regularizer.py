"""Forward+backward time of the CLoRA regularizer alone, at LLaMA-2-7B shapes.

    R = Σ_m ½‖A_m P_in,m‖²_F + ½‖B_mᵀ P_out,m‖²_F

Adapted per layer: q_proj, k_proj, v_proj (4096->4096), up_proj (4096->11008), down_proj (11008->4096);
A = lora_A [r, in], B = lora_B [out, r], r = 32, P_in [in, k], P_out [out, k], k in {512, 2048}.

Three implementations, timed in the same run on the same tensors:
  fused    clora_ds.penalty.SubspacePenalty per module (what the adapter's hooks call), summed with
           torch.stack(...).sum() as CLoRARegularizer.penalty_term does.
  grouped  clora_ds.penalty.GroupedSubspacePenalty, one bmm per group of equal-shape (X, P) pairs with
           P stacked [G, d, k] (here two groups: d = 4096 and d = 11008, over all layers).
  naive    like the CLoRA authors' code: walk named_parameters() of a module holding the LoRA weights,
           look P up by parameter name in a dict, 0.5 * (A @ P).pow(2).sum() with plain autograd.

Before timing, the script checks that the three give the same value and gradients (relative error
< 1e-5) and prints that check. The time is linear in the number of layers; on CPU the default is
2 layers, and the 32-layer figures printed beside it are extrapolated (×32/layers), not measured.
P here is a scaled Gaussian, not orthonormalised (a QR of [11008, 2048] per module costs far more
than the benchmark itself); its values do not affect the time.

Run (CPU default: about 40 s on an idle 2-core machine, 1.3 GiB peak RAM):
    python bench/bench_regularizer.py
Time only on an otherwise idle machine: with 2 OpenMP threads on 2 cores, any other busy process
makes every small matmul wait at a thread barrier and inflates times (and skews the ratios) up to 30×.
Full size on a GPU box (P is 14.4 GB fp32 at k=2048, 32 layers):
    python bench/bench_regularizer.py --device cuda --layers 32
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from clora_ds.penalty import GroupedSubspacePenalty, SubspacePenalty

MODULES = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def module_shapes(hidden: int, intermediate: int) -> Dict[str, Tuple[int, int]]:
    """name -> (in, out)."""
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


class LoraHolder(nn.Module):
    """layers.{i}.{module}.lora_A.weight [r, in] and .lora_B.weight [out, r], as named in a PEFT model."""

    def __init__(self, layers: int, shapes: Dict[str, Tuple[int, int]], r: int, dtype, device):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.ModuleDict()
            for name in MODULES:
                d_in, d_out = shapes[name]
                m = nn.Module()
                m.lora_A = nn.Linear(d_in, r, bias=False, device=device, dtype=dtype)
                m.lora_B = nn.Linear(r, d_out, bias=False, device=device, dtype=dtype)
                with torch.no_grad():
                    m.lora_A.weight.normal_(0.0, d_in ** -0.5)
                    m.lora_B.weight.normal_(0.0, 0.02)  # non-zero so B's penalty and gradient are non-trivial
                layer[name] = m
            self.layers.append(layer)


class Problem:
    """The LoRA weights, P stacked per group, and the per-parameter views of P."""

    def __init__(self, holder: LoraHolder, k: int, p_dtype, device, seed: int = 0):
        self.holder = holder
        self.params: List[Tuple[str, nn.Parameter]] = list(holder.named_parameters())
        # (X, P) pairs grouped by d (P's row count): X = A [r, in] (d = in) or X = Bᵀ [r, out] (d = out)
        members: Dict[int, List[str]] = {}
        for name, p in self.params:
            d = p.shape[1] if ".lora_A." in name else p.shape[0]
            members.setdefault(d, []).append(name)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.p_stack: Dict[int, torch.Tensor] = {}
        self.p_by_name: Dict[str, torch.Tensor] = {}
        self.group_names: Dict[int, List[str]] = members
        for d, names in members.items():
            stack = torch.empty(len(names), d, k, dtype=p_dtype, device=device)
            for g in range(len(names)):  # fill in chunks: no [G, d, k] float32 temporary on the host
                stack[g].copy_(torch.randn(d, k, generator=gen).mul_(d ** -0.5))
            self.p_stack[d] = stack
            for g, name in enumerate(names):
                self.p_by_name[name] = stack[g]  # a contiguous view: one copy of P shared by all methods
        self.param_by_name = dict(self.params)

    @property
    def p_nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.p_stack.values())

    def x_of(self, name: str) -> torch.Tensor:
        w = self.param_by_name[name]
        return w if ".lora_A." in name else w.t()


# -- the three implementations ---------------------------------------------------------------------
def fused(prob: Problem) -> torch.Tensor:
    values = [SubspacePenalty.apply(prob.x_of(n), prob.p_by_name[n]) for n, _ in prob.params]
    return torch.stack(values).sum()


def grouped(prob: Problem) -> torch.Tensor:
    values = [
        GroupedSubspacePenalty.apply(prob.p_stack[d], *[prob.x_of(n) for n in names])
        for d, names in prob.group_names.items()
    ]
    return torch.stack(values).sum()


def naive(prob: Problem) -> torch.Tensor:
    """Authors' style: named_parameters() walk + dict lookup + plain autograd."""
    p_dict = prob.p_by_name
    loss = 0.0
    for name, param in prob.holder.named_parameters():
        if "lora_A" in name:
            x = param
        elif "lora_B" in name:
            x = param.t()
        else:
            continue
        p = p_dict[name]
        if x.dtype != p.dtype:  # bf16 A, fp32 P: plain `@` needs one dtype; compute in P's dtype like the others
            x = x.to(p.dtype)
        loss = loss + 0.5 * (x @ p).pow(2).sum()
    return loss


METHODS: Dict[str, Callable[[Problem], torch.Tensor]] = {"fused": fused, "grouped": grouped, "naive": naive}


# -- check and time ---------------------------------------------------------------------------------
def value_and_grads(fn, prob: Problem):
    for _, p in prob.params:
        p.grad = None
    v = fn(prob)
    v.backward()
    grads = [p.grad.detach().float().clone() for _, p in prob.params]
    return v.detach().double().item(), grads


def rel_err_grads(g: List[torch.Tensor], ref: List[torch.Tensor]) -> float:
    num = sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(g, ref)).sqrt()
    den = sum((b.double() ** 2).sum() for b in ref).sqrt()
    return (num / den).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(prob: Problem, device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median fwd+bwd seconds per method; methods alternate within each round (order rotated per round),
    so background load and clock drift hit all of them alike."""
    params = [p for _, p in prob.params]
    names = list(METHODS)

    def once(fn):
        for p in params:
            p.grad = None
        fn(prob).backward()

    for _ in range(warmup):
        for m in names:
            once(METHODS[m])
    times: Dict[str, List[float]] = {m: [] for m in names}
    for i in range(repeats):
        for m in names[i % len(names):] + names[:i % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            once(METHODS[m])
            sync(device)
            times[m].append(time.perf_counter() - t0)
    return {m: (statistics.median(v), min(v)) for m, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--ks", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                    help="dtype of A and B; P is always fp32")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shapes = module_shapes(args.hidden, args.intermediate)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    L = args.layers

    print(f"# CLoRA regularizer forward+backward, LLaMA-2-7B shapes (hidden {args.hidden}, intermediate "
          f"{args.intermediate}), r={args.r}, modules {', '.join(MODULES)}")
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} layers={L} "
          f"warmup={args.warmup} repeats={args.repeats} (median; methods interleaved round-robin); "
          f"loadavg at start {os.getloadavg()[0]:.2f}\n")

    check_rows = []
    time_rows = []
    for k in args.ks:
        for dname in args.dtypes:
            holder = LoraHolder(L, shapes, args.r, dtypes[dname], device)
            prob = Problem(holder, k, torch.float32, device)
            # correctness: every method against fused
            ref_v, ref_g = value_and_grads(fused, prob)
            for m in ("grouped", "naive"):
                v, g = value_and_grads(METHODS[m], prob)
                ev, eg = abs(v - ref_v) / abs(ref_v), rel_err_grads(g, ref_g)
                check_rows.append((k, dname, m, ref_v, v, ev, eg, ev < 1e-5 and eg < 1e-5))
            ts = time_interleaved(prob, device, args.warmup, args.repeats)
            for m in METHODS:
                (t, tmin), (tn, tnmin) = ts[m], ts["naive"]
                time_rows.append((k, dname, m, t, tn / t, tmin, tnmin / tmin, prob.p_nbytes))
            del prob, holder
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print("## Agreement check (vs fused; fp32 accumulation; pass = rel err < 1e-5 for value and gradients)\n")
    print("| k | A,B dtype | method | R (fused) | R (method) | value rel err | grad rel err (global L2) | pass |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for k, dn, m, rv, v, ev, eg, ok in check_rows:
        print(f"| {k} | {dn} | {m} | {rv:.9g} | {v:.9g} | {ev:.1e} | {eg:.1e} | {'yes' if ok else 'NO'} |")
    all_ok = all(r[-1] for r in check_rows)
    print(f"\nall agree: {'yes' if all_ok else 'NO'}\n")

    print(f"## Timing: forward+backward of R over {L} layers ({5 * L} adapted modules, {10 * L} penalty terms)\n")
    print("Times are medians (min also shown). Time is linear in the number of layers; the last column is an extrapolation to 32 layers (×32/"
          f"{L}), not a measurement. 'P GB/s' = 2 × bytes of P (read once in forward, once in backward) / median time.\n")
    print(f"| k | A,B dtype | method | measured ms ({L} layers) | ms per layer | speedup vs naive (same run) "
          f"| min ms | speedup vs naive (mins) | P GB/s | EXTRAPOLATED ms for 32 layers |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for k, dn, m, t, sp, tmin, spmin, pb in time_rows:
        print(f"| {k} | {dn} | {m} | {t * 1e3:.1f} | {t * 1e3 / L:.1f} | {sp:.2f}× | {tmin * 1e3:.1f} | {spmin:.2f}× "
              f"| {2 * pb / t / 1e9:.1f} "
              f"| {t * 1e3 * 32 / L:.0f} (extrapolated) |")
    print("\nP: fp32, one copy per run shared by all three methods (per-module P are views of the stacked P); "
          "for bf16 A/B every method computes A·P in fp32 (fused/grouped promote, naive casts A).")
    print(f"loadavg at end {os.getloadavg()[0]:.2f}")
    if not all_ok:
        raise SystemExit("agreement check failed")


if __name__ == "__main__":
    main()
