"""The LoRA projection as one autograd Function, the scale folded into the GEMM (``--fused_lora``).

    x [N, in] ──► y = addmm(b, x, Wᵀ) ───────────────┐
       │                                            y.addmm_(xa, Bᵀ, alpha=s) ──► y [N, out]
       └──► xa = x·Aᵀ [N, r] ───────────────────────┘        (s = α/r: PEFT's scaling)

    backward (W, b frozen):  gb = g·B [N, r]
        ∂x = addmm(g·W, gb, A, alpha=s)    ∂A = s·gbᵀ·x [r, in]    ∂B = s·gᵀ·xa [out, r]

PEFT's ``lora.Linear`` computes the same y as ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``: three
modules, a scale multiply and an add, each a kernel launch and an autograd node, forward and backward. Here: three
GEMMs, one node, and it saves x and xa (the training dtype) besides references to W, A and B; nothing of s·B·xa.

Which layers: a PEFT ``lora.Linear`` over a plain ``nn.Linear`` whose LoRA dropout is 0, with no DoRA, no LoRA
bias, no fan_in_fan_out, a frozen W (``fused_lora_problem`` says why not otherwise; bitsandbytes 4-/8-bit bases are
PEFT's ``lora.bnb`` layers and keep PEFT's path). The layer's class becomes ``FusedLoraLinear``, a subclass: its
state dict, PEFT's save/load, merge and ``disable_adapter`` are PEFT's own; a call the fused math does not cover
(adapters disabled or merged, mixed adapter batches, several active adapters, mixed dtypes) goes to PEFT's forward.

ZeRO-3: a fused layer never calls ``lora_A`` / ``lora_B`` / ``base_layer``, so DeepSpeed's per-module hooks would
never gather their weights. Their parameters are registered as external parameters of the fused layer
(``deepspeed.zero.register_external_parameter``), so DeepSpeed gathers all four when the layer runs forward, again
before its backward (its pre-backward hook sits on the layer's output), and reduces their gradients per parameter as
usual: the coordinator, prefetch and release stay DeepSpeed's. (``GatheredParameters`` inside the forward would
gather outside that coordinator, synchronously, and not again for backward; a ZeRO-3 "leaf module" reduces its
gradients from a module backward hook that fires before the LoRA gradients exist when the layer's input needs no
gradient.) The CLoRA penalty of the layer's A and B is taken inside its forward, where they are gathered, and tapped
onto its output (``CLoRARegularizer.fused_penalty``): once per module and micro-batch, checkpointing or not.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from peft.tuners.lora import layer as lora_layer

FUSED_LORA_CHOICES = ("auto", "off")

# (A, B, y, training) -> y with the CLoRA penalty of this layer's A and B tapped onto it
PenaltyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


class FusedLoRAProjection(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for x [..., in], W [out, in], b [out] or None, A [r, in], B [out, r]."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float):
        x2 = x.reshape(-1, x.shape[-1])                         # [N, in]
        xa = x2 @ lora_a.t()                                    # [N, r]
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # [N, out]
        y.addmm_(xa, lora_b.t(), alpha=scale)
        ctx.save_for_backward(x, xa, weight, lora_a, lora_b)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1])                 # [N, out]
        x2 = x.reshape(-1, x.shape[-1])
        need_x, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        gb = g @ lora_b if (need_x or need_a) else None         # [N, r]
        grad_x = (g @ weight).addmm_(gb, lora_a, alpha=s).view(x.shape) if need_x else None
        grad_w = g.t() @ x2 if need_w else None                 # only if W is trained after all
        grad_bias = g.sum(0) if need_b and ctx.has_bias else None
        grad_a = (gb.t() @ x2).mul_(s) if need_a else None
        grad_lb = (g.t() @ xa).mul_(s) if need_lb else None
        return grad_x, grad_w, grad_bias, grad_a, grad_lb, None


class FusedLoraLinear(lora_layer.Linear):
    """PEFT's ``lora.Linear`` whose forward for one active adapter is ``FusedLoRAProjection`` (see the module doc)."""

    fused_adapter: str
    clora_penalty: Optional[PenaltyFn] = None

    def _fused_call(self, x, args, kwargs) -> bool:
        name = self.fused_adapter
        if args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != [name]:
            return False
        base = self.base_layer
        dtype = base.weight.dtype
        return (x.dtype == dtype and self.lora_A[name].weight.dtype == dtype and self.lora_B[name].weight.dtype == dtype
                and (base.bias is None or base.bias.dtype == dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self._fused_call(x, args, kwargs):
            return super().forward(x, *args, **kwargs)  # calls lora_A / lora_B: their own penalty hooks run there
        name = self.fused_adapter
        base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
        y = FusedLoRAProjection.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight, self.scaling[name])
        if self.clora_penalty is not None:
            y = self.clora_penalty(lora_a.weight, lora_b.weight, y, lora_a.training)
        return y


def fused_lora_problem(layer: torch.nn.Module, adapter: str) -> Optional[str]:
    """Why ``layer`` keeps PEFT's forward (None: it can be fused)."""
    if type(layer) is FusedLoraLinear:
        return None
    if type(layer) is not lora_layer.Linear:
        kind = type(layer).__module__ + "." + type(layer).__name__
        if ".bnb" in kind:
            return "bitsandbytes 4-/8-bit base (PEFT's lora.bnb layer; its base GEMM dequantizes)"
        return f"{kind} is not PEFT's lora.Linear"
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear:
        return f"the base layer is {type(base).__name__}, not torch.nn.Linear"
    if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity):
        return "LoRA dropout > 0 (--lora_dropout 0 fuses)"
    if adapter in layer.lora_variant or layer.use_dora.get(adapter, False):
        return "DoRA"
    if layer.lora_bias.get(adapter, False):
        return "a LoRA bias"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out weights"
    if base.weight.requires_grad:
        return "its base weight is trained"
    return None


