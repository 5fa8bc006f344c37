"""The causal-LM loss from the last hidden state, in chunks of tokens: never the full fp32 logits (``--chunked_loss``).

    loss = Σ_t CE(h_t·Wᵀ, y_t) / num_items_in_batch        h [n, H], W = lm_head.weight [V, H], y_t the next token

the same loss as transformers' ``ForCausalLMLoss`` (labels shifted by one, -100 ignored, the sum over label tokens
divided by ``num_items_in_batch``; the mean over label tokens without it) and the same gradients: each chunk's logits
are h_c·Wᵀ in the training dtype, upcast to float32 for the softmax (HF's ``logits.float()``), and the logit gradient
goes back through the GEMM in the training dtype, as autograd does for HF. Only the rows that carry a label enter the
GEMMs (prompt tokens and padding cost nothing here), and backward recomputes each chunk's logits, so forward and
backward each hold one chunk of ``chunk_rows × V`` fp32 logits at a time, not ``B·T × V`` (LLaMA-3's 128,256-token
vocabulary: 4 × 2,048 tokens are 4 GiB of fp32 logits, twice that with their gradient).

How it runs inside the model: ``ChunkedLossLinear`` replaces the output layer's class (an ``nn.Linear`` subclass:
same parameters, same state dict). Armed by ``ChunkedCausalLMLoss.targets(labels, num_items)`` for one forward, its
forward receives the last hidden state and returns the loss instead of the logits; the model hands it back as
``logits`` and the caller reads it from there. The loss is computed inside the output layer's own forward on
purpose: under ZeRO-3 that is where DeepSpeed has ``lm_head.weight`` gathered, and since the loss is that module's
output, DeepSpeed's pre-backward hook gathers the weight again before the loss's backward recomputes the chunks. Any
other forward (evaluation, generation, a forward with ``labels``) gets the ordinary logits.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

CHUNKED_LOSS_CHOICES = ("auto", "off")
IGNORE_INDEX = -100
CHUNK_LOGITS = 2**26  # logits per chunk (256 MiB in fp32): rows = CHUNK_LOGITS // vocabulary
# architectures whose CausalLM forward hands lm_head's output on unchanged (no logit scale or softcapping)
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(h_i·Wᵀ, y_i) / divisor for hidden [n, H], weight [V, H], labels [n] (all valid), in chunks of rows."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, divisor: float, chunk_rows: int):
        acc = _accumulate_dtype(hidden.dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[start:start + chunk_rows] @ weight.t()).to(acc)  # [c, V]: the one chunk held
            total += F.cross_entropy(logits, labels[start:start + chunk_rows], reduction="sum")
            del logits  # before the next chunk's GEMM allocates
        ctx.save_for_backward(hidden, weight, labels)
        ctx.divisor, ctx.chunk_rows = divisor, chunk_rows
        return total / divisor

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = _accumulate_dtype(hidden.dtype)
        scale = grad.to(acc) / ctx.divisor
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            h = hidden[start:start + ctx.chunk_rows]
            y = labels[start:start + ctx.chunk_rows]
            logits = (h @ weight.t()).to(acc)  # recomputed: [c, V]
            probs = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_()  # softmax in place
            probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0  # dCE/dlogits = softmax - onehot
            dlogits = probs.mul_(scale).to(hidden.dtype)
            if need_h:
                torch.mm(dlogits, weight, out=grad_h[start:start + ctx.chunk_rows])
            if need_w:
                grad_w += (dlogits.t() @ h).to(acc)
            del logits, probs, dlogits  # before the next chunk's GEMM allocates
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> the next-token target of every position, [B·T] (-100 at each row's end), as HF shifts them."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_items_in_batch: Optional[float] = None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """HF's causal-LM loss of ``labels`` [B, T] from the last hidden state [B, T, H] and the output layer's weight
    [V, H], ``chunk_rows`` label tokens at a time (default: CHUNK_LOGITS // V). A float32 (float64 for float64
    inputs) scalar: Σ token losses / num_items_in_batch, or their mean over label tokens without it."""
    targets = shift_labels(labels).to(hidden.device)
    rows = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)  # the rows that carry a loss (one device sync)
    divisor = float(num_items_in_batch) if num_items_in_batch is not None else float(max(rows.numel(), 1))
    chunk = chunk_rows or max(1, CHUNK_LOGITS // weight.shape[0])
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # [n, H]
    return ChunkedLinearCrossEntropy.apply(picked, weight, targets.index_select(0, rows), divisor, chunk)


class ChunkedLossLinear(torch.nn.Linear):
    """The output layer (see the module doc): while armed, ``forward(hidden)`` returns the chunked loss."""

    loss_targets: Optional[Tuple[torch.Tensor, Optional[float]]] = None
    chunk_rows: Optional[int] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.loss_targets is None:
            return super().forward(hidden)
        labels, num_items = self.loss_targets
        self.loss_targets = None  # one forward per arming: a recompute or an inner forward gets logits
        return chunked_causal_lm_loss(hidden, self.weight, labels, num_items, self.chunk_rows)


def chunked_loss_problem(model: torch.nn.Module) -> Optional[str]:
    """Why the chunked loss cannot serve ``model`` (a HF CausalLM, possibly inside PEFT); None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return (f"model type {model_type!r} is not one whose forward hands the output layer's result on unchanged "
                f"({', '.join(PLAIN_HEAD_MODEL_TYPES)})")
    head = base.get_output_embeddings()
    if type(head) not in (torch.nn.Linear, ChunkedLossLinear):
        return f"the output layer is {type(head).__name__}, not a plain torch.nn.Linear (adapted or quantized)"
    if head.bias is not None:
        return "the output layer has a bias"
    return None


