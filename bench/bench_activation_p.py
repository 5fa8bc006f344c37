"""Start-up cost of --clora_p_init activations at LLaMA-2-7B shapes: second-moment memory per rank and the
eigendecompositions, against one training step.

    python bench/bench_activation_p.py                          # 7B shapes, q,k,v,up,down, k 512; eigh of 4096² and 11008²
    python bench/bench_activation_p.py --sizes 4096       # time 4096² only; 11008² EXTRAPOLATED from it by d³
    python bench/bench_activation_p.py --sizes 64 --dtypes float64 --ranks 8   # the memory table; timings meaningless

Memory is counted, not measured: the calibration pass keeps one float32 sum per distinct module input (modules fed
the same tensor share one) and, only where W cannot be read (LLM.int8), one per module output, d² × 4 bytes each, on
every rank (each rank sums its share of the calibration rows; the sums are then reduced to one owner each). Both the
sharing and which outputs are summed are read from the real hooks (``clora_ds.calibration.SecondMoments``) run on a
one-layer tiny LLaMA with the same module layout. "before" is the layout that summed every module's output too (S_out
is now W S_in Wᵀ, formed on the owner rank at eigendecomposition time). The eigendecomposition
(``torch.linalg.eigh`` of a symmetric d × d matrix) is timed here, on this CPU, for each size of --sizes; a model size
not timed is EXTRAPOLATED from the largest timed one by d³ (and marked so); the model's total is EXTRAPOLATED from
those timings: (number of d × d jobs) × (time of one), split over W ranks (owners balanced by d³).
The 7B training step it is compared with is the H200 figure in bench/RESULTS.md ("The launcher", 7B shapes:
launch/train.py, bf16, ZeRO-2, 2 packed rows of ~1,900 tokens per micro-batch: 0.76 s per step), quoted, not
measured here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_shapes import LLAMA2_7B  # noqa: E402

H200_STEP_S = 0.76  # bench/RESULTS.md, "The launcher": 7B, launch/train.py, 2 packed rows/micro-batch (~3,800 tokens)
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def sharing_layout(targets):
    """({module suffix: the suffix whose input it shares}, {suffixes whose output is summed}) from the real hooks, on a
    one-layer tiny LLaMA; outputs summed where calibrate_subspaces sums them (``weight_readable`` false)."""
    from clora_ds import CLoRAConfig, attach_clora
    from clora_ds.adapter import PEFT_PREFIX
    from clora_ds.calibration import accumulate_second_moments, weight_readable
    from clora_ds.tiny import build_tiny_llama

    model = attach_clora(build_tiny_llama(64, num_hidden_layers=1), CLoRAConfig(k=2, p_init="activations", p_data="x",
                                                                                 target_modules=",".join(targets)))
    modules = dict(model.named_modules())
    layers = {n: modules[PEFT_PREFIX + n].get_base_layer() for n in model.clora.subspaces}
    summed = [n for n, layer in layers.items() if not weight_readable(layer)]
    with model.disable_adapter():
        moments = accumulate_second_moments(model, layers, [[1, 2, 3, 4]], 1, torch.device("cpu"), outputs=summed)
    suffix = lambda n: n.rsplit(".", 1)[-1]  # noqa: E731
    return {suffix(n): suffix(g) for n, g in moments.group.items()}, {suffix(n) for n in moments.outputs}


HIDDEN, INTER, LAYERS = LLAMA2_7B["hidden"], LLAMA2_7B["intermediate"], LLAMA2_7B["layers"]
DIMS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
        "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}  # (in, out) per layer; 7B has no GQA


def seven_b_dims(shares, summed_outputs):
    """Counter of the d × d second moments of the whole model: {d: how many}, inputs and (summed) outputs apart."""
    dims, layers = DIMS, LAYERS
    inputs = Counter(dims[m][0] for m in shares if shares[m] == m)
    outputs = Counter(dims[m][1] for m in shares if m in summed_outputs)
    return Counter({d: n * layers for d, n in inputs.items()}), Counter({d: n * layers for d, n in outputs.items()})


def time_eigh(d: int, dtype: torch.dtype, rounds: int) -> float:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(d, d, generator=gen, dtype=torch.float64)
    sym = (x @ x.T / d).to(dtype)  # positive semi-definite, like a second moment
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        torch.linalg.eigh(sym)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--sizes", default="4096,11008", help="matrix sizes to time (the model's are 4096 and 11008)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ranks", default="1,8", help="W to split the eigendecompositions over")
    args = ap.parse_args()

    shares, summed = sharing_layout(TARGETS)
    inputs, outputs = seven_b_dims(shares, summed)
    _, outputs_before = seven_b_dims(shares, set(shares))
    k = args.k
    print(f"# activations P at LLaMA-2-7B shapes ({LLAMA2_7B['layers']} layers, {', '.join(TARGETS)}, k = {k}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} cores, "
          f"loadavg {os.getloadavg()[0]:.2f}\n")
    print("shared inputs (from the hooks): " + ", ".join(f"{m} -> {g}" for m, g in sorted(shares.items())))
    print(f"outputs summed by hooks: {', '.join(sorted(summed)) or 'none'} (the others: S_out = W S_in Wᵀ on the owner)\n")
    print("| second moments | matrices (d: count) | float32 bytes per rank | GiB |\n|---|---|---:|---:|")
    totals = {}
    for label, dims in (("inputs (distinct)", inputs), ("outputs summed by hooks, now", outputs),
                        ("outputs summed by hooks, before (every module)", outputs_before)):
        nbytes = sum(n * d * d * 4 for d, n in dims.items())
        totals[label] = nbytes
        print(f"| {label} | {', '.join(f'{d}: {n}' for d, n in sorted(dims.items())) or '-'} | {nbytes:,} | {nbytes / 2**30:.1f} |")
    before = totals["inputs (distinct)"] + totals["outputs summed by hooks, before (every module)"]
    total = totals["inputs (distinct)"] + totals["outputs summed by hooks, now"]
    print(f"| total, every rank, during the pass, before | | {before:,} | {before / 2**30:.1f} |")
    print(f"| **total, every rank, during the pass, now** | | **{total:,}** | **{total / 2**30:.1f}** |")
    largest = max(list(inputs) + list(outputs_before))
    print(f"| + transient: one float64 product x xᵀ (d = {largest}) | | {largest ** 2 * 8:,} | {largest ** 2 * 8 / 2**30:.2f} |")
    out_d, in_d = max((o, i) for i, o in DIMS.values())
    w_share = LAYERS * sum(i * o for i, o in DIMS.values()) * 2 / 8
    print(f"| + after the pass, ZeRO-3 only: the owner's copies of its modules' W (bf16, 1/8 of them at W = 8) | | "
          f"{w_share:,.0f} | {w_share / 2**30:.2f} |")
    s_out = out_d ** 2 * 8 + out_d * in_d * 8
    print(f"| + transient on the owner: one float64 W S_in Wᵀ and W (d = {out_d}) | | {s_out:,} | {s_out / 2**30:.2f} |")
    p_bytes = LAYERS * sum(i + o for i, o in DIMS.values()) * k * 4
    print(f"| after: the whole P (float32), on rank 0 while it is written once | | {p_bytes:,} | {p_bytes / 2**30:.1f} |\n")

    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    timings = {}
    print("| eigh of a d × d symmetric matrix, this CPU | " + " | ".join(f"{str(t).replace('torch.', '')} s" for t in dtypes)
          + " |\n|---:|" + "---:|" * len(dtypes))
    for d in sizes:
        row = []
        for dtype in dtypes:
            timings[(d, dtype)] = time_eigh(d, dtype, args.rounds)
            row.append(f"{timings[(d, dtype)]:.2f}")
        print(f"| {d} | " + " | ".join(row) + " |", flush=True)
    jobs = inputs + outputs_before  # every module's P_out is an eigendecomposition, summed or W S_in Wᵀ
    for d in sorted(set(jobs) - set(sizes)):  # not timed: d³ from the largest timed size
        ref = max(sizes)
        for dtype in dtypes:
            timings[(d, dtype)] = timings[(ref, dtype)] * (d / ref) ** 3
        print(f"| {d} (EXTRAPOLATED from {ref} by d³) | " + " | ".join(f"{timings[(d, t)]:.0f}" for t in dtypes) + " |")
    if all((d, t) in timings for d in jobs for t in dtypes):
        print(f"\nEXTRAPOLATED to the model ({sum(jobs.values())} eigendecompositions: "
              f"{', '.join(f'{n} of {d}²' for d, n in sorted(jobs.items()))}), owners balanced by d³, against one 7B "
              f"training step on an H200 ({H200_STEP_S} s, bench/RESULTS.md):\n")
        print("| ranks W | " + " | ".join(f"{str(t).replace('torch.', '')} s per rank | steps" for t in dtypes)
              + " |\n|---:|" + "---:|---:|" * len(dtypes))
        for world in (int(w) for w in args.ranks.split(",")):
            cells = []
            for dtype in dtypes:
                load = [0.0] * world
                for d in sorted((d for d, n in jobs.items() for _ in range(n)), reverse=True):
                    load[load.index(min(load))] += timings[(d, dtype)]
                cells += [f"{max(load):,.0f}", f"{max(load) / H200_STEP_S:,.0f}"]
            print(f"| {world} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
