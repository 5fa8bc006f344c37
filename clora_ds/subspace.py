"""Fixed subspaces P_in [in, k] and P_out [out, k] with orthonormal columns, one pair per adapted module.

P is a pure function of (seed, module name, shape, k, p_init): every process builds the same P with
no communication, and any later tool rebuilds it from the saved CLoRA settings. P is never a
parameter or a buffer, so it is never trained, never in ``state_dict()`` and never in an adapter file.

- ``orthogonal``: Q of the QR of a seeded Gaussian [dim, k], signs fixed by diag(R) > 0 (Haar).
- ``svd_major`` / ``svd_minor``: with W = U Σ Vᵀ ([out, in]), P_in = V[:, top/bottom k] and
  P_out = U[:, top/bottom k]. Bottom-k of the longer side includes W's null space when k exceeds
  the rank; that basis comes from a deterministic full SVD.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Tuple

import torch

from .config import CLoRAConfig


def subspace_seed(seed: int, module_name: str, shape: Tuple[int, int], k: int, p_init: str, side: str) -> int:
    """A stable 63-bit seed for one P (Python's ``hash`` is salted per process, sha256 is not)."""
    key = f"clora|{seed}|{module_name}|{shape[0]}x{shape[1]}|{k}|{p_init}|{side}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def seeded_gaussian(dim: int, k: int, seed: int) -> torch.Tensor:
    """[dim, k] float64 standard normal, always drawn on the CPU (generators differ across device types)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, k, generator=gen, dtype=torch.float64)


def orthonormalize(gauss: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """Q of the QR of ``gauss`` [dim, k] (on ``device``), signs fixed by diag(R) > 0: Haar over the Stiefel manifold."""
    q, r = torch.linalg.qr(gauss.to(device or "cpu"), mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def random_orthonormal(dim: int, k: int, seed: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """[dim, k] float64 with orthonormal columns, Haar-distributed; the QR may run on ``device`` for speed."""
    return orthonormalize(seeded_gaussian(dim, k, seed), device)


def default_subspace_threads() -> int:
    """CPU threads for drawing P: this process's share of its cores (ranks on one node split them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def orthogonal_subspaces(shapes: Dict[str, Tuple[int, int]], config: CLoRAConfig, device: Optional[torch.device] = None,
                         threads: Optional[int] = None) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, P_in [in, k], P_out [out, k]) for every module of ``shapes`` (name -> [out, in]), in sorted order.

    The same numbers as ``build_module_subspaces`` one module at a time, faster: the seeded Gaussians
    (the slow, single-threaded part: 0.9e9 draws for LLaMA-2-7B at k = 512) are drawn by ``threads``
    CPU threads, each with its own generator, at most 2·threads ahead of the QRs, which run here in order.
    """
    threads = threads or default_subspace_threads()
    names = sorted(shapes)
    jobs = [(name, side, dim) for name in names for side, dim in (("in", shapes[name][1]), ("out", shapes[name][0]))]
    k, dtype = config.k, config.torch_p_dtype

    def draw(job):
        name, side, dim = job
        return seeded_gaussian(dim, k, subspace_seed(config.seed, name, shapes[name], k, config.p_init, side))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        ahead = deque(pool.submit(draw, job) for job in jobs[: 2 * threads])
        pending = iter(jobs[2 * threads:])

        def next_p() -> torch.Tensor:  # the next Gaussian in job order, orthonormalized; one more draw queued
            gauss = ahead.popleft().result()
            job = next(pending, None)
            if job is not None:
                ahead.append(pool.submit(draw, job))
            return orthonormalize(gauss, device).to(dtype)

        for name in names:
            p_in = next_p()
            yield name, p_in, next_p()


def _fix_column_signs(basis: torch.Tensor) -> torch.Tensor:
    """Make each column's largest-magnitude entry positive, so SVD bases are reproducible."""
    idx = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[idx, torch.arange(basis.shape[1], device=basis.device)])
    signs[signs == 0] = 1.0
    return basis * signs


def svd_subspaces(weight: torch.Tensor, k: int, major: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P_in [in, k], P_out [out, k]) from the top (major) or bottom (minor) singular vectors of W [out, in]."""
    w = weight.detach().to(torch.float64)
    u, _, vh = torch.linalg.svd(w, full_matrices=True)  # u [out, out], vh [in, in], descending σ
    v = vh.transpose(0, 1)
    if major:
        p_in, p_out = v[:, :k], u[:, :k]
    else:
        p_in, p_out = v[:, -k:], u[:, -k:]
    return _fix_column_signs(p_in.contiguous()), _fix_column_signs(p_out.contiguous())


def build_module_subspaces(
    module_name: str,
    shape: Tuple[int, int],
    config: CLoRAConfig,
    weight: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P_in [in, k], P_out [out, k]) for the module ``module_name`` whose weight is [out, in] = ``shape``.

    ``weight`` (the full, gathered frozen W) is needed only for the svd_* inits.
    """
    out_features, in_features = shape
    k = config.k
    if config.p_init == "orthogonal":
        (_, p_in, p_out), = orthogonal_subspaces({module_name: shape}, config, device, threads=1)
        return p_in, p_out
    else:
        if weight is None or tuple(weight.shape) != tuple(shape):
            got = None if weight is None else tuple(weight.shape)
            raise ValueError(f"p_init={config.p_init} needs the full frozen weight {tuple(shape)} of {module_name}, got {got}")
        p_in, p_out = svd_subspaces(weight.to(device) if device is not None else weight, k, major=config.p_init == "svd_major")
    dtype = config.torch_p_dtype
    return p_in.to(dtype), p_out.to(dtype)


@dataclass
class ModuleSubspace:
    """The fixed pair for one adapted module. ``name`` is the base model's module name."""

    name: str
    p_in: torch.Tensor   # [in, k]
    p_out: torch.Tensor  # [out, k]

    def on(self, device: torch.device) -> "ModuleSubspace":
        """Move P to ``device`` once (in place) and return self: one copy per device, never a replica per step."""
        if self.p_in.device != device:
            self.p_in = self.p_in.to(device)
            self.p_out = self.p_out.to(device)
        return self


def subspace_nbytes(subspaces: Iterable[ModuleSubspace]) -> int:
    return sum(s.p_in.numel() * s.p_in.element_size() + s.p_out.numel() * s.p_out.element_size() for s in subspaces)


def count_subspace_numbers(shapes: Dict[str, Tuple[int, int]], k: int) -> int:
    """Numbers stored for per-module P_in and P_out at rank k: Σ (in + out)·k."""
    return sum((out_f + in_f) * k for out_f, in_f in shapes.values())
