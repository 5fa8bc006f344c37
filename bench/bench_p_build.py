"""Time to build the orthogonal P of every adapted module: one thread vs a pool drawing the Gaussians.

P is a pure function of the seed, so every rank builds all of it at start-up. For LLaMA-2-7B (q,k,v,up,down,
32 layers) at k = 512 that is 0.9e9 float64 Gaussian draws from seeded CPU generators, which torch draws on one
thread (~30 s seen on a lent H100's host before training could start), then 320 QRs (fast on a GPU).
``orthogonal_subspaces`` draws them with a thread pool; the numbers are identical (tests/test_subspace.py).
Both variants run in the same process, alternating, and the table gives each one's median.

    python bench/bench_p_build.py                              # CPU: 7B shapes, k = 64 (QR on the CPU)
    python bench/bench_p_build.py --device cuda --k 512        # a GPU box: QR on the GPU, draws dominate
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_p_memory import llama_shapes
from clora_ds.config import CLoRAConfig
from clora_ds.subspace import default_subspace_threads, orthogonal_subspaces


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="pool size (0: this process's share of the cores)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    shapes = llama_shapes(args.layers, 4096, 11008, 32, 32)
    cfg = CLoRAConfig(k=args.k)
    device = torch.device(args.device)
    pool = args.threads or default_subspace_threads()
    draws = sum((o + i) * args.k for o, i in shapes.values())

    def build(threads):
        start = time.perf_counter()
        for _ in orthogonal_subspaces(shapes, cfg, device, threads):
            pass
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    build(pool)  # warm-up (allocator, LAPACK / cuSOLVER handles)
    times = {1: [], pool: []}
    for _ in range(args.rounds):
        for threads in times:
            times[threads].append(build(threads))
    print(f"# orthogonal P for LLaMA-2-7B shapes ({args.layers} layers, {len(shapes)} modules, k = {args.k}, "
          f"{draws:,} draws), QR on {args.device}, torch {torch.__version__}, {args.rounds} rounds\n")
    print("| threads drawing | median s | min s | speedup |\n|---:|---:|---:|---:|")
    base = statistics.median(times[1])
    for threads, ts in times.items():
        print(f"| {threads} | {statistics.median(ts):.2f} | {min(ts):.2f} | {base / statistics.median(ts):.2f}× |")


if __name__ == "__main__":
    main()
