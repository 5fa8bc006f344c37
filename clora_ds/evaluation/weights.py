"""Weight-space metrics of a LoRA adapter, from its files alone (plus the base model's activations for F):

    ΔW_m = s·B_m·A_m with s = α/r (α/√r with rslora), as PEFT applies it; A [r, in], B [out, r]
    ‖ΔW‖_F = s·√tr((BᵀB)(AAᵀ))                  r×r products: ΔW [out, in] is never formed
    ‖ΔW‖_2 = s·σ_max(R_B R_Aᵀ)                  with the QRs B = Q_B R_B and Aᵀ = Q_A R_A
    F      = mean ‖ΔW·x‖/‖x‖                    over the tokens of N records, x = the module's input in the base model
    leakage_in = ‖A·P_in‖_F / ‖A‖_F,  leakage_out = ‖Bᵀ·P_out‖_F / ‖B‖_F   (P rebuilt from a clora_config.json)

Totals over the adapted modules: delta_w_fro = √Σ_m‖ΔW_m‖²_F, delta_w_spec = max_m ‖ΔW_m‖_2, F = the mean over
modules (every module sees the same tokens), leakage_in = √Σ_m‖A_m P_in,m‖²_F / √Σ_m‖A_m‖²_F, leakage_out likewise.
The CLoRA paper's Table 4 reports ‖ΔW‖ and F (LoRA 0.79 vs CLoRA k=2048 0.14 on LLaMA-2-7B).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..config import CLoRAConfig
from ..errors import CheckpointError

ADAPTER_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class AdapterFactors:
    """The LoRA factors of one adapter, in float64: module -> (A [r, in], B [out, r]) and each module's scale."""

    path: Path
    factors: Dict[str, tuple]
    scales: Dict[str, float]


def read_adapter(path: Path) -> AdapterFactors:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    expected = "expected a PEFT adapter directory (adapter_config.json and adapter_model.safetensors)"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; {expected}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; {expected}")
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    missing = [f.name for f in (config_file, weights_file) if not f.is_file()]
    if missing:
        pickled = (" (a pickled adapter_model.bin is not read: re-save it with safetensors)"
                   if weights_file.name in missing and (path / "adapter_model.bin").is_file() else "")
        raise CheckpointError(f"{path} is not a PEFT adapter: it has no {' and no '.join(missing)}{pickled}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: malformed JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object (PEFT's adapter settings), found a "
                              f"{type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path} is a {config.get('peft_type')} adapter; only LoRA adapters are evaluated here")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_file} is not a readable safetensors file ({str(err).splitlines()[0]}); "
                              "re-save the adapter (PeftModel.save_pretrained, or launch/convert_to_peft.py)") from None
    sides: Dict[str, dict] = {}
    for key, tensor in tensors.items():
        m = ADAPTER_KEY_RE.match(key)
        if m:
            sides.setdefault(m.group("module"), {})[m.group("side")] = tensor.double()
    broken = [m for m, s in sides.items() if set(s) != {"A", "B"}]
    if not sides or broken:
        raise CheckpointError(f"{weights_file} holds no complete LoRA pairs" + (f" (e.g. {broken[0]})" if broken else ""))
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    patterns = config.get("alpha_pattern") or {}
    scales = {}
    for module, s in sides.items():
        r = s["A"].shape[0]
        a = next((float(v) for k, v in patterns.items() if re.search(rf"(^|\.){k}$", module)), alpha)
        scales[module] = a / (math.sqrt(r) if rslora else r)
    return AdapterFactors(path, {m: (s["A"], s["B"]) for m, s in sides.items()}, scales)


def delta_w_norms(a: torch.Tensor, b: torch.Tensor, scale: float):
    """(‖ΔW‖_F, ‖ΔW‖_2) of ΔW = scale·B·A without forming it."""
    fro2 = torch.trace((b.T @ b) @ (a @ a.T)).clamp(min=0)
    r_b = torch.linalg.qr(b, mode="r")[1]
    r_a = torch.linalg.qr(a.T, mode="r")[1]
    spec = torch.linalg.matrix_norm(r_b @ r_a.T, ord=2)
    return scale * math.sqrt(fro2.item()), scale * spec.item()


