"""Verifying an export: the written adapter (plain PEFT) or merged model against the checkpoint's own weights."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Union

import torch

from ..config import CLoRAConfig
from ..errors import CheckpointError
from .zero_reader import LORA_PARAM_RE

PathLike = Union[str, Path]


VERIFY_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}  # × max(1, max |logit|)


@dataclass
class Verification:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    tokens: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        return (f"max |Δlogit| = {self.max_abs_diff:.3g} over {self.tokens} random tokens (largest |logit| "
                f"{self.max_abs_logit:.3g}; tolerance {self.tolerance:.3g}): {'ok' if self.passed else 'FAILED'}")


@contextlib.contextmanager
def _quiet_model_loading() -> Iterator[None]:
    """No per-load progress bars from transformers while verifying (the converter prints its own lines)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _probe_inputs(vocab_size: int, n: int = 3, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def _with_lora(base, lora_weights: Mapping[str, torch.Tensor], clora: CLoRAConfig, where: PathLike):
    """``base`` wrapped in PEFT with exactly the checkpoint's LoRA weights set (the reference a result must match)."""
    from peft import get_peft_model

    modules = sorted({LORA_PARAM_RE.match(n).group("module") for n in lora_weights})
    adapter_name = LORA_PARAM_RE.match(next(iter(lora_weights))).group("adapter")
    model = get_peft_model(base, clora.peft_lora_config(modules), adapter_name=adapter_name).eval()
    params = dict(model.named_parameters())
    lora_params = {n for n in params if LORA_PARAM_RE.match(n)}
    if lora_params != set(lora_weights):
        raise CheckpointError(f"the LoRA parameters of {where} with these settings do not match the checkpoint's "
                              f"({len(lora_params)} vs {len(lora_weights)}, e.g. {sorted(lora_params ^ set(lora_weights))[:2]})")
    with torch.no_grad():
        for name, w in lora_weights.items():
            params[name].copy_(w)
    return model


def _written_logits(written: Path, merged: bool, full_base, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the result as a user loads it: the merged model, or plain PEFT on the full-precision base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with _quiet_model_loading(), torch.no_grad():
        model = (AutoModelForCausalLM.from_pretrained(str(written), dtype=torch.float32) if merged
                 else PeftModel.from_pretrained(full_base(), str(written))).eval()
        return model(input_ids=ids).logits


def verify_export(written: Path, lora_weights: Mapping[str, torch.Tensor], clora: CLoRAConfig, base_model: PathLike,
                  merged: bool, rel_tolerance: float, base_adapters=()) -> Verification:
    """Logits of the written adapter (loaded with plain ``PeftModel.from_pretrained``) or merged model, against
    the base with the checkpoint's fp32 LoRA weights set directly, on a few random inputs; fp32 throughout.
    ``base_adapters``: merged into the reference's base first (``merge_base_adapters``, training's own merge)."""
    from transformers import AutoModelForCausalLM

    with _quiet_model_loading():
        base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
        if base_adapters:
            from ..base_adapters import merge_base_adapters

            merge_base_adapters(base, list(base_adapters))
        reference = _with_lora(base, lora_weights, clora, base_model)
    ids = _probe_inputs(reference.config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    got = _written_logits(written, merged, lambda: reference.unload(), ids)
    largest = expected.abs().max().item()
    return Verification((got - expected).abs().max().item(), largest, rel_tolerance * max(1.0, largest), ids.numel())


def quantized_training_difference(written: Path, lora_weights: Mapping[str, torch.Tensor], clora: CLoRAConfig,
                                  base_model: PathLike, quantization: str, merged: bool) -> float:
    """max |Δlogit| between the written result (on the full-precision base) and what a QLoRA run trained: its LoRA
    weights on the 4-/8-bit base. The quantization error: reported, not a pass/fail check."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..model import keep_4bit_cpu_forward_as_trained

    if quantization.startswith("4-bit"):
        kind = quantization.split("(")[-1].rstrip(")") or "nf4"
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    with _quiet_model_loading():
        quantized = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32, quantization_config=q)
    keep_4bit_cpu_forward_as_trained(quantized)  # the forward the run trained with, for any shape, on any CPU
    trained = _with_lora(quantized, lora_weights, clora, base_model)
    ids = _probe_inputs(trained.config.vocab_size)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    got = _written_logits(written, merged, lambda: AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32), ids)
    return (got - expected).abs().max().item()
