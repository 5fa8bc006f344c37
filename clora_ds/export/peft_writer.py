"""Writing a PEFT adapter: the one writer (the converter, the launcher's final OUT/adapter and save_clora_adapter
all call ``export_peft_adapter``), its model card, and the staged directory every export writes into.

Results are written into a temporary sibling directory and renamed into place, so a failure never leaves a
partial result and an existing result is replaced only by a complete one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Union

import torch

from ..config import CLORA_SUBSPACES_NAME, DATA_INITS, CLoRAConfig
from ..errors import CheckpointError, OutputExistsError
from ..run_dir import METRICS_FILE, read_metrics, read_train_config, read_json, STATE_FILE
from .zero_reader import LORA_PARAM_RE, CheckpointLayout

PathLike = Union[str, Path]


@dataclass
class TrainingRecord:
    """What is known about the training that produced some LoRA weights (None: not recorded)."""

    base_model: Optional[str] = None
    train_file: Optional[str] = None
    dtype: Optional[str] = None  # fp32 | bf16 | fp16: the training precision
    step: Optional[int] = None
    epoch: Optional[float] = None
    last_loss: Optional[float] = None
    world_size: Optional[int] = None
    zero_stage: Optional[int] = None
    source: Optional[str] = None
    quantization: Optional[str] = None  # "4-bit (nf4)" / "8-bit": the base the adapter was trained against
    base_adapters: Optional[str] = None  # --base_adapters: earlier adapters merged into the base before training



def _last_loss(metrics: Path, step: Optional[int]) -> Optional[float]:
    """The task loss logged at ``step`` (or the last one before it)."""
    if step is None:
        return None
    losses = {s: row["task_loss"] for (s, _), row in read_metrics(metrics).items() if "task_loss" in row and s <= step}
    return losses[max(losses)] if losses else None


def read_training_record(layout: CheckpointLayout) -> TrainingRecord:
    """From the checkpoint's own files, or its run directory's (train_config.json, metrics.jsonl)."""
    tag_dir = layout.directory
    settings = read_train_config(tag_dir) or read_train_config(tag_dir.parent) or {}
    arguments = settings.get("arguments", {})
    state = read_json(tag_dir / STATE_FILE) or {}
    step = state.get("step", layout.global_steps)
    dtype = None
    if arguments:
        dtype = "bf16" if arguments.get("bf16") else "fp16" if arguments.get("fp16") else "fp32"
    quantization = (f"4-bit ({arguments.get('bnb_4bit_quant_type', 'nf4')})" if arguments.get("load_in_4bit")
                    else "8-bit" if arguments.get("load_in_8bit") else None)
    return TrainingRecord(base_model=arguments.get("model_name_or_path"), train_file=arguments.get("train_file"), dtype=dtype,
                          step=step, epoch=state.get("epoch"), last_loss=_last_loss(tag_dir.parent / METRICS_FILE, step),
                          world_size=layout.world_size, zero_stage=layout.zero_stage, source=str(tag_dir),
                          quantization=quantization, base_adapters=arguments.get("base_adapters"))


@contextlib.contextmanager
def staged_directory(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``output_dir`` to write into; renamed to ``output_dir`` only if the block succeeds."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(f"{output_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the result is an ordinary directory
    old = None
    try:
        yield tmp
        if output_dir.exists():
            old = output_dir.parent / f"{tmp.name}.old"
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def peft_file_key(param_name: str, adapter_name: str = "default") -> str:
    """PeftModel parameter name -> key in adapter_model.safetensors (PEFT drops the adapter name:
    ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``), by PEFT's own rule."""
    from peft.tuners.lora import LoraModel

    if hasattr(LoraModel, "_remove_adapter_name_from_key"):  # peft >= 0.18
        return LoraModel._remove_adapter_name_from_key(param_name, adapter_name)
    return param_name.replace(f".{adapter_name}", "")  # what get_peft_model_state_dict did before


def _module_summary(modules: List[str]) -> str:
    kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return f"{', '.join(kinds)} ({len(modules)} modules)"


