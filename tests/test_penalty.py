"""The fused Function against a float64 plain-autograd reference of ½‖X P‖²."""
import pytest
import torch

from clora_ds.penalty import GroupedSubspacePenalty, SubspacePenalty, grouped_subspace_penalty, subspace_penalty
from clora_ds.subspace import random_orthonormal


def _reference(x, p):
    x64 = x.detach().double().requires_grad_(True)
    val = 0.5 * (x64 @ p.double()).pow(2).sum()
    val.backward()
    return val.detach(), x64.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape", [(4, 40, 7), (8, 72, 13), (1, 33, 33)])
def test_fp64_value_and_grad(shape):
    r, d, k = shape
    torch.manual_seed(0)
    x = torch.randn(r, d, dtype=torch.float64, requires_grad=True)
    p = random_orthonormal(d, k, seed=1)
    val = subspace_penalty(x, p)
    val.backward(torch.tensor(0.37, dtype=torch.float64))
    ref_val, ref_grad = _reference(x, p)
    assert _rel(val, ref_val) < 1e-10
    assert _rel(x.grad, 0.37 * ref_grad) < 1e-10


def test_bf16_weights_with_fp32_and_bf16_p():
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    p = random_orthonormal(64, 16, seed=2)
    ref_val, ref_grad = _reference(x, p)
    for p_stored in (p.float(), p.bfloat16()):
        x.grad = None
        val = subspace_penalty(x, p_stored)
        val.backward()
        assert x.grad.dtype == torch.bfloat16
        assert _rel(val, ref_val) < 1e-2
        assert _rel(x.grad, ref_grad) < 1e-2


def test_transposed_input_for_lora_b():
    torch.manual_seed(0)
    b = torch.randn(72, 4, dtype=torch.float64, requires_grad=True)  # lora_B [out, r]
    p_out = random_orthonormal(72, 9, seed=3)
    subspace_penalty(b.t(), p_out).backward()
    ref = b.detach().clone().requires_grad_(True)
    (0.5 * (ref.t() @ p_out).pow(2).sum()).backward()
    assert _rel(b.grad, ref.grad) < 1e-12


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    p = random_orthonormal(11, 5, seed=4)
    assert torch.autograd.gradcheck(SubspacePenalty.apply, (x, p))


def test_backward_never_reads_x_again():
    """ZeRO-3 frees a weight to shape [0] after its module's forward; backward must not need it."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 20, dtype=torch.float64))
    p = random_orthonormal(20, 6, seed=5)
    expected = (w.detach() @ p) @ p.T
    val = subspace_penalty(w, p)
    w.data = torch.empty(0, dtype=torch.float64)  # what partitioning does to param.data
    # autograd validates the grad shape against the forward-time metadata, not the current data
    (gx,) = torch.autograd.grad(val, [w])
    assert gx.shape == (4, 20)
    assert _rel(gx, expected) < 1e-12


def test_grouped_equals_per_module():
    torch.manual_seed(0)
    g, r, d, k = 5, 4, 48, 8
    xs = [torch.randn(r, d, dtype=torch.float64, requires_grad=True) for _ in range(g)]
    ps = torch.stack([random_orthonormal(d, k, seed=10 + i) for i in range(g)])
    grouped = grouped_subspace_penalty(ps, xs)
    grouped.backward()
    grads = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    sum(subspace_penalty(x, ps[i]) for i, x in enumerate(xs)).backward()
    assert _rel(grouped, sum(_reference(x, ps[i])[0] for i, x in enumerate(xs))) < 1e-12
    for got, x in zip(grads, xs):
        assert _rel(got, x.grad) < 1e-12
    small = tuple(x.detach()[:, :12].clone().requires_grad_(True) for x in xs[:2])
    p_small = torch.stack([random_orthonormal(12, 3, seed=20 + i) for i in range(2)])
    assert torch.autograd.gradcheck(lambda *a: GroupedSubspacePenalty.apply(p_small, *a), small)
