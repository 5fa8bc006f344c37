import subprocess
import sys

import pytest
import torch

from clora_ds import CLoRAConfig
from clora_ds.subspace import build_module_subspaces, random_orthonormal, subspace_seed, svd_subspaces

from conftest import child_env


def _orth_err(p):
    p = p.double()
    return (p.T @ p - torch.eye(p.shape[1], dtype=torch.float64)).norm().item()


@pytest.mark.parametrize("p_init", ["orthogonal", "svd_major", "svd_minor"])
@pytest.mark.parametrize("shape", [(40, 72), (72, 40), (20, 40)])
def test_columns_orthonormal(p_init, shape):
    cfg = CLoRAConfig(k=7, p_init=p_init)
    w = torch.randn(*shape, dtype=torch.float64)
    p_in, p_out = build_module_subspaces("model.layers.0.mlp.up_proj", shape, cfg, weight=w)
    assert p_in.shape == (shape[1], 7) and p_out.shape == (shape[0], 7)
    assert p_in.dtype == torch.float32
    assert _orth_err(p_in) < 1e-5 and _orth_err(p_out) < 1e-5


def test_differs_across_modules_and_seeds_but_not_calls():
    cfg = CLoRAConfig(k=5, seed=1)
    a = build_module_subspaces("model.layers.0.self_attn.q_proj", (40, 40), cfg)
    again = build_module_subspaces("model.layers.0.self_attn.q_proj", (40, 40), cfg)
    other_module = build_module_subspaces("model.layers.1.self_attn.q_proj", (40, 40), cfg)
    other_seed = build_module_subspaces("model.layers.0.self_attn.q_proj", (40, 40), CLoRAConfig(k=5, seed=2))
    assert torch.equal(a[0], again[0]) and torch.equal(a[1], again[1])
    assert not torch.allclose(a[0], other_module[0], atol=1e-3)
    assert not torch.allclose(a[0], other_seed[0], atol=1e-3)
    assert not torch.allclose(a[0], a[1], atol=1e-3)  # P_in and P_out are independent draws


def test_seed_does_not_depend_on_global_rng():
    torch.manual_seed(0)
    a = random_orthonormal(30, 4, seed=99)
    torch.manual_seed(12345)
    torch.randn(100)
    b = random_orthonormal(30, 4, seed=99)
    assert torch.equal(a, b)


def test_identical_in_two_separate_processes():
    code = (
        "import torch, sys; from clora_ds import CLoRAConfig; from clora_ds.subspace import build_module_subspaces;"
        "p_in, p_out = build_module_subspaces('model.layers.3.mlp.down_proj', (40, 72), CLoRAConfig(k=9, seed=5));"
        "sys.stdout.write(repr(p_in.double().sum().item()) + ' ' + repr(p_out.double().pow(3).sum().item()))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True).stdout
        for _ in range(2)
    }
    assert len(outs) == 1
    p_in, p_out = build_module_subspaces("model.layers.3.mlp.down_proj", (40, 72), CLoRAConfig(k=9, seed=5))
    assert outs.pop() == f"{p_in.double().sum().item()!r} {p_out.double().pow(3).sum().item()!r}"


def _projector(p):
    p = p.double()
    return p @ p.T


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_svd_bases_span_singular_vectors(shape):
    torch.manual_seed(0)
    # W with well separated singular values, so the top/bottom-k spaces are well defined
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], dtype=torch.float64))
    n = min(shape)
    sigma = torch.linspace(10.0, 1.0, n, dtype=torch.float64)
    w = u[:, :n] @ torch.diag(sigma) @ v[:, :n].T
    k = 4
    top_in, top_out = svd_subspaces(w, k, major=True)
    assert torch.allclose(_projector(top_in), _projector(v[:, :k]), atol=1e-8)
    assert torch.allclose(_projector(top_out), _projector(u[:, :k]), atol=1e-8)
    bot_in, bot_out = svd_subspaces(w, k, major=False)
    # bottom-k: the k smallest-σ directions of each side (null space first where the side is longer)
    full_u, s, full_vh = torch.linalg.svd(w, full_matrices=True)
    assert torch.allclose(_projector(bot_in), _projector(full_vh.T[:, -k:]), atol=1e-8)
    assert torch.allclose(_projector(bot_out), _projector(full_u[:, -k:]), atol=1e-8)
    # ‖W P_in‖ and ‖P_outᵀ W‖ are largest for major, smallest for minor
    assert (w @ top_in).norm() > (w @ bot_in).norm()
    assert (top_out.T @ w).norm() > (bot_out.T @ w).norm()
    # bottom k of the shorter side are the k smallest nonzero σ: W maps them with exactly those σ
    if shape[0] > shape[1]:
        assert torch.allclose((w @ bot_in).norm(dim=0).sort().values, sigma[-k:].sort().values, atol=1e-8)


def test_seed_key_is_stable():
    # a change here silently changes every P ever built: bump it only with a migration note
    assert subspace_seed(0, "model.layers.0.self_attn.q_proj", (4096, 4096), 512, "orthogonal", "in") == 3834411163087007024
    assert subspace_seed(0, "a", (1, 2), 1, "orthogonal", "in") != subspace_seed(0, "a", (1, 2), 1, "orthogonal", "out")


@pytest.mark.parametrize("p_dtype", ["bfloat16", "float16", "float64"])
def test_p_dtype_option(p_dtype):
    p_in, p_out = build_module_subspaces("m", (24, 32), CLoRAConfig(k=4, p_dtype=p_dtype))
    assert p_in.dtype == getattr(torch, p_dtype) and p_out.dtype == getattr(torch, p_dtype)
    assert _orth_err(p_in) < (5e-2 if p_dtype != "float64" else 1e-12)


def test_threaded_build_draws_the_same_numbers():
    """orthogonal_subspaces (Gaussians drawn by a thread pool, a bounded window ahead) == the one-module definition."""
    from clora_ds.subspace import orthogonal_subspaces, seeded_gaussian

    shapes = {f"model.layers.{i}.{m}": s for i in range(3) for m, s in (("self_attn.q_proj", (40, 40)),
                                                                       ("self_attn.k_proj", (20, 40)), ("mlp.up_proj", (72, 40)))}
    cfg = CLoRAConfig(k=6, seed=7, p_dtype="bfloat16")
    serial = list(orthogonal_subspaces(shapes, cfg, threads=1))
    threaded = list(orthogonal_subspaces(shapes, cfg, threads=3))
    assert [n for n, _, _ in serial] == sorted(shapes) == [n for n, _, _ in threaded]
    for (name, p_in, p_out), (_, q_in, q_out) in zip(serial, threaded):
        assert torch.equal(p_in, q_in) and torch.equal(p_out, q_out)
        one = build_module_subspaces(name, shapes[name], cfg)
        assert torch.equal(one[0], p_in) and torch.equal(one[1], p_out) and p_in.dtype == torch.bfloat16
        seed = subspace_seed(7, name, shapes[name], 6, "orthogonal", "out")
        assert torch.equal(random_orthonormal(shapes[name][0], 6, seed).to(torch.bfloat16), p_out)
    assert not torch.equal(seeded_gaussian(40, 6, 1), seeded_gaussian(40, 6, 2))
