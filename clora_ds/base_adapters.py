"""Earlier PEFT LoRA adapters, for sequential tasks (O-LoRA-style continual learning):

    task 1:  launch/train.py ... --output_dir T1
    task 2:  launch/train.py ... --base_adapters T1/adapter --clora_p_init adapters --clora_p_adapters T1/adapter

- ``--base_adapters DIR[,DIR...]`` (``merge_base_adapters``): merged into the base weights in memory at start-up,
  before the new adapter is created, per module W ← W + Σ_i s_i·B_i·A_i in the order given (float32 sums, stored once
  in W's dtype; s = α/r, α/√r for rsLoRA): the new adapter learns on top of the earlier ones, as it will be used.
  Under ZeRO-3 (the model is built partitioned under zero.Init) each weight is gathered whole, one module at a time,
  with rank 0 as the modifier: DeepSpeed re-partitions the merged W on leaving the context. Refused on a 4-/8-bit base:
  the merged weights would be quantized again, which loses the earlier adapters' update to the quantization error.
- ``--clora_p_init adapters`` (``adapter_spans``): for every adapted module m, P_in = an orthonormal basis of the row
  space of the adapters' lora_A [r, in] (all adapters' rows stacked), P_out = one of the column space of their lora_B
  [out, r], by SVD in float64: directions with σ <= SPAN_RTOL·σ_max do not count (rank-revealing, so a repeated or
  untrained adapter adds nothing). Fewer than k directions: the remaining columns come from the activations of
  --clora_p_data in the span's orthogonal complement (``distributed_eigen.job_subspace``); none given: refused. More
  than k: refused, not truncated: any k of them would leave directions the earlier adapters use unprotected, and the
  singular values of stacked factors do not rank those directions by importance (a LoRA A keeps its random init's
  scale); raise --clora_k to the span.

Adapters are read with safetensors and checked (``read_adapters``) before any model loads: a PEFT LoRA adapter
(adapter_config.json, adapter_model.safetensors), no DoRA, per-module ranks, bias or extra modules, every module a
linear layer of the base model with its shapes.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

SPAN_RTOL = 1e-6  # σ / σ_max at or below which a direction of the stacked factors is not part of the span
ADAPTER_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class LoraAdapter:
    """One earlier adapter: module -> (A [r, in], B [out, r]) in float32, and its scale s (ΔW = s·B·A)."""

    path: Path
    scale: float
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    fingerprint: str

    def record(self) -> dict:
        return {"path": str(self.path), "fingerprint": self.fingerprint}


def recorded_base_adapters(*directories: Path) -> Optional[List[dict]]:
    """The base adapters ({path, fingerprint}) a training run merged into its base, read from the first of
    ``directories`` whose train_config.json records a run ([] for none); None when none of them does."""
    from .run_dir import read_train_config

    for directory in directories:
        settings = read_train_config(Path(directory))
        if settings and "run" in settings:
            return list((settings.get("run") or {}).get("base_adapters") or [])
    return None


def same_adapter_files(recorded: List[dict], adapters: List["LoraAdapter"]) -> bool:
    """Whether ``adapters`` are the recorded ones: the same files (sha256) in the same order."""
    return [a.get("fingerprint") for a in recorded] == [a.fingerprint for a in adapters]


def adapter_paths(spec: Optional[str]) -> List[Path]:
    return [Path(part.strip()) for part in str(spec or "").split(",") if part.strip()]


def adapter_fingerprint(path: Path) -> str:
    h = hashlib.sha256(b"clora-adapter")
    for name in ADAPTER_FILES:
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        h.update(b"|")
    return "sha256:" + h.hexdigest()


def adapters_fingerprint(spec: Optional[str]) -> str:
    """One sha256 over the adapters' files, in order (what clora_config.json records of --clora_p_adapters)."""
    h = hashlib.sha256(b"clora-adapters")
    for path in adapter_paths(spec):
        h.update(adapter_fingerprint(path).encode() + b"|")
    return "sha256:" + h.hexdigest()


