"""Per-sequence SDPA for packed rows (clora_ds.attention) against each sequence run on its own, in float64."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from clora_ds.attention import PACKED_SDPA, PAD_SLACK, SHORT, plan_segments, sequence_lengths
from clora_ds.batches import collate_packed


def _rows(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist(), "labels": [-100] * n} for n in row]
            for row in lengths]


@pytest.fixture(scope="module")
def models():
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(copy.deepcopy(cfg)).double()
    packed = LlamaForCausalLM(copy.deepcopy(cfg)).double()
    packed.load_state_dict(dense.state_dict())
    dense.set_attn_implementation("sdpa")
    packed.set_attn_implementation(PACKED_SDPA)
    return dense, packed


# rows of one very long + short sequences, many equal short ones, a row that is one sequence, trailing padding
LENGTHS = [[5, 70, 3, 17, 1, 9], [60, 2, 2, 8], [3] * 20, [40]]


def test_packed_rows_equal_each_sequence_alone(models):
    dense, packed = models
    rows = _rows(LENGTHS, 97)
    batch = collate_packed(rows, pad_id=0)
    ids, pos = batch["input_ids"], batch["position_ids"]
    out = packed(input_ids=ids, position_ids=pos, use_cache=False).logits
    with torch.no_grad():
        for b, row in enumerate(rows):
            t = 0
            for ex in row:
                n = len(ex["input_ids"])
                alone = dense(input_ids=ids[b:b + 1, t:t + n], use_cache=False).logits[0]
                assert (alone - out[b, t:t + n]).abs().max() < 1e-12, (b, t, n)
                t += n


def test_packed_gradients_equal_dense_block_mask(models):
    """Against transformers' own SDPA path (dense block-diagonal mask): same logits and parameter gradients."""
    dense, packed = models
    batch = collate_packed(_rows(LENGTHS, 97, seed=1), pad_id=0)
    for m in models:
        m.zero_grad()
        logits = m(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        (logits.sin() * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        m.logits = logits.detach()
    assert (dense.logits - packed.logits).abs().max() < 1e-12
    for (name, p), q in zip(dense.named_parameters(), packed.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-10 * (1 + p.grad.abs().max()), name


def test_padded_and_plain_batches_are_plain_sdpa(models):
    dense, packed = models
    ids = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    with torch.no_grad():
        for kw in ({"attention_mask": mask}, {}):
            a, b = dense(input_ids=ids, use_cache=False, **kw).logits, packed(input_ids=ids, use_cache=False, **kw).logits
            assert (a - b)[mask.bool()].abs().max() < 1e-12


def test_plan_covers_every_token_once_with_bounded_padding():
    rows = _rows([[700, 30, 31, 29, 2, 5, 120, 118, 64], [1000, 40, 3], [12] * 50], 50, seed=3)
    pos = collate_packed(rows, pad_id=0)["position_ids"]
    lengths = sequence_lengths(pos)
    assert sum(lengths) == pos.numel()
    plan = plan_segments(pos)
    seen = torch.cat([index.flatten()[keep] for index, keep in plan.stacks])
    assert sorted(seen.tolist()) == list(range(pos.numel()))
    assert torch.equal(seen[plan.order], torch.arange(pos.numel()))
    for index, keep in plan.stacks:
        valid = torch.zeros(index.numel(), dtype=torch.bool)
        valid[keep] = True
        lens = valid.view(index.shape).sum(1)
        padded, real = index.numel() * index.shape[1], int((lens ** 2).sum())
        assert lens.max() <= SHORT or padded <= PAD_SLACK * real + 1e-9, (index.shape, lens.tolist())
    assert len(plan.stacks) < len(lengths) / 3  # similar lengths share one kernel call
    one_per_row = collate_packed(_rows([[10], [7]], 50), pad_id=0)["position_ids"]
    assert plan_segments(one_per_row) is None
