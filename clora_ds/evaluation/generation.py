"""Batched greedy generation and log-likelihood scoring, sharded over data-parallel ranks.

Generation: prompts framed as in training ([bos] prompt), left-padded into batches so every row ends at the same
position, greedy decoding with the KV cache, only the new tokens decoded. Batches are formed from all prompts sorted
by length (longest first: an out-of-memory shows at once), the same batches whatever the number of ranks, and dealt
round-robin to the ranks; the texts are gathered in the original order. So 1 or N processes give the same texts.

Scoring (multiple choice by log-likelihood, no generation, cheap and ZeRO-3-safe since every rank runs the same
number of forwards): each choice's continuation is scored by the sum of its tokens' log-probabilities after the
context, encoded as lm-evaluation-harness encodes a pair (trailing whitespace of the context moves to the
continuation; the continuation's tokens are those of the whole string after the context's), so the accuracy here
equals lm-eval's `acc` on the same items.
"""
from __future__ import annotations

import json
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..distributed import gather_texts, rank, world_size


def frame_prompt(tokenizer, prompt: str) -> List[int]:
    """[bos] + the prompt's tokens, as training frames an example (no eos: the model continues it)."""
    return [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def length_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Indices grouped into batches of similar length, longest first; independent of the number of ranks."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def gather_results(mine: List[Tuple[int, object]], n: int) -> list:
    """Every rank's (index, JSON-serialisable value) pairs -> the full list in index order, on every rank."""
    merged: list = [None] * n
    for text in gather_texts(json.dumps(mine)):
        for index, value in json.loads(text):
            merged[index] = value
    return merged


@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 32,
                    progress: Optional[Callable[[int], None]] = None, token_counts: Optional[list] = None) -> List[str]:
    """The greedy continuation of every prompt (new tokens only, special tokens skipped), sharded over ranks.
    ``token_counts``, when given, receives the number of tokens generated for each prompt (up to and with EOS)."""
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, use_cache=True)
    device = next(model.parameters()).device
    ids = [frame_prompt(tokenizer, p) for p in prompts]
    batches = length_batches([len(x) for x in ids], batch_size)
    mine = []
    for chunk in batches[rank()::world_size()]:
        longest = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every prompt ends at the last column
            input_ids[row, longest - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, longest - len(ids[i]):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config)
        new = out[:, longest:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        ended = (new == tokenizer.eos_token_id).int()
        counts = torch.where(ended.any(dim=1), ended.argmax(dim=1) + 1, torch.full_like(ended[:, 0], new.shape[1]))
        mine += [(i, [text, int(n)]) for i, text, n in zip(chunk, texts, counts.tolist())]
        if progress:
            progress(len(chunk) * world_size())
    results = gather_results(mine, len(prompts))
    if token_counts is not None:
        token_counts[:] = [n for _, n in results]
    return [text for text, _ in results]


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = True) -> Tuple[List[int], List[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM encodes a loglikelihood request."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if add_bos else []
    return bos + ctx, whole[len(ctx):]


SHARED_CONTEXT_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask


def attention_implementation(model) -> Optional[str]:
    """The attention implementation of a (PEFT-wrapped, DeepSpeed-wrapped) transformers model, or None."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine holds the model as .module
    config = getattr(inner, "config", None)
    return getattr(config, "_attn_implementation", None)


def context_groups(encoded: Sequence[Tuple[List[int], List[int]]]) -> List[List[int]]:
    """Indices of consecutive pairs that share their context tokens (a record's options), in order."""
    groups: List[List[int]] = []
    for i, (ctx, _) in enumerate(encoded):
        if groups and encoded[groups[-1][0]][0] == ctx:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def shared_context_row(ctx: List[int], conts: Sequence[List[int]]) -> Tuple[List[int], List[int], List[int]]:
    """One row for a context and its continuations: ids ctx + c_1 + ... + c_m, their positions (each continuation
    starts at len(ctx), as if it alone followed the context) and segments (0: the context, j: continuation j), from
    which a mask lets c_j see the context and its own earlier tokens only: every c_j scores as in its own row."""
    ids, pos, seg = list(ctx), list(range(len(ctx))), [0] * len(ctx)
    for j, cont in enumerate(conts, 1):
        ids += cont
        pos += range(len(ctx), len(ctx) + len(cont))
        seg += [j] * len(cont)
    return ids, pos, seg


def shared_context_mask(segments: Sequence[Sequence[int]], longest: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [rows, 1, longest, longest]: 0 where query i may see key j (j <= i and j is context or in
    i's own segment), the dtype's minimum elsewhere; a padding position sees itself only (no fully masked row, so no
    NaN that a later layer's values could carry)."""
    allowed = torch.zeros(len(segments), longest, longest, dtype=torch.bool)
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()
    for r, seg in enumerate(segments):
        s = torch.tensor(seg)
        n = len(seg)
        same = (s[:, None] == s[None, :]) | (s[None, :] == 0)
        allowed[r, :n, :n] = same & causal[:n, :n]
        allowed[r, n:, n:] = torch.eye(longest - n, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: Sequence[Tuple[str, str]], batch_size: int = 16,
                          device: Optional[torch.device] = None, share_context: Optional[bool] = None) -> List[float]:
    """Sum of log p(continuation | context) for each (context, continuation), sharded over ranks and gathered.

    Consecutive pairs with the same context (a multiple-choice record's options) are scored in ONE row, the context
    once and each continuation after it under a mask that hides the other continuations (shared_context_row), where
    the model's attention takes a 4D mask (sdpa, eager; ``share_context`` None = there); the scores equal one row
    per pair (tests/test_evaluation.py, float64) at a fraction of the tokens. Only the positions that predict a
    continuation token go through the output layer.

    Every rank runs the same number of forwards (a rank short of batches repeats one and drops its scores), so
    this is safe under ZeRO-3, where every forward gathers weights from all ranks. Rows are right-padded and
    attention is causal, so padding never changes a score.
    """
    device = device or next(model.parameters()).device
    encoded = [encode_pair(tokenizer, c, x) for c, x in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if share_context is None:
        share_context = attention_implementation(model) in SHARED_CONTEXT_ATTENTION
    groups = context_groups(encoded) if share_context else [[i] for i in range(len(encoded))]
    rows = [shared_context_row(encoded[g[0]][0], [encoded[i][1] for i in g]) for g in groups]
    batches = length_batches([len(ids) for ids, _, _ in rows], batch_size)
    per_rank = -(-len(batches) // world_size())
    mine_batches = batches[rank()::world_size()]
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    mine = []
    for j in range(per_rank):
        chunk, keep = (mine_batches[j], True) if j < len(mine_batches) else (batches[0], False)
        longest = max(len(rows[g][0]) for g in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        positions = torch.zeros((len(chunk), longest), dtype=torch.long)
        # (row, position predicting the token, token, pair index) for every continuation token of the batch
        wanted = []
        for r, g in enumerate(chunk):
            ids, pos, seg = rows[g]
            input_ids[r, :len(ids)] = torch.tensor(ids)
            positions[r, :len(ids)] = torch.tensor(pos)
            positions[r, len(ids):] = torch.arange(longest - len(ids)) + (pos[-1] + 1 if pos else 0)
            at = len(encoded[groups[g][0]][0])
            for i in groups[g]:
                cont = encoded[i][1]
                before = [at - 1 + t for t in range(len(cont))] if not share_context else \
                    [len(encoded[i][0]) - 1] + [at + t for t in range(len(cont) - 1)]
                wanted += [(r, b, tok, i) for b, tok in zip(before, cont)]
                at += len(cont)
        if share_context:
            mask = shared_context_mask([rows[g][2] for g in chunk], longest, dtype)
            inputs = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
        else:
            mask = (torch.arange(longest)[None, :] < torch.tensor([len(rows[g][0]) for g in chunk])[:, None]).long()
            inputs = {"attention_mask": mask.to(device)}
        keep_at = sorted({b for _, b, _, _ in wanted})
        column = {b: c for c, b in enumerate(keep_at)}
        logits = model(input_ids=input_ids.to(device), use_cache=False,
                       logits_to_keep=torch.tensor(keep_at, device=device), **inputs).logits
        if not keep:
            continue
        logp = torch.log_softmax(logits.float(), dim=-1)
        sums = {}
        for r, b, tok, i in wanted:
            sums[i] = sums.get(i, 0.0) + logp[r, column[b], tok].double().item()
        mine += sorted(sums.items())
    return gather_results(mine, len(pairs))


@torch.no_grad()
def text_nll(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> Tuple[float, int]:
    """(summed negative log-likelihood, tokens) of ``texts`` framed as [bos] + tokens, every token after bos
    predicted; sharded over ranks (per-text sums gathered), so the same for any number of ranks."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    mine = []
    for chunk in length_batches([len(x) for x in ids], batch_size)[rank()::world_size()]:
        longest = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for r, i in enumerate(chunk):
            input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
            mask[r, :len(ids[i])] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]
        target = input_ids[:, 1:].to(logp.device)
        token_nll = -logp.gather(-1, target[..., None])[..., 0] * mask[:, 1:].to(logp.device)
        mine += [(i, [token_nll[r].double().sum().item(), len(ids[i]) - 1]) for r, i in enumerate(chunk)]
    per_text = gather_results(mine, len(texts))
    return sum(n for n, _ in per_text), sum(k for _, k in per_text)
