"""Data-derived P from second moments: reduce each sum to one owner rank, eigendecompose there in float64, broadcast.

One job per P to compute, (key, side): P = the top-k eigenvectors of its second moment S [d, d]; with a ``span`` Q
[d, s] (``--clora_p_init adapters``), P = [Q, C], C = the top-(k − s) eigenvectors of Π S Π, Π = I − Q Qᵀ (the moment
restricted to the span's orthogonal complement), or Q alone when s = k (no moment needed).

S of a job:  in:  S_in of the module's input group (modules fed the same tensor share one sum)
             out: W S_in Wᵀ (= Σ (W x)(W x)ᵀ exactly: the layer's output without its bias), W the frozen weight read on
                  the owner (gathered under ZeRO-3, dequantized for a 4-bit base); or, where W cannot be read
                  (``calibration.weight_readable``), the output sum the hooks accumulated.

An input group and every job that reads its S_in go to one owner (balanced by Σ d³), so S_in is reduced once and S_out
never exists as a sum during the calibration pass: at LLaMA-2-7B shapes the pass holds 18.4 GiB of input sums per rank
instead of 40.9 GiB of input and output sums (bench/bench_activation_p.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .subspace import orthonormalize, top_eigenvectors


@dataclass
class EigenJob:
    key: str    # the module whose P this is (activations' shared P_in: the input group's leader)
    side: str   # "in" | "out"
    dim: int
    group: str  # the input group's leader: the S_in this job reads; the job's owner is the group's
    span: Optional[torch.Tensor] = None  # [dim, s] float64, orthonormal: P's first s columns (p_init adapters)
    owner: int = 0

    def needs_moment(self, k: int) -> bool:
        return self.span is None or self.span.shape[1] < k


def assign_owners(jobs: List[EigenJob], world: int, k: int) -> List[EigenJob]:
    """Each input group (with every job reading its S_in) to the least-loaded rank, largest first (cost Σ d³ of its
    eigendecompositions): deterministic, so every rank agrees."""
    cost: Dict[str, float] = {}
    for job in jobs:
        cost[job.group] = cost.get(job.group, 0.0) + (float(job.dim) ** 3 if job.needs_moment(k) else float(job.dim))
    load, owner = [0.0] * world, {}
    for group in sorted(cost, key=lambda g: (-cost[g], g)):
        owner[group] = min(range(world), key=lambda r: (load[r], r))
        load[owner[group]] += cost[group]
    for job in jobs:
        job.owner = owner[job.group]
    return jobs


def owned_weights(jobs: List[EigenJob], layers: Dict[str, torch.nn.Module], rank: int) -> Dict[str, torch.Tensor]:
    """W [out, in] of each job's module that this rank owns: every rank gathers each W (ZeRO-3) in the jobs' order, so
    the collectives match; the owner keeps a copy (dequantized for a 4-bit base), the others let it go at once. The
    copies are this rank's share of the adapted weights, in their dtype."""
    from .adapter import _gathered, _is_partitioned, dequantized_weight

    kept = {}
    for job in jobs:
        layer = layers[job.key]
        with _gathered([layer.weight]):
            if job.owner == rank:
                w = dequantized_weight(layer)
                kept[job.key] = w.clone() if _is_partitioned(layer.weight) else w
    return kept


def job_subspace(moment: torch.Tensor, span: Optional[torch.Tensor], k: int) -> Tuple[torch.Tensor, float, float]:
    """(P [d, k] float64, energy, gap) of one second moment [d, d]: energy = tr(Pᵀ S P) / tr(S) (the moment's energy P
    holds), gap = λ_n / λ_n+1 of the n columns taken from the eigendecomposition (n = k − s with a span)."""
    s = moment.to(torch.float64)
    if span is None:
        p, values = top_eigenvectors(s, k)
        n = k
    else:
        q = span.to(s.device, torch.float64)
        n = k - q.shape[1]
        projected = s - q @ (q.T @ s)
        projected = projected - (projected @ q) @ q.T  # Π S Π, Π = I − Q Qᵀ
        c, values = top_eigenvectors((projected + projected.T) / 2, n)
        c = orthonormalize(c - q @ (q.T @ c), c.device)  # in the complement to float64 rounding, signs kept
        p = torch.cat([q, c], dim=1)
    trace = torch.diagonal(s).sum().clamp(min=1e-300)
    energy = ((p * (s @ p)).sum() / trace).item()
    gap = (values[n - 1] / values[n].clamp(min=1e-300)).item() if n < values.numel() else float("inf")
    return p, energy, gap