def subspace_leakage(adapter: AdapterFactors, clora: CLoRAConfig, base_model=None, saved_subspaces=None):
    """module -> (‖A P_in‖², ‖A‖², ‖Bᵀ P_out‖², ‖B‖²), P rebuilt from ``clora`` for each module's shape (svd_* inits
    read the frozen W from ``base_model``); data-derived P (activations) is read from ``saved_subspaces`` (default:
    the adapter's own clora_subspaces.safetensors)."""
    from ..config import DATA_INITS
    from ..subspace import build_module_subspaces, load_subspaces, orthogonal_subspaces

    shapes = {m: (b.shape[0], a.shape[1]) for m, (a, b) in adapter.factors.items()}
    if clora.k > min(min(s) for s in shapes.values()):
        raise CheckpointError(f"the CLoRA settings' k={clora.k} is larger than a module of this adapter; give the "
                              "clora_config.json of a run on this base model")
    if clora.p_init == "orthogonal":
        subspaces = {name: (p_in, p_out) for name, p_in, p_out in orthogonal_subspaces(shapes, clora)}
    elif clora.p_init in DATA_INITS:
        subspaces = load_subspaces(saved_subspaces or adapter.path, shapes, clora)
    else:
        modules = dict(base_model.named_modules())
        subspaces = {m: build_module_subspaces(m, shapes[m], clora, weight=modules[m].weight.data) for m in shapes}
    out = {}
    for m, (a, b) in adapter.factors.items():
        p_in, p_out = (p.double() for p in subspaces[m])
        out[m] = ((a @ p_in).pow(2).sum().item(), a.pow(2).sum().item(), (b.T @ p_out).pow(2).sum().item(),
                  b.pow(2).sum().item())
    return out


@torch.no_grad()
def activation_ratios(base_model, tokenizer, texts: Sequence[str], adapters: Dict[str, AdapterFactors],
                      batch_size: int = 8) -> Dict[str, Dict[str, float]]:
    """adapter name -> module -> mean over tokens of ‖ΔW·x‖/‖x‖, x the module's input in ``base_model`` (eval mode),
    one pass over ``texts`` for all adapters. Inputs framed as in training ([bos] + tokens), no padding counted."""
    from ..evaluation.generation import length_batches

    modules = dict(base_model.named_modules())
    wanted = sorted({m for ad in adapters.values() for m in ad.factors})
    missing = [m for m in wanted if m not in modules]
    if missing:
        raise CheckpointError(f"the base model has no module {missing[0]} that the adapter adapts")
    sums = {name: {m: 0.0 for m in ad.factors} for name, ad in adapters.items()}
    count = 0
    mask_holder = {}

    def hook_for(module_name):
        def hook(module, inputs, output):
            x = inputs[0].double()  # [B, T, in]
            keep = mask_holder["mask"]
            x_norm = x.norm(dim=-1)
            for name, ad in adapters.items():
                if module_name not in ad.factors:
                    continue
                a, b = ad.factors[module_name]
                dx = ((x @ a.T.to(x.device)) @ b.T.to(x.device)) * ad.scales[module_name]  # ΔW x = s·B(A x)
                ratio = dx.norm(dim=-1) / x_norm.clamp(min=1e-30)
                sums[name][module_name] += ratio[keep].sum().item()
        return hook

    handles = [modules[m].register_forward_hook(hook_for(m)) for m in wanted]
    device = next(base_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        for chunk in length_batches([len(x) for x in ids], batch_size):
            longest = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for r, i in enumerate(chunk):
                input_ids[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = True
            mask_holder["mask"] = mask.to(device)
            base_model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {name: {m: v / max(count, 1) for m, v in per.items()} for name, per in sums.items()}


def weight_metrics(adapter: AdapterFactors, ratios: Optional[Dict[str, float]] = None,
                   leakage: Optional[Dict[str, tuple]] = None) -> dict:
    """The results layout's "weights" entry: totals and, under "modules", the same per module."""
    modules, fro2, spec = {}, 0.0, 0.0
    for m, (a, b) in sorted(adapter.factors.items()):
        f, s = delta_w_norms(a, b, adapter.scales[m])
        entry = {"delta_w_fro": f, "delta_w_spec": s, "F": ratios.get(m) if ratios else None}
        if leakage:
            ap, aa, bp, bb = leakage[m]
            entry.update(leakage_in=math.sqrt(ap / aa) if aa else 0.0, leakage_out=math.sqrt(bp / bb) if bb else 0.0)
        else:
            entry.update(leakage_in=None, leakage_out=None)
        modules[m] = entry
        fro2 += f * f
        spec = max(spec, s)
    total = {"delta_w_fro": math.sqrt(fro2), "delta_w_spec": spec,
             "F": sum(ratios[m] for m in modules) / len(modules) if ratios else None}
    if leakage:
        sums = [sum(v[i] for v in leakage.values()) for i in range(4)]
        total.update(leakage_in=math.sqrt(sums[0] / sums[1]) if sums[1] else 0.0,
                     leakage_out=math.sqrt(sums[2] / sums[3]) if sums[3] else 0.0)
    else:
        total.update(leakage_in=None, leakage_out=None)
    return {**total, "modules": modules}