class ChunkedCausalLMLoss:
    """The chunked loss installed on a model's output layer (``install``); ``loss(engine, batch, num_items)`` runs one
    forward and returns the task loss, what ``engine(**batch, num_items_in_batch=...).loss`` returns without it."""

    def __init__(self, head: ChunkedLossLinear):
        self.head = head

    @classmethod
    def install(cls, model: torch.nn.Module, chunk_rows: Optional[int] = None) -> "ChunkedCausalLMLoss":
        """Turn ``model``'s output layer into a ``ChunkedLossLinear`` in place (before ``deepspeed.initialize``)."""
        problem = chunked_loss_problem(model)
        if problem is not None:
            raise ValueError(f"chunked loss: {problem}; use --chunked_loss off")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings()
        head.__class__ = ChunkedLossLinear
        head.chunk_rows = chunk_rows
        return cls(head)

    @contextlib.contextmanager
    def targets(self, labels: torch.Tensor, num_items_in_batch: Optional[float]):
        """Arm the output layer for the next forward."""
        self.head.loss_targets = (labels, num_items_in_batch)
        try:
            yield
        finally:
            self.head.loss_targets = None

    def loss(self, model, batch: dict, num_items_in_batch: Optional[float], **kwargs) -> torch.Tensor:
        """The task loss of ``batch`` (input_ids, labels, ...) through ``model`` (a DeepSpeed engine or the model)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self.targets(batch["labels"], num_items_in_batch):
            out = model(**inputs, **kwargs)
        loss = out.logits
        if loss.dim() != 0:
            raise RuntimeError("chunked loss: the model's forward did not reach its output layer's loss mode (logits of "
                               f"shape {tuple(loss.shape)} came back); use --chunked_loss off")
        return loss


def causal_lm_loss(model, batch: dict, num_items_in_batch: Optional[float],
              chunked: Optional[ChunkedCausalLMLoss] = None) -> torch.Tensor:
    """The task loss of one micro-batch through ``model`` (a DeepSpeed engine or the model): HF's full-logits loss
    (``model(**batch, num_items_in_batch=...).loss``), or the chunked one when ``chunked`` is installed."""
    if chunked is None:
        return model(**batch, use_cache=False, num_items_in_batch=num_items_in_batch).loss
    return chunked.loss(model, batch, num_items_in_batch, use_cache=False)


def allocation_peak(fn) -> Tuple[int, int]:
    """(peak live bytes, largest single tensor in bytes) of what ``fn()`` allocates on the CPU (tensors alive before it
    are not counted), from torch.profiler's memory timeline: how bench/bench_fused.py and the tests measure the loss's
    memory on a machine without CUDA. (``_memory_profile`` is the private half of ``export_memory_timeline``.)"""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = largest = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += nbytes
            largest = max(largest, nbytes)
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak, largest
