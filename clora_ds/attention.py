"""Padding-free attention for packed rows under SDPA: one causal attention per packed sequence.

A packed row holds several examples back to back, with position_ids restarting at each one. transformers'
own SDPA path turns that into a dense block-diagonal [T, T] mask, so every row pays for T² scores, the
masked blocks included, and a masked SDPA cannot use the fused causal kernels. Here the row is cut into
its sequences instead, sequences of similar length are stacked into one batch (right-padded), and each
stack runs plain causal SDPA (``is_causal=True``): the work is Σ len² instead of T², as with
flash-attention's varlen kernels. Right padding needs no mask under causal attention: a real query only
sees keys at or before it, which are all real; the padded queries' outputs are dropped.

Registered with transformers as ``clora_packed_sdpa``; batches with a 2-D attention_mask (padded, not
packed) and unpacked rows go through transformers' SDPA unchanged. On CUDA in bf16/fp16, ``clora_packed_varlen``
runs packed rows through PyTorch's own flash varlen kernel (torch.nn.attention.varlen.varlen_attn) instead: one call
per layer over the cumulative sequence lengths, no flash-attn build needed.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import List, Optional, Tuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "clora_packed_sdpa"
PACKED_VARLEN = "clora_packed_varlen"
# a stack of sequences is padded to its longest; its attention work (Σ padded len²) may exceed the real
# work (Σ len²) by at most this factor, or it is split (few stacks = few kernel launches)
PAD_SLACK = 1.3
# sequences this short are stacked regardless: their attention is negligible next to the projections
SHORT = 32


class SegmentPlan:
    """Where the packed sequences of a [B, T] batch lie, grouped into stacks of similar length.

    stacks[i] = (index [n, L], keep [m]): flat token positions (b·T + t) of n sequences padded to L by
    repeating each one's last position, and where the m real tokens lie in the stack's flattened [n·L]
    output; ``order`` is the inverse permutation that puts the stacks' real outputs back in row order.
    Everything is an index tensor built once per forward, so the layers themselves never wait on the GPU
    (a boolean-mask select would synchronise once per stack and layer).
    """

    def __init__(self, stacks: List[Tuple[torch.Tensor, torch.Tensor]], order: torch.Tensor):
        self.stacks, self.order = stacks, order


def sequence_lengths(position_ids: torch.Tensor) -> List[int]:
    """Lengths of the sequences in the flattened [B, T] batch; a sequence starts at t = 0 and wherever
    position_ids[t] != position_ids[t-1] + 1 (the rule transformers uses to detect packing)."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts = start.flatten().nonzero().flatten()
    ends = torch.cat([starts[1:], starts.new_tensor([position_ids.numel()])])
    return (ends - starts).tolist()


def plan_segments(position_ids: torch.Tensor) -> Optional[SegmentPlan]:
    """The stacking plan, or None when every row is one sequence (plain causal SDPA is then exact)."""
    lengths = sequence_lengths(position_ids)
    if len(lengths) == position_ids.shape[0]:
        return None
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    by_len = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, group, real = [], [], 0
    for i in by_len:
        n = lengths[i]
        if group and n > SHORT and n * n * (len(group) + 1) > PAD_SLACK * (real + n * n):
            groups.append(group)
            group, real = [], 0
        group.append(i)
        real += n * n
    groups.append(group)

    stacks, positions = [], []
    for group in groups:
        longest = lengths[group[-1]]
        offs = torch.arange(longest)
        lens = torch.tensor([lengths[i] for i in group])
        index = torch.tensor([starts[i] for i in group])[:, None] + torch.minimum(offs[None, :], lens[:, None] - 1)
        valid = offs[None, :] < lens[:, None]
        keep = valid.flatten().nonzero().flatten()
        stacks.append((index.to(position_ids.device), keep.to(position_ids.device)))
        positions.append(index[valid])
    order = torch.argsort(torch.cat(positions)).to(position_ids.device)
    return SegmentPlan(stacks, order)


_last_plan: Tuple[Optional[weakref.ref], Optional[SegmentPlan]] = (None, None)