def read_adapter(path: Path, flag: str, linears: Mapping[str, Tuple[int, int]]) -> Tuple[Optional[LoraAdapter], List[str]]:
    """(the adapter, []) or (None, what is wrong with it); ``linears``: the base model's linear layers, name -> (out, in)."""
    from safetensors import SafetensorError, safe_open

    where = f"{flag} {path}"
    if not path.is_dir():
        return None, [f"{where}: no such directory; give the directory of a PEFT LoRA adapter (adapter_config.json, "
                      "adapter_model.safetensors), e.g. an earlier run's OUT/adapter"]
    missing = [n for n in ADAPTER_FILES if not (path / n).is_file()]
    if missing:
        pickled = " (only a pickled adapter_model.bin: re-save it with safetensors)" if (path / "adapter_model.bin").is_file() else ""
        return None, [f"{where}: not a PEFT adapter with safetensors weights, {', '.join(missing)} missing{pickled}"]
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, [f"{where}/adapter_config.json: malformed JSON ({err})"]
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        return None, [f"{where}: a {config.get('peft_type') if isinstance(config, dict) else 'non-PEFT'} adapter; only "
                      "LoRA adapters (peft_type LORA) can be merged or spanned"]
    unsupported = [text for key, text in (("use_dora", "DoRA (its magnitude vector is not B·A)"),
                                          ("fan_in_fan_out", "fan_in_fan_out (Conv1D weights)"),
                                          ("rank_pattern", "per-module ranks (rank_pattern)"),
                                          ("alpha_pattern", "per-module alphas (alpha_pattern)"),
                                          ("modules_to_save", "fully trained modules (modules_to_save)"),
                                          ("lora_bias", "a LoRA bias"))
                   if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        return None, [f"{where}: {', '.join(unsupported)} is not supported; a plain LoRA adapter (ΔW = (α/r)·B·A) is"]
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        return None, [f"{where}/adapter_config.json: r {r!r} and lora_alpha {alpha!r}; expected a positive integer and a number"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    sides: Dict[str, Dict[str, torch.Tensor]] = {}
    problems = []
    try:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            for key in sorted(f.keys()):
                m = ADAPTER_KEY_RE.match(key)
                if m is None:
                    return None, [f"{where}: {key} is not a LoRA factor of a linear layer (lora_A / lora_B); embedding "
                                  "LoRA and other tuners are not supported"]
                sides.setdefault(m.group("module"), {})[m.group("side")] = f.get_tensor(key).to(torch.float32)
    except SafetensorError as err:
        return None, [f"{where}/adapter_model.safetensors is not a readable safetensors file ({str(err).splitlines()[0]})"]
    if not sides:
        return None, [f"{where}: adapter_model.safetensors holds no LoRA factors"]
    factors = {}
    for module, pair in sides.items():
        if set(pair) != {"A", "B"}:
            problems.append(f"{where}: {module} has lora_{''.join(pair)} without lora_{'B' if 'A' in pair else 'A'}")
            continue
        a, b = pair["A"], pair["B"]
        if module not in linears:
            problems.append(f"{where}: adapts {module}, which is not a linear layer of the base model (another model's "
                            "adapter?)")
            continue
        out_f, in_f = linears[module]
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            problems.append(f"{where}: {module} lora_A {list(a.shape)} / lora_B {list(b.shape)}, expected [{r}, {in_f}] "
                            f"/ [{out_f}, {r}] (r = {r}; the base model's [out, in] = [{out_f}, {in_f}]): an adapter of "
                            "another model")
            continue
        factors[module] = (a, b)
    if problems:
        return None, problems[:3] + ([f"{where}: ... {len(problems) - 3} more"] if len(problems) > 3 else [])
    return LoraAdapter(path, scale, factors, adapter_fingerprint(path)), []


def read_adapters(spec: str, flag: str, linears: Mapping[str, Tuple[int, int]]) -> Tuple[List[LoraAdapter], List[str]]:
    """Each adapter of the comma-separated ``spec``, in order, and every problem with any of them."""
    adapters, problems = [], []
    paths = adapter_paths(spec)
    if not paths:
        return [], [f"{flag}: give one or more PEFT LoRA adapter directories, comma-separated"]
    for path in paths:
        adapter, found = read_adapter(path, flag, linears)
        problems += found
        if adapter is not None:
            adapters.append(adapter)
    return adapters, problems


def column_span(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [d, s] of the column space of ``columns`` [d, n] (float64 SVD; σ <= SPAN_RTOL·σ_max dropped),
    signs fixed like the SVD inits."""
    from .subspace import _fix_column_signs

    u, sigma, _ = torch.linalg.svd(columns.to(torch.float64), full_matrices=False)
    s = int((sigma > SPAN_RTOL * sigma.max()).sum()) if sigma.numel() and sigma.max() > 0 else 0
    return _fix_column_signs(u[:, :s].contiguous())


def adapter_spans(adapters: List[LoraAdapter], modules: List[str]) -> Dict[Tuple[str, str], torch.Tensor]:
    """(module, "in") -> the row space of the adapters' lora_A [in, s]; (module, "out") -> the column space of their
    lora_B [out, s] (modules an adapter does not adapt: that adapter adds nothing)."""
    spans = {}
    for name in modules:
        pairs = [adapter.factors[name] for adapter in adapters if name in adapter.factors]
        spans[(name, "in")] = column_span(torch.cat([a.T for a, _ in pairs], dim=1))   # [in, Σ r]
        spans[(name, "out")] = column_span(torch.cat([b for _, b in pairs], dim=1))    # [out, Σ r]
    return spans


def plan_adapter_spans(spec: str, targets: Mapping[str, Tuple[int, int]], linears: Mapping[str, Tuple[int, int]], k: int,
                       has_data: bool) -> Tuple[Optional[Dict[Tuple[str, str], torch.Tensor]], List[str]]:
    """(the spans of every adapted module, []) for --clora_p_init adapters, or (None, why they cannot be P)."""
    flag = "--clora_p_adapters"
    adapters, problems = read_adapters(spec, flag, linears)
    if problems:
        return None, problems
    uncovered = sorted(n for n in targets if not any(n in a.factors for a in adapters))
    if uncovered:
        return None, [f"{flag}: the adapters adapt none of {len(uncovered)} module(s) this run adapts (e.g. "
                      f"{', '.join(uncovered[:3])}), so P would hold nothing of theirs there; give adapters that adapt "
                      "every module of --target_modules, or leave those modules out of it"]
    spans = adapter_spans(adapters, sorted(targets))
    sizes = {key: q.shape[1] for key, q in spans.items()}
    over = sorted(key for key, s in sizes.items() if s > k)
    if over:
        worst = max(sizes[key] for key in over)
        return None, [f"{flag}: the adapters span more than --clora_k {k} directions in {len(over)} P(s) (up to {worst}, "
                      f"e.g. {over[0][0]} P_{over[0][1]}): keeping only k of them would leave directions they use "
                      f"unprotected; use --clora_k {worst} or more"]
    under = sorted(key for key, s in sizes.items() if s < k)
    if under and not has_data:
        shown = ", ".join(f"{name} P_{side} {sizes[(name, side)]}" for name, side in under[:4])
        return None, [f"{flag}: the adapters span fewer than --clora_k {k} directions in {len(under)} of {len(sizes)} "
                      f"P(s) ({shown}{', ...' if len(under) > 4 else ''}; from {min(sizes[u] for u in under)}): lower "
                      f"--clora_k to {min(sizes.values())}, or give --clora_p_data (general text) to complete P with the "
                      "activations' top directions outside the span"]
    return spans, []


def merge_base_adapters(model: torch.nn.Module, adapters: List[LoraAdapter]) -> int:
    """W ← W + Σ_i s_i·B_i·A_i for every module the ``adapters`` adapt, in their order (float32 sums, stored once in W's
    dtype), in place; returns the number of weights changed. Under ZeRO-3 every rank calls it: each W is gathered whole
    with rank 0 as the modifier and re-partitioned on leaving the context."""
    from .adapter import _is_partitioned

    modules = dict(model.named_modules())
    names = sorted({name for adapter in adapters for name in adapter.factors})
    for name in names:
        weight = modules[name].weight
        context = _modifiable([weight]) if _is_partitioned(weight) else None
        if context is not None:
            context.__enter__()
        try:
            merged = weight.data.to(torch.float32)
            for adapter in adapters:
                if name in adapter.factors:
                    a, b = adapter.factors[name]
                    merged = merged + (b.to(merged.device) @ a.to(merged.device)) * adapter.scale
            weight.data.copy_(merged.to(weight.dtype))
        finally:
            if context is not None:
                context.__exit__(None, None, None)
    return len(names)


def _modifiable(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
