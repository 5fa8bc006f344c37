"""Padding-free attention for packed rows under SDPA: one causal attention per packed sequence.

A packed row holds several examples back to back, with position_ids restarting at each one. transformers'
own SDPA path turns that into a dense block-diagonal [T, T] mask, so every row pays for T² scores, the
masked blocks included, and a masked SDPA cannot use the fused causal kernels. Here the row is cut into
its sequences instead, sequences of similar length are stacked into one batch (right-padded), and each
stack runs plain causal SDPA (``is_causal=True``): the work is Σ len² instead of T², as with
flash-attention's varlen kernels. Right padding needs no mask under causal attention: a real query only
sees keys at or before it, which are all real; the padded queries' outputs are dropped.

Registered with transformers as ``clora_packed_sdpa``; batches with a 2-D attention_mask (padded, not
packed) and unpacked rows go through transformers' SDPA unchanged.
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "clora_packed_sdpa"
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


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No dense mask for packed rows (the attention cuts them into sequences); SDPA's mask otherwise."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