def _cached_plan(position_ids: torch.Tensor) -> Optional[SegmentPlan]:
    """One plan per forward: every layer (and a checkpointed recomputation) sees the same position_ids
    tensor; a weak reference never confuses it with a later tensor at the same address."""
    global _last_plan
    ref, plan = _last_plan
    if ref is None or ref() is not position_ids:
        plan = plan_segments(position_ids)
        _last_plan = (weakref.ref(position_ids), plan)
    return plan


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          position_ids: Optional[torch.Tensor] = None, **kwargs):
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None), like transformers' SDPA."""
    batch, heads, length, dim = query.shape
    packed = (attention_mask is None and position_ids is not None and key.shape[2] == length
              and position_ids.shape[-1] == length and length > 1)
    plan = _cached_plan(position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids) if packed else None
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    def flat(x):  # [B, H, T, D] -> [B·T, H, D]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    q, k, v = flat(query), flat(key), flat(value)
    outs = []
    for index, keep in plan.stacks:
        # [n, L, H, D] -> [n, H, L, D]; one causal SDPA over the stack
        out, _ = sdpa_attention_forward(module, q[index].transpose(1, 2), k[index].transpose(1, 2),
                                        v[index].transpose(1, 2), None, dropout=dropout, scaling=scaling,
                                        is_causal=True)
        outs.append(out.reshape(-1, heads, dim).index_select(0, keep))  # out [n, L, Hq, D] -> its real tokens
    out = torch.cat(outs).index_select(0, plan.order)
    return out.view(batch, length, heads, dim), None


_last_cu: Tuple[Optional[weakref.ref], Optional[tuple]] = (None, None)


def _cached_cu_seqlens(position_ids: torch.Tensor, batch: int):
    """(cu_seqlens int32 [N+1], longest) of a forward's packed sequences: computed (one host sync) at the first layer,
    reused by the others, which get the same position_ids tensor."""
    global _last_cu
    ref, value = _last_cu
    if ref is None or ref() is not position_ids:
        lengths = sequence_lengths(position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        value = (cu.to(position_ids.device), max(lengths))
        _last_cu = (weakref.ref(position_ids), value)
    return value


def varlen_available() -> bool:
    """torch's own flash varlen kernel (torch.nn.attention.varlen.varlen_attn) exists here and can run: CUDA."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def varlen_head_size_ok(head_dim: int) -> bool:
    """Head sizes the flash varlen kernel takes: multiples of 8 up to 256."""
    return head_dim % 8 == 0 and head_dim <= 256


@functools.lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_call(q, k, v, cu, longest, scaling):
    """varlen_attn, causal, across torch versions (window_size=(-1, 0) in torch >= 2.11, is_causal before; enable_gqa
    where it exists, else the key/value heads repeated; scale where it exists, else only the default 1/sqrt(d))."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-12:
        raise RuntimeError(f"this torch's varlen_attn has no scale argument and the model scales by {scaling}; "
                           f"use --attn_implementation sdpa")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # repeat the key/value heads for the query heads that share them
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kwargs)


def packed_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            position_ids: Optional[torch.Tensor] = None, **kwargs):
    """Packed rows through PyTorch's flash varlen kernel: one call over the cumulative sequence lengths of the whole
    batch (no grouping, no padding). query [B, Hq, T, D], key/value [B, Hkv, T, D] -> ([B, T, Hq, D], None).
    Anything else (a 2-D attention mask, unpacked rows, fp32, dropout, a head size the flash kernel does not take:
    not a multiple of 8 or over 256) goes through ``packed_sdpa_attention``."""
    batch, heads, length, dim = query.shape
    packed = (attention_mask is None and position_ids is not None and key.shape[2] == length
              and position_ids.shape[-1] == length and length > 1 and query.dtype in (torch.bfloat16, torch.float16)
              and query.is_cuda and varlen_head_size_ok(dim) and not (dropout and module.training))
    if not packed:
        return packed_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     position_ids=position_ids, **kwargs)
    cu, longest = _cached_cu_seqlens(position_ids, batch)

    def flat(x):  # [B, H, T, D] -> [B·T, H, D]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    out = _varlen_call(flat(query), flat(key), flat(value), cu, longest, scaling)
    return out.view(batch, length, heads, dim), None


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No dense mask for packed rows (the attention cuts them into sequences); SDPA's mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
AttentionInterface.register(PACKED_VARLEN, packed_varlen_attention)
AttentionMaskInterface.register(PACKED_VARLEN, packed_sdpa_mask)
