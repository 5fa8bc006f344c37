"""Fixed subspaces P_in [in, k] and P_out [out, k] with orthonormal columns, one pair per adapted module.

A seeded P is a pure function of (seed, module name, shape, k, p_init): every process builds the same P
with no communication, and any later tool rebuilds it from the saved CLoRA settings. P is never a
parameter or a buffer, so it is never trained, never in ``state_dict()`` and never in adapter_model.safetensors
(data-derived P has a file of its own, below).

- ``orthogonal``: Q of the QR of a seeded Gaussian [dim, k], signs fixed by diag(R) > 0 (Haar).
- ``svd_major`` / ``svd_minor``: with W = U Σ Vᵀ ([out, in]), P_in = V[:, top/bottom k] and
  P_out = U[:, top/bottom k]. Bottom-k of the longer side includes W's null space when k exceeds
  the rank; that basis comes from a deterministic full SVD.
- ``activations`` (data, not the seed): P_in = the top-k eigenvectors of the module inputs' second moment
  Σ x xᵀ, P_out those of its frozen outputs' Σ (W x)(W x)ᵀ, over calibration text (``clora_ds.calibration``
  computes them). ``adapters``: the span of earlier adapters' lora_A rows / lora_B columns (``clora_ds.base_adapters``),
  completed to k by the activations where it is smaller. Neither is a function of the seed, so saved whole, every column, in CLORA_SUBSPACES_NAME beside each
  checkpoint and adapter (``save_subspaces``) and loaded from there (``load_subspaces``), never recomputed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch

from .config import CLORA_SUBSPACES_NAME, DATA_INITS, CLoRAConfig
from .errors import CheckpointError


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


def top_eigenvectors(second_moment: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(the top-k eigenvectors [d, k] float64, every eigenvalue [d] descending) of a symmetric [d, d] second moment
    (any float dtype; the eigendecomposition runs in float64 where the matrix is), signs fixed like the SVD bases."""
    values, vectors = torch.linalg.eigh(second_moment.to(torch.float64))  # ascending
    return _fix_column_signs(vectors[:, -k:].flip(1).contiguous()), values.flip(0)


def build_module_subspaces(
    module_name: str,
    shape: Tuple[int, int],
    config: CLoRAConfig,
    weight: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
    saved: Optional[Union[str, Path]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P_in [in, k], P_out [out, k]) for the module ``module_name`` whose weight is [out, in] = ``shape``.

    ``weight`` (the full, gathered frozen W) is needed only for the svd_* inits; ``saved`` (the
    CLORA_SUBSPACES_NAME file of a checkpoint or adapter, or the directory holding it) for the data-derived ones.
    """
    out_features, in_features = shape
    k = config.k
    if config.p_init == "orthogonal":
        (_, p_in, p_out), = orthogonal_subspaces({module_name: shape}, config, device, threads=1)
        return p_in, p_out
    if config.p_init in DATA_INITS:
        if saved is None:
            raise ValueError(f"p_init={config.p_init} is read from its saved {CLORA_SUBSPACES_NAME}, and none was given")
        (p_in, p_out), = load_subspaces(saved, {module_name: shape}, config).values()
        return (p_in, p_out) if device is None else (p_in.to(device), p_out.to(device))
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


# ---------------------------------------------------------------------------------------------------
# data-derived P on disk: CLORA_SUBSPACES_NAME, whole (every column), "{module}.p_in" [in, k] / "{module}.p_out" [out, k]
# ---------------------------------------------------------------------------------------------------
def subspaces_path(saved: Union[str, Path]) -> Path:
    """The CLORA_SUBSPACES_NAME file itself, given it or the checkpoint / adapter directory that holds it."""
    saved = Path(saved)
    return saved / CLORA_SUBSPACES_NAME if saved.is_dir() else saved


def save_subspaces(path: Union[str, Path], subspaces: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
                   metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write module -> (P_in [in, k], P_out [out, k]) to ``path`` atomically (a temporary file renamed over it), in
    the dtype given: the saved bits are the ones training uses."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for name, (p_in, p_out) in subspaces.items():
        # clone: modules that share an input share one P_in tensor, and safetensors refuses shared storage
        tensors[f"{name}.p_in"] = p_in.detach().to("cpu").clone().contiguous()
        tensors[f"{name}.p_out"] = p_out.detach().to("cpu").clone().contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "clora_subspaces", **{k: str(v) for k, v in (metadata or {}).items()}})
    os.replace(tmp, path)
    return path


def load_subspaces(saved: Union[str, Path], shapes: Mapping[str, Tuple[int, int]], config: CLoRAConfig,
                   columns: Optional[slice] = None) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """module -> (P_in [in, k], P_out [out, k]) of ``shapes`` (name -> (out, in)) from a saved CLORA_SUBSPACES_NAME,
    only ``columns`` of each when given (a rank's shard: it reads just those). CheckpointError when the file is
    missing, unreadable, or lacks a module or has another shape than k columns of the module's dimensions."""
    from safetensors import SafetensorError, safe_open

    path = subspaces_path(saved)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: P of p_init={config.p_init} is computed from data once and saved "
                              f"beside every checkpoint and adapter as {CLORA_SUBSPACES_NAME}; copy it with the directory")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for name, (out_f, in_f) in shapes.items():
                pair = []
                for side, dim in (("p_in", in_f), ("p_out", out_f)):
                    key = f"{name}.{side}"
                    if key not in keys:
                        raise CheckpointError(f"{path} has no {key}: it was saved for other target modules "
                                              f"({len(keys) // 2} modules there, e.g. {sorted(keys)[0] if keys else 'none'})")
                    got = tuple(f.get_slice(key).get_shape())
                    if got != (dim, config.k):
                        raise CheckpointError(f"{path}: {key} is {list(got)}, expected [{dim}, {config.k}] (the module's "
                                              "dimension by k); it was saved for another model or k")
                    tensor = f.get_slice(key)[:, columns] if columns is not None else f.get_tensor(key)
                    pair.append(tensor.to(config.torch_p_dtype))
                out[name] = tuple(pair)
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); the file is "
                              "damaged") from None
    return out


def place_subspaces_file(source: Union[str, Path], directory: Union[str, Path]) -> Path:
    """Put the saved P ``source`` into ``directory`` as CLORA_SUBSPACES_NAME: a hard link where the filesystem allows
    (P is never modified in place, only replaced, so links are safe and a checkpoint costs no copy), else a copy;
    atomic either way."""
    source, target = Path(source), Path(directory) / CLORA_SUBSPACES_NAME
    if target.exists() and os.path.samefile(source, target):
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return target