def model_card(record: TrainingRecord, clora: CLoRAConfig, modules: List[str], weights_note: str, merged: bool = False) -> str:
    """README.md for an exported adapter or merged model: what it is, how it was trained, how to load it."""
    base = record.base_model or "the base model it was trained on"
    unknown = "not recorded"
    front = ["---"]
    if record.base_model:
        front.append(f"base_model: {record.base_model}")
    front += ([] if merged else ["library_name: peft"]) + ["pipeline_tag: text-generation", "tags:", "- lora", "- clora"]
    front += ([] if merged else ["- peft"]) + ["---", ""]
    what = "merged model" if merged else "adapter"
    saved_p = (f"fixed P from the earlier adapters' spans, saved in {CLORA_SUBSPACES_NAME}" if clora.p_init == "adapters"
               else f"fixed P from the base model's activations, saved in {CLORA_SUBSPACES_NAME}" if clora.p_init in DATA_INITS
               else "fixed P, orthonormal columns, rebuilt from clora_config.json, never saved")
    lines = [f"# CLoRA {what} for {base}", "",
             "Trained with clora_ds: LoRA plus the CLoRA subspace regularizer "
             f"R = Σ ½‖A P_in‖² + ½‖Bᵀ P_out‖² ({saved_p}), which keeps the update "
             "out of a k-dimensional subspace so the model forgets less.", ""]
    if merged:
        lines += ["The update (α/r)·B·A is merged into the base weights: load it like any model,", "", "```python",
                  "from transformers import AutoModelForCausalLM", "", 'model = AutoModelForCausalLM.from_pretrained("PATH")', "```", ""]
    else:
        lines += ["A plain PEFT LoRA adapter: no clora_ds import is needed to use it.", "", "```python",
                  "from transformers import AutoModelForCausalLM", "from peft import PeftModel", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{record.base_model or "BASE_MODEL"}")',
                  'model = PeftModel.from_pretrained(base, "PATH")', "```", ""]
    if record.base_adapters and merged:
        lines += [f"The earlier adapters the run trained on ({record.base_adapters}, --base_adapters) are merged too, "
                  "before this one: the weights are the base it was trained on plus its own update.", ""]
    if record.base_adapters and not merged:
        lines += [f"Trained on the base with earlier adapters merged into it ({record.base_adapters}, in that order; "
                  "--base_adapters): use it on that merged base, e.g. `base = PeftModel.from_pretrained(base, "
                  "EARLIER).merge_and_unload()` for each earlier adapter in order, then load this one.", ""]
    if record.quantization:
        lines += [f"QLoRA: the adapter was trained on a {record.quantization} base (bitsandbytes), so it learned to correct "
                  "the dequantized weights. Loading it on that quantized base reproduces training; "
                  + ("this merged model applies the update to the unquantized weights instead, which differ from the "
                     "dequantized ones by the quantization error (the converter's --verify reports the logit difference)."
                     if merged else "on the full-precision base it sees weights that differ by the quantization error."),
                  ""]
    steps = unknown if record.step is None else f"{record.step}" + ("" if record.epoch is None else f" (epoch {record.epoch:.3g})")
    parallel = unknown if record.world_size is None else f"{record.world_size} rank(s), ZeRO-{record.zero_stage}"
    rows = [("base model", record.base_model or unknown), ("training data", record.train_file or unknown),
            ("LoRA r / α", f"{clora.r} / {clora.alpha:g} (update (α/r)·B·A, dropout {clora.dropout:g})"),
            ("target modules", _module_summary(modules)),
            ("CLoRA k / λ", f"{clora.k} / {clora.lam:g} (P init {clora.p_init}, "
             + (f"the span of {clora.p_adapters}" + (f", completed from {clora.p_data}" if clora.p_data else "")
                + f"; {CLORA_SUBSPACES_NAME}" if clora.p_init == "adapters"
                else f"{clora.p_tokens:,} tokens at most of {clora.p_data}; {CLORA_SUBSPACES_NAME}" if clora.p_init in DATA_INITS
                else f"seed {clora.seed}") + "; see clora_config.json)"),
            *([("base adapters", f"{record.base_adapters} (merged into the base before training)")]
              if record.base_adapters else []),
            ("steps", steps), ("last training loss", unknown if record.last_loss is None else f"{record.last_loss:.4f} (task loss)"),
            ("training", f"{parallel}, {record.dtype or unknown}" + (f", on a {record.quantization} base" if record.quantization else "")),
            ("weights", weights_note),
            ("exported from", record.source or unknown)]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return "\n".join(front + lines)


def export_peft_adapter(output_dir: PathLike, lora_weights: Mapping[str, torch.Tensor], clora: CLoRAConfig,
                        record: Optional[TrainingRecord] = None, dtype: Optional[torch.dtype] = None,
                        overwrite: bool = False, check: Optional[Callable[[Path], None]] = None,
                        subspaces_file: Optional[PathLike] = None) -> Path:
    """Write a plain PEFT LoRA adapter: adapter_config.json, adapter_model.safetensors, clora_config.json, README.md,
    and for data-derived P (``activations``) the saved P, ``subspaces_file``, copied in as CLORA_SUBSPACES_NAME.

    ``lora_weights``: PeftModel parameter names (``base_model.model.<module>.lora_A.<adapter>.weight``) ->
    A [r, in] / B [out, r]. ``dtype``: of the saved tensors (default: as given). ``check(tmp_dir)`` runs on the
    written files before they are moved into place (``--verify``); if it raises, nothing is published.
    """
    from safetensors.torch import save_file

    from ..subspace import place_subspaces_file

    if clora.p_init in DATA_INITS and (subspaces_file is None or not Path(subspaces_file).is_file()):
        raise CheckpointError(f"P of p_init={clora.p_init} is data-derived and belongs with the adapter, and its "
                              f"{CLORA_SUBSPACES_NAME} " + (f"({subspaces_file}) does not exist" if subspaces_file else
                                                           "was not given") + "; nothing was written")
    record = record or TrainingRecord()
    parsed = {n: LORA_PARAM_RE.match(n) for n in lora_weights}
    unknown = [n for n, m in parsed.items() if m is None]
    if unknown:
        raise ValueError(f"not LoRA parameter names: {unknown[:3]}")
    modules = sorted({m.group("module") for m in parsed.values()})
    tensors = {peft_file_key(n, parsed[n].group("adapter")): w.detach().to("cpu", dtype or w.dtype).contiguous()
               for n, w in lora_weights.items()}
    lora_config = clora.peft_lora_config(modules)
    lora_config.base_model_name_or_path = record.base_model
    lora_config.inference_mode = True  # as PeftModel.save_pretrained writes it
    numel = sum(t.numel() for t in tensors.values())
    saved_dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
    with staged_directory(Path(output_dir), overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_config.save_pretrained(str(tmp))
        clora.save(tmp)
        if clora.p_init in DATA_INITS:
            place_subspaces_file(subspaces_file, tmp)
        (tmp / "README.md").write_text(model_card(record, clora, modules, f"{saved_dtype}, {numel:,} numbers in {len(tensors)} tensors"))
        if check is not None:
            check(tmp)
    return Path(output_dir)