def fuse_lora_layers(layers: Dict[str, torch.nn.Module], adapter: str,
                     penalties: Optional[Dict[str, PenaltyFn]] = None) -> Dict[str, List[str]]:
    """Turn every eligible ``lora.Linear`` of ``layers`` (name -> layer) into a ``FusedLoraLinear``, in place; call
    before ``deepspeed.initialize``. ``penalties``: name -> the CLoRA penalty its fused forward applies (the layer's
    lora_A / lora_B hooks no longer run). Returns {reason: [names]} of the layers that keep PEFT's forward."""
    kept: Dict[str, List[str]] = {}
    external = _external_parameter_registrar()
    for name, layer in layers.items():
        why = fused_lora_problem(layer, adapter)
        if why is not None:
            kept.setdefault(why, []).append(name)
            continue
        layer.__class__ = FusedLoraLinear
        layer.fused_adapter = adapter
        layer.clora_penalty = (penalties or {}).get(name)
        base = layer.get_base_layer()
        for param in (base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
            if param is not None:
                external(layer, param)
    return kept


def fused_lora_note(n_layers: int, kept: Dict[str, List[str]]) -> str:
    """One log line: how many LoRA layers run fused, and why the others keep PEFT's path."""
    fused = n_layers - sum(len(v) for v in kept.values())
    note = f"fused LoRA projection: {fused} of {n_layers} LoRA layers"
    if kept:
        note += "; PEFT's path for " + "; ".join(f"{len(names)} ({why}, e.g. {names[0]})" for why, names in kept.items())
    return note


def _external_parameter_registrar():
    """deepspeed.zero.register_external_parameter (a dict entry on the module; effective only under ZeRO-3)."""
    try:
        from deepspeed.zero import register_external_parameter
    except ImportError:  # no DeepSpeed, hence no ZeRO-3
        return lambda module, param: None
    return register_external_parameter