def eigen_subspaces(jobs: List[EigenJob], inputs: Dict[str, torch.Tensor], outputs: Dict[str, torch.Tensor], k: int,
                    receive: Callable[[str, str, torch.Tensor], None], layers: Dict[str, torch.nn.Module],
                    rank: int = 0, world: int = 1) -> Dict[Tuple[str, str], Tuple[float, float]]:
    """Hand ``receive(key, side, P [d, k] float64 on the CPU)`` each job's P, one at a time (so no rank holds every P in
    float64); returns {(key, side): (energy, gap)} (NaN for a job whose span is all of P). ``inputs``: S_in per input
    group, ``outputs``: the hook-summed S_out (this rank's share of each: summed over ranks here, and consumed);
    ``layers``: module -> its frozen base layer, for W. Collective: every rank calls it with the same jobs."""
    from .distributed import collective_device

    assign_owners(jobs, world, k)
    distributed = world > 1 and dist.is_initialized()
    owner = {j.group: j.owner for j in jobs} | {j.key: j.owner for j in jobs if j.side == "out"}
    needing = [j for j in jobs if j.needs_moment(k)]
    reads_input = {j.group for j in needing if j.side == "in" or j.key not in outputs}
    held: Dict[Tuple[str, str], torch.Tensor] = {}
    for side, sums, wanted in (("in", inputs, reads_input), ("out", outputs, {j.key for j in needing if j.side == "out"})):
        for key in sorted(sums):  # every rank's share summed on its owner; the others free theirs at once
            s = sums.pop(key)
            if key not in wanted:
                continue
            if distributed:
                dist.reduce(s, dst=owner[key])
            if owner[key] == rank:
                held[(side, key)] = s
    frozen = owned_weights([j for j in needing if j.side == "out" and j.key not in outputs], layers, rank)
    last_reader = {j.group: i for i, j in enumerate(jobs) if j.needs_moment(k)}
    results, stats = {}, torch.full((len(jobs), 2), float("nan"), dtype=torch.float64)
    for i, job in enumerate(jobs):
        if job.owner != rank:
            continue
        if not job.needs_moment(k):
            results[(job.key, job.side)] = job.span.to(torch.float64)
            continue
        if job.side == "in":
            moment = held[("in", job.group)]
        elif ("out", job.key) in held:
            moment = held.pop(("out", job.key))
        else:
            w = frozen.pop(job.key).to(torch.float64)  # [out, in]
            moment = w @ held[("in", job.group)].to(w.device, torch.float64) @ w.T  # [out, out]
        p, energy, gap = job_subspace(moment, job.span, k)
        del moment
        if last_reader[job.group] == i:
            held.pop(("in", job.group), None)
        results[(job.key, job.side)] = p.cpu()
        stats[i, 0], stats[i, 1] = energy, gap
    device = collective_device()
    for job in jobs:
        p = results.pop((job.key, job.side)).to(device) if job.owner == rank else \
            torch.empty(job.dim, k, dtype=torch.float64, device=device)
        if distributed:
            dist.broadcast(p, src=job.owner)
        receive(job.key, job.side, p.cpu())
    if distributed:
        mine = torch.tensor([j.owner == rank for j in jobs]).unsqueeze(1)
        stats = torch.where(mine, stats, torch.zeros_like(stats)).nan_to_num(nan=-1.0).to(device)
        dist.all_reduce(stats)  # each row is set on its owner only (-1: no moment)
        stats = stats.cpu()
        stats[stats == -1.0] = float("nan")
    return {(j.key, j.side): (stats[i, 0].item(), stats[i, 1].item()) for i, j in enumerate(jobs)}
