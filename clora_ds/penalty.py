"""The fused subspace penalty  ½‖X·P‖²_F  and the wiring that puts λ·R into a backward pass.

For A = lora_A [r, in]:  X = A,  P = P_in  [in, k]
For B = lora_B [out, r]: X = Bᵀ, P = P_out [out, k]
R = Σ_m ½‖A_m P_in,m‖² + ½‖B_mᵀ P_out,m‖²  (DESIGN.md, "The method")

``SubspacePenalty`` keeps only M = X·P [r, k] for backward (dR/dX = M·Pᵀ), so it never re-reads X:
under ZeRO-3 the weight may be partitioned (shape [0]) by the time backward runs.

How the gradient reaches the weights (see ``adapter.py`` for the hooks):

    loss = task + PenaltyAnchor(λ·R)        anchor.backward stores g = d(root)/d(λR) in a PenaltyScale
    y_m  = PenaltyTap(lora_m(x), r_m)        tap.backward passes grad_y through and sends λ·g into r_m

The tap sits on the adapted module's own output, so the penalty gradient arrives in the same backward
pass and the same (re)computation as the module's task gradient: exactly once per micro-batch with
activation checkpointing (reentrant or not), and inside ZeRO's per-module gather window.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _compute_dtype(x: torch.Tensor, p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, p.dtype)


def _half_sq_norm(m: torch.Tensor) -> torch.Tensor:
    """½‖M‖²_F, accumulated in at least float32."""
    acc = torch.promote_types(m.dtype, torch.float32)
    return 0.5 * m.to(acc).pow(2).sum()


class SubspacePenalty(torch.autograd.Function):
    """½‖X·P‖²_F for X [r, d], P [d, k]; backward returns grad·M·Pᵀ from the saved M = X·P [r, k]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x, p)
        m = x.to(dtype) @ p.to(dtype)  # [r, k]
        ctx.save_for_backward(m, p)
        ctx.x_dtype = x.dtype
        return _half_sq_norm(m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m, p = ctx.saved_tensors
        # (P·(g·M)ᵀ)ᵀ, not g·M·Pᵀ: same numbers, but BLAS streams the tall P far faster this way round
        grad_x = (p.to(m.dtype) @ (m * grad.to(m.dtype)).transpose(0, 1)).transpose(0, 1)  # [r, d]
        return grad_x.to(ctx.x_dtype), None


def subspace_penalty(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """½‖X·P‖²_F with the fused backward; X [r, d], P [d, k]."""
    return SubspacePenalty.apply(x, p)


class GroupedSubspacePenalty(torch.autograd.Function):
    """Σ_g ½‖X_g·P_g‖²_F over G modules of equal shape in one bmm: P [G, d, k], X_g [r, d]."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(xs[0], p)
        m = torch.bmm(torch.stack([x.to(dtype) for x in xs]), p.to(dtype))  # [G, r, k]
        ctx.save_for_backward(m, p)
        ctx.x_dtypes = [x.dtype for x in xs]
        return _half_sq_norm(m)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m, p = ctx.saved_tensors
        grad_x = torch.bmm(m * grad.to(m.dtype), p.to(m.dtype).transpose(1, 2))  # [G, r, d]
        return (None, *(g.to(dt) for g, dt in zip(grad_x.unbind(0), ctx.x_dtypes)))


def grouped_subspace_penalty(p_stack: torch.Tensor, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return GroupedSubspacePenalty.apply(p_stack, *xs)


class PenaltyScale:
    """What one forward pass's penalty needs at backward time.

    ``grad`` is d(backward root)/d(λ·R) as seen by the anchor (it carries DeepSpeed's 1/GAS and any
    fp16 loss scale); the taps multiply the module penalties' gradient by it.
    """

    def __init__(self, lam: float):
        self.lam = lam
        self.collecting = True
        self.values: dict = {}
        self.tapped: set = set()  # modules whose gradient tap is already in this forward's graph
        self.grad: Optional[torch.Tensor] = None


class PenaltyAnchor(torch.autograd.Function):
    """Returns λ·R (a detached value); its backward records g = d(root)/d(λR)·λ into the PenaltyScale."""

    @staticmethod
    def forward(ctx, handle: torch.Tensor, value: torch.Tensor, scale: PenaltyScale) -> torch.Tensor:
        ctx.scale = scale
        return value.detach() * scale.lam

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # λ in float64: the loss may be float32 (transformers upcasts it) while the weights are not
        ctx.scale.grad = grad.detach().to(torch.float64) * ctx.scale.lam
        return None, None, None


class PenaltyTap(torch.autograd.Function):
    """Identity on a module output y; in backward also sends the captured λ·g into the penalty r."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, r: torch.Tensor, scale: PenaltyScale, where: str) -> torch.Tensor:
        ctx.scale, ctx.where = scale, where
        ctx.r_meta = (r.dtype, r.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        g = ctx.scale.grad
        if g is None:
            raise RuntimeError(
                f"CLoRA: backward reached {ctx.where} before the penalty term. Add "
                "`model.clora.penalty_term(loss)` to the loss of every training forward "
                "(or attach CLoRA with lam=0 for plain LoRA)."
            )
        dtype, device = ctx.r_meta
        return grad_y, g.to(device=device, dtype=dtype), None, None
