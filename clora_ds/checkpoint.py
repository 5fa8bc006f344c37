"""Checkpoints: their layout, reading the LoRA weights out of a ZeRO checkpoint, and exporting them.

    python launch/convert_to_peft.py OUT/checkpoint-1200 OUT/adapter-1200                 # PEFT adapter
    python launch/convert_to_peft.py OUT/checkpoint-1200 OUT/merged --merge --base_model /models/Llama-2-7b-hf

A checkpoint ``OUT/checkpoint-STEP/`` holds DeepSpeed's files (one ``*_optim_states.pt`` per rank with that
rank's fp32 master partition of the trainable weights; ``*_model_states.pt`` with the parameter names and
shapes), our own small state (``trainer_state.json``, ``rng_state_RANK.pt``, ``clora_config.json``,
``train_config.json``) and ``COMPLETE``, written last.

Reading: only the trainable (LoRA) weights are read. DeepSpeed's own reader
(``deepspeed.utils.zero_to_fp32``, ``exclude_frozen_parameters=True``) reassembles them from the partitions
of every rank; the frozen base is never touched, so memory follows the adapter, not the model.

Unpickling: DeepSpeed's reader calls ``torch.load(weights_only=False)``, which would run any code a crafted
file names. Every load here goes through torch's restricted unpickler instead (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
overrides DeepSpeed's argument), with an allowlist of the only classes a DeepSpeed checkpoint holds:
``LossScaler``, ``DynamicLossScaler``, ``ZeroStageEnum``, ``fragment_address``.

Exporting: ``export_peft_adapter`` is the one writer of adapters (this converter, the launcher's final
``OUT/adapter`` and ``save_clora_adapter`` all call it); ``merge_into_base`` writes W + (α/r)·B·A shard by shard.
Both write into a temporary sibling directory and rename it, so a failure never leaves a partial result.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch

from .config import CLORA_CONFIG_NAME, CLoRAConfig

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DEEPSPEED_FILE_RE = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_(optim|model)_states\.pt$")
LORA_PARAM_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.(?P<adapter>[^.]+)\.weight$")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint, base model or output directory that cannot be used; the message says what and why."""


def list_checkpoints(output_dir: Path, complete_only: bool = True) -> List[Tuple[int, Path]]:
    """[(step, path)] of the checkpoint-STEP directories in a training output directory, sorted by step."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / COMPLETE_MARKER).is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


# ---------------------------------------------------------------------------------------------------
# safe unpickling
# ---------------------------------------------------------------------------------------------------
def _deepspeed_checkpoint_classes() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def restricted_unpickling() -> Iterator[None]:
    """Every ``torch.load`` inside uses torch's weights-only unpickler, even where the caller passes
    ``weights_only=False`` (DeepSpeed's reader does), with the DeepSpeed checkpoint classes allowlisted."""
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(f"reading checkpoints safely needs torch >= 2.5 (torch.serialization.safe_globals); this is {torch.__version__}")
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    text = str(err)
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if refused:
        return CheckpointError(f"refusing to unpickle {path}: it names {refused.group(1)}, which no DeepSpeed checkpoint "
                               "holds (a crafted or foreign file could run code this way); nothing was loaded from it")
    if not zipfile.is_zipfile(path):
        return CheckpointError(f"{path} is truncated or corrupted: it is not a complete torch.save archive "
                               f"({path.stat().st_size:,} bytes). Copy it again from where the run saved it")
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text) or re.search(r"([^\n]+)", text)
    return CheckpointError(f"{path} is corrupted or was not written by DeepSpeed: "
                           f"{detail.group(1) if detail else type(err).__name__}")


def load_checkpoint_file(path: Path) -> dict:
    """One DeepSpeed ``*_states.pt`` file, unpickled safely, tensors memory-mapped (not read)."""
    try:
        with restricted_unpickling():
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # torch raises RuntimeError / OSError / UnpicklingError for damaged files
        raise _unreadable(path, err) from None


# ---------------------------------------------------------------------------------------------------
# finding and inspecting a checkpoint
# ---------------------------------------------------------------------------------------------------
def _deepspeed_files(directory: Path) -> List[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and DEEPSPEED_FILE_RE.match(p.name)) if directory.is_dir() else []


def _describe(directory: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not names:
        return "nothing (it is empty)"
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def locate_checkpoint(path: PathLike, allow_incomplete: bool = False, log: Callable[[str], None] = print) -> Path:
    """The directory holding DeepSpeed's files: ``path`` itself (``checkpoint-STEP`` or ``global_stepN``), or the
    tag named by ``path/latest``. Refuses a clora_ds checkpoint without its COMPLETE marker unless asked."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory (OUT/checkpoint-STEP, a DeepSpeed "
                              "global_stepN directory, or a directory whose 'latest' file names one)")
    if _deepspeed_files(path):
        tag_dir = path
    elif (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        tag_dir = path / tag
        if not _deepspeed_files(tag_dir):
            raise CheckpointError(f"{path / 'latest'} names checkpoint {tag!r}, but {tag_dir} holds no DeepSpeed "
                                  f"*_states.pt files ({'found: ' + _describe(tag_dir) if tag_dir.is_dir() else 'it does not exist'})")
    else:
        runs = list_checkpoints(path, complete_only=False)
        hint = ""
        if runs:
            hint = (". It looks like a training output directory: pass one of its checkpoints, e.g. "
                    + ", ".join(str(p) for _, p in runs[-3:]))
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint: expected *_optim_states.pt and *_model_states.pt "
                              f"files (OUT/checkpoint-STEP or global_stepN) or a 'latest' file naming such a directory; "
                              f"found {_describe(path)}{hint}")
    ours = CHECKPOINT_RE.match(tag_dir.name) or (tag_dir / STATE_FILE).is_file()
    if ours and not (tag_dir / COMPLETE_MARKER).is_file():
        if not allow_incomplete:
            done = [str(p) for _, p in list_checkpoints(tag_dir.parent)]
            raise CheckpointError(f"{tag_dir} is incomplete: it has no {COMPLETE_MARKER} marker, so the run stopped while "
                                  f"saving it. Convert a complete one ({', '.join(done[-3:]) or 'none in ' + str(tag_dir.parent)}) "
                                  "or pass --allow_incomplete to try anyway (missing or damaged rank files are still detected)")
        log(f"warning: {tag_dir} has no {COMPLETE_MARKER} marker; converting it anyway (--allow_incomplete)")
    return tag_dir


@dataclass
class CheckpointLayout:
    """What a ZeRO checkpoint directory holds, read from its pickles' small parts (tensors are not read)."""

    directory: Path
    zero_stage: int
    world_size: int
    lora_shapes: Dict[str, Tuple[int, ...]]  # PeftModel parameter name -> shape
    adapter_name: str
    global_steps: Optional[int]
    frozen_numel: int


def _rank_files(files: List[Path], kind: str) -> Dict[int, Path]:
    out = {}
    for p in files:
        rank, mp, what = DEEPSPEED_FILE_RE.match(p.name).groups()
        if what == kind and rank is not None:
            out[int(rank)] = p
    return out


def _missing_ranks_error(directory: Path, world: int, missing: List[int], kind: str, prefix: str) -> CheckpointError:
    names = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in missing]
    what = "optimizer" if kind == "optim" else "model"
    return CheckpointError(f"{directory} was written by {world} ranks, but the {what}-state file of rank(s) "
                           f"{', '.join(map(str, missing))} is missing: {', '.join(names)}. Every rank saves its own "
                           "partition; copy the whole checkpoint directory")


def inspect_checkpoint(tag_dir: Path) -> CheckpointLayout:
    """Check a ZeRO checkpoint before reading it: every rank's files present and readable, LoRA weights inside."""
    files = _deepspeed_files(tag_dir)
    model_parallel = sorted({int(DEEPSPEED_FILE_RE.match(p.name).group(2)) for p in files})
    if model_parallel != [0]:
        raise CheckpointError(f"{tag_dir} was saved with tensor/pipeline parallelism (mp_rank {model_parallel}); only "
                              "data-parallel ZeRO checkpoints can be converted")
    optim = _rank_files(files, "optim")
    if not optim:
        raise CheckpointError(f"{tag_dir} holds no *_optim_states.pt file (found {_describe(tag_dir)}); the LoRA weights "
                              "are read from the optimizer's fp32 partitions, which every rank writes")
    stages, worlds = set(), set()
    for rank in sorted(optim):
        state = load_checkpoint_file(optim[rank]).get("optimizer_state_dict", {})
        if "zero_stage" not in state:
            raise CheckpointError(f"{optim[rank]} is not a ZeRO optimizer state (no zero_stage): the checkpoint was saved "
                                  "without ZeRO; use ZeRO stage 1, 2 or 3")
        stages.add(int(state["zero_stage"]))
        count = state.get("partition_count")
        worlds.add(max(count) if isinstance(count, (list, tuple)) else int(count))
        del state
    if len(stages) != 1 or len(worlds) != 1:
        raise CheckpointError(f"the rank files in {tag_dir} disagree (ZeRO stages {sorted(stages)}, world sizes "
                              f"{sorted(worlds)}): they come from different runs")
    stage, world = stages.pop(), worlds.pop()
    if stage not in (1, 2, 3):
        raise CheckpointError(f"{tag_dir}: ZeRO stage {stage} is not supported; stages 1, 2 and 3 are")
    missing = [r for r in range(world) if r not in optim]
    if missing:
        raise _missing_ranks_error(tag_dir, world, missing, "optim", "bf16_" if optim[min(optim)].name.startswith("bf16_") else "")
    extra = sorted(r for r in optim if r >= world)
    if extra:
        raise CheckpointError(f"{tag_dir} holds optimizer files of ranks {extra} beyond its world size {world}: files of "
                              "two different runs are mixed")
    if stage == 3:
        model_files = _rank_files(files, "model")
        missing = [r for r in range(world) if r not in model_files]
        if missing:
            raise _missing_ranks_error(tag_dir, world, missing, "model", "")
        model_files = [model_files[r] for r in range(world)]
    else:
        model_files = [p for p in files if p.name.endswith("mp_rank_00_model_states.pt") and "zero_pp_rank" not in p.name]
        if not model_files:
            raise CheckpointError(f"{tag_dir} lacks mp_rank_00_model_states.pt (parameter names and shapes, written by "
                                  "rank 0); copy the whole checkpoint directory")
    frozen_numel, head = 0, None
    for path in model_files:
        state = load_checkpoint_file(path)
        frozen = state.get("frozen_param_shapes") or {}
        frozen_numel = max(frozen_numel, sum(int(torch.Size(s).numel()) for s in frozen.values()))
        if head is None:
            head = {"param_shapes": state.get("param_shapes") or [], "global_steps": state.get("global_steps")}
        del state
    shapes = {name: tuple(shape) for group in head["param_shapes"] for name, shape in group.items()}
    lora = {n: s for n, s in shapes.items() if LORA_PARAM_RE.match(n)}
    if not lora:
        shown = ", ".join(list(shapes)[:4]) or "none"
        raise CheckpointError(f"{tag_dir} holds no LoRA weights: its {len(shapes)} trainable parameter(s) ({shown}) have no "
                              "'...lora_A.<adapter>.weight' / '...lora_B.<adapter>.weight' names. Only LoRA / CLoRA "
                              "checkpoints (PEFT models trained with DeepSpeed) can be converted to a PEFT adapter")
    others = [n for n in shapes if n not in lora]
    if others:
        raise CheckpointError(f"{tag_dir} also trains {len(others)} non-LoRA parameter(s) (e.g. {others[0]}); a PEFT LoRA "
                              "adapter cannot hold them, and dropping them would change the model")
    adapters = {LORA_PARAM_RE.match(n).group("adapter") for n in lora}
    if len(adapters) != 1:
        raise CheckpointError(f"{tag_dir} holds several LoRA adapters ({', '.join(sorted(adapters))}); convert one at a time")
    return CheckpointLayout(tag_dir, stage, world, lora, adapters.pop(), head["global_steps"], frozen_numel)


@contextlib.contextmanager
def _captured_output() -> Iterator[io.StringIO]:
    """DeepSpeed's reader prints progress lines and bars; keep them out of the converter's own output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def read_lora_weights(layout: CheckpointLayout) -> Dict[str, torch.Tensor]:
    """The fp32 LoRA weights of a checkpoint, PeftModel parameter names -> full (unpartitioned) tensors.

    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint(exclude_frozen_parameters=True, lazy_mode=True)``
    maps the rank files (memory-mapped) and reassembles each trainable tensor only when asked; the frozen
    base weights are never materialised.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = layout.directory
    try:
        with restricted_unpickling(), _captured_output():
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(directory.parent), directory.name,
                                                            exclude_frozen_parameters=True, lazy_mode=True)
            weights = {name: lazy[name].contiguous() for name in layout.lora_shapes}
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"DeepSpeed could not reassemble the LoRA weights of {directory}: {str(err).splitlines()[0]}") from None
    problems = [f"{n}: {tuple(w.shape)} (expected {layout.lora_shapes[n]})" for n, w in weights.items()
                if tuple(w.shape) != layout.lora_shapes[n] or w.numel() == 0]
    if problems:
        raise CheckpointError(f"{directory}: reassembled LoRA weights have wrong or empty shapes: {'; '.join(problems[:4])}")
    return weights


# ---------------------------------------------------------------------------------------------------
# what the run recorded (model card, defaults)
# ---------------------------------------------------------------------------------------------------
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


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def read_metrics(path: Path) -> Dict[Tuple[int, str], dict]:
    """{(step, "train" | "eval"): row} of a metrics.jsonl. A resumed run re-logs steps: the last line of a step and
    kind wins. Lines cut short by a crash are skipped."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows[(row["step"], "eval" if "eval_loss" in row else "train")] = row
    return rows


def _last_loss(metrics: Path, step: Optional[int]) -> Optional[float]:
    """The task loss logged at ``step`` (or the last one before it)."""
    if step is None:
        return None
    losses = {s: row["task_loss"] for (s, _), row in read_metrics(metrics).items() if "task_loss" in row and s <= step}
    return losses[max(losses)] if losses else None


def read_training_record(layout: CheckpointLayout) -> TrainingRecord:
    """From the checkpoint's own files, or its run directory's (train_config.json, metrics.jsonl)."""
    tag_dir = layout.directory
    settings = _read_json(tag_dir / TRAIN_CONFIG_FILE) or _read_json(tag_dir.parent / TRAIN_CONFIG_FILE) or {}
    arguments = settings.get("arguments", {})
    state = _read_json(tag_dir / STATE_FILE) or {}
    step = state.get("step", layout.global_steps)
    dtype = None
    if arguments:
        dtype = "bf16" if arguments.get("bf16") else "fp16" if arguments.get("fp16") else "fp32"
    return TrainingRecord(base_model=arguments.get("model_name_or_path"), train_file=arguments.get("train_file"), dtype=dtype,
                          step=step, epoch=state.get("epoch"), last_loss=_last_loss(tag_dir.parent / METRICS_FILE, step),
                          world_size=layout.world_size, zero_stage=layout.zero_stage, source=str(tag_dir))


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def staged_directory(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``output_dir`` to write into; renamed to ``output_dir`` only if the block succeeds."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
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
    lines = [f"# CLoRA {what} for {base}", "",
             "Trained with clora_ds: LoRA plus the CLoRA subspace regularizer "
             "R = Σ ½‖A P_in‖² + ½‖Bᵀ P_out‖² (fixed P, orthonormal columns, never saved), which keeps the update "
             "out of a k-dimensional subspace so the model forgets less.", ""]
    if merged:
        lines += ["The update (α/r)·B·A is merged into the base weights: load it like any model,", "", "```python",
                  "from transformers import AutoModelForCausalLM", "", 'model = AutoModelForCausalLM.from_pretrained("PATH")', "```", ""]
    else:
        lines += ["A plain PEFT LoRA adapter: no clora_ds import is needed to use it.", "", "```python",
                  "from transformers import AutoModelForCausalLM", "from peft import PeftModel", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{record.base_model or "BASE_MODEL"}")',
                  'model = PeftModel.from_pretrained(base, "PATH")', "```", ""]
    steps = unknown if record.step is None else f"{record.step}" + ("" if record.epoch is None else f" (epoch {record.epoch:.3g})")
    parallel = unknown if record.world_size is None else f"{record.world_size} rank(s), ZeRO-{record.zero_stage}"
    rows = [("base model", record.base_model or unknown), ("training data", record.train_file or unknown),
            ("LoRA r / α", f"{clora.r} / {clora.alpha:g} (update (α/r)·B·A, dropout {clora.dropout:g})"),
            ("target modules", _module_summary(modules)),
            ("CLoRA k / λ", f"{clora.k} / {clora.lam:g} (P init {clora.p_init}, seed {clora.seed}; see clora_config.json)"),
            ("steps", steps), ("last training loss", unknown if record.last_loss is None else f"{record.last_loss:.4f} (task loss)"),
            ("training", f"{parallel}, {record.dtype or unknown}"), ("weights", weights_note),
            ("exported from", record.source or unknown)]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    return "\n".join(front + lines)


def export_peft_adapter(output_dir: PathLike, lora_weights: Mapping[str, torch.Tensor], clora: CLoRAConfig,
                        record: Optional[TrainingRecord] = None, dtype: Optional[torch.dtype] = None,
                        overwrite: bool = False, check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write a plain PEFT LoRA adapter: adapter_config.json, adapter_model.safetensors, clora_config.json, README.md.

    ``lora_weights``: PeftModel parameter names (``base_model.model.<module>.lora_A.<adapter>.weight``) ->
    A [r, in] / B [out, r]. ``dtype``: of the saved tensors (default: as given). ``check(tmp_dir)`` runs on the
    written files before they are moved into place (``--verify``); if it raises, nothing is published.
    """
    from safetensors.torch import save_file

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
        (tmp / "README.md").write_text(model_card(record, clora, modules, f"{saved_dtype}, {numel:,} numbers in {len(tensors)} tensors"))
        if check is not None:
            check(tmp)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------
# merging W + (α/r)·B·A into the base, one shard at a time
# ---------------------------------------------------------------------------------------------------
def _base_shards(base_model: Path) -> Tuple[List[str], Optional[Path]]:
    """The base model's safetensors shard names (in order) and its index file, if sharded."""
    if not (base_model / "config.json").is_file():
        raise CheckpointError(f"--base_model {base_model}: no config.json there; expected a saved HF model directory")
    index = base_model / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return sorted(set(weight_map.values())), index
    if (base_model / "model.safetensors").is_file():
        return ["model.safetensors"], None
    pickled = sorted(p.name for p in base_model.glob("*.bin"))
    raise CheckpointError(f"--base_model {base_model} has no safetensors weights"
                          + (f" (only pickled {', '.join(pickled[:3])}); re-save it with save_pretrained(safe_serialization=True)" if pickled else ""))


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _safetensors_layout(path: Path) -> Tuple[Dict[str, dict], int]:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}) and where its data starts. The format
    is an 8-byte little-endian header length, a JSON header, then the tensors' bytes at those offsets."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        end = 8 + length + max((t["data_offsets"][1] for t in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} cannot be read as safetensors: {err}") from None
    if path.stat().st_size < end:
        raise CheckpointError(f"{path} is truncated: its header needs {end:,} bytes, the file has {path.stat().st_size:,}")
    return header, 8 + length


def _stored_dtype(base_model: Path, key: str) -> torch.dtype:
    """The dtype ``key`` is stored in, from the safetensors header (the weight itself is not read)."""
    for shard in _base_shards(base_model)[0]:
        header, _ = _safetensors_layout(base_model / shard)
        if key in header:
            return SAFETENSORS_DTYPES.get(header[key]["dtype"], torch.float32)
    return torch.float32  # merge_into_base names the missing weight


def _lora_pairs(lora_weights: Mapping[str, object]) -> Dict[str, tuple]:
    """Base weight key (``<module>.weight``) -> (A [r, in], B [out, r])."""
    sides: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, w in lora_weights.items():
        m = LORA_PARAM_RE.match(name)
        sides.setdefault(m.group("module") + ".weight", {})[m.group("side")] = w
    return {key: (s["A"], s["B"]) for key, s in sides.items()}


def _merge_in_place(path: Path, header: Dict[str, dict], data_start: int, pairs: Dict[str, tuple], scale: float,
                    chunk_numel: int = 2**24) -> None:
    """W += scale·B·A for every adapted weight of one copied shard, a block of rows at a time (fp32 sum, stored
    in W's dtype): the file keeps its header and layout, and memory holds one block, not the shard."""
    with open(path, "r+b") as f:
        for key in sorted(set(header) & set(pairs)):
            a, b = (t.float() for t in pairs[key])
            dtype = SAFETENSORS_DTYPES[header[key]["dtype"]]
            rows, cols = header[key]["shape"]
            start = data_start + header[key]["data_offsets"][0]
            row_bytes = cols * dtype.itemsize
            step = max(1, chunk_numel // cols)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                f.seek(start + r0 * row_bytes)
                w = torch.frombuffer(bytearray(f.read((r1 - r0) * row_bytes)), dtype=dtype).view(r1 - r0, cols)
                merged = (w.float() + scale * (b[r0:r1] @ a)).to(dtype)  # W [rows, in] + (α/r)·B [rows, r]·A [r, in]
                f.seek(start + r0 * row_bytes)
                f.write(merged.view(torch.uint8).numpy().tobytes())


def merge_into_base(output_dir: PathLike, lora_weights: Mapping[str, torch.Tensor], clora: CLoRAConfig,
                    base_model: PathLike, record: Optional[TrainingRecord] = None, overwrite: bool = False,
                    check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write the base model with W + (α/r)·B·A merged into every adapted weight: the base's own safetensors shards
    (copied, then the adapted tensors rewritten in place, a block of rows at a time), its index, config and
    tokenizer files. Memory holds the adapter and one block, never a whole shard; the sum is taken in fp32 and
    stored in each weight's own dtype. Every shape is checked before anything is written.
    """
    base_model = Path(base_model)
    record = record or TrainingRecord()
    shards, _ = _base_shards(base_model)
    pairs = _lora_pairs(lora_weights)
    scale = clora.alpha / clora.r  # PEFT's scaling for LoRA without rslora
    layouts, problems = {}, []
    for shard in shards:
        layouts[shard] = header, _ = _safetensors_layout(base_model / shard)
        for key in sorted(set(header) & set(pairs)):
            a, b = pairs[key]
            shape, dtype = header[key]["shape"], header[key]["dtype"]
            if shape != [b.shape[0], a.shape[1]]:
                problems.append(f"{key} is {shape} in the base, the adapter needs {[b.shape[0], a.shape[1]]} "
                                f"(B {list(b.shape)} · A {list(a.shape)})")
            elif dtype not in SAFETENSORS_DTYPES:
                problems.append(f"{key} is stored as {dtype}; merging needs a float weight (quantized bases cannot be merged)")
    missing = sorted(set(pairs) - {k for header, _ in layouts.values() for k in header})
    if missing:
        problems.append(f"{len(missing)} adapted weight(s) do not exist in the base, e.g. {', '.join(missing[:3])}")
    if problems:
        raise CheckpointError(f"--base_model {base_model} does not fit the adapter:\n  - " + "\n  - ".join(problems[:6])
                              + (f"\n  - ... {len(problems) - 6} more" if len(problems) > 6 else ""))
    modules = sorted(k[: -len(".weight")] for k in pairs)
    with staged_directory(Path(output_dir), overwrite) as tmp:
        for shard in shards:
            shutil.copyfile(base_model / shard, tmp / shard)
            _merge_in_place(tmp / shard, *layouts[shard], pairs, scale)
        for p in base_model.iterdir():
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != "README.md":
                shutil.copy2(p, tmp / p.name)  # config, generation config, tokenizer files, the shard index
        clora.save(tmp)
        (tmp / "README.md").write_text(model_card(record, clora, modules, f"base weights + (α/r)·B·A, {len(shards)} shard(s)", merged=True))
        if check is not None:
            check(tmp)
    return Path(output_dir)


# ---------------------------------------------------------------------------------------------------
# verification: the written result against the checkpoint's own weights
# ---------------------------------------------------------------------------------------------------
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


def verify_export(written: Path, lora_weights: Mapping[str, torch.Tensor], clora: CLoRAConfig, base_model: PathLike,
                  merged: bool, rel_tolerance: float) -> Verification:
    """Logits of the written adapter (loaded with plain ``PeftModel.from_pretrained``) or merged model, against
    the base with the checkpoint's fp32 LoRA weights set directly, on a few random inputs; fp32 throughout."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    modules = sorted({LORA_PARAM_RE.match(n).group("module") for n in lora_weights})
    adapter_name = LORA_PARAM_RE.match(next(iter(lora_weights))).group("adapter")
    with _quiet_model_loading():
        base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    reference = get_peft_model(base, clora.peft_lora_config(modules), adapter_name=adapter_name).eval()
    params = dict(reference.named_parameters())
    lora_params = {n for n in params if LORA_PARAM_RE.match(n)}
    if lora_params != set(lora_weights):
        raise CheckpointError(f"the LoRA parameters of {base_model} with these settings do not match the checkpoint's "
                              f"({len(lora_params)} vs {len(lora_weights)}, e.g. {sorted(lora_params ^ set(lora_weights))[:2]})")
    ids = _probe_inputs(base.config.vocab_size)
    with torch.no_grad():
        for name, w in lora_weights.items():
            params[name].copy_(w)
        expected = reference(input_ids=ids).logits
        with _quiet_model_loading():
            if merged:
                del reference, base, params
                model = AutoModelForCausalLM.from_pretrained(str(written), dtype=torch.float32).eval()
            else:
                model = PeftModel.from_pretrained(reference.unload(), str(written)).eval()
        got = model(input_ids=ids).logits
    largest = expected.abs().max().item()
    return Verification((got - expected).abs().max().item(), largest, rel_tolerance * max(1.0, largest), ids.numel())


# ---------------------------------------------------------------------------------------------------
# the whole conversion
# ---------------------------------------------------------------------------------------------------
@dataclass
class Conversion:
    output_dir: Path
    checkpoint: Path
    layout: CheckpointLayout
    record: TrainingRecord
    dtype: str
    numel: int
    merged: bool
    verification: Optional[Verification] = None
    notes: List[str] = field(default_factory=list)


def _clora_settings(tag_dir: Path, clora_config: Optional[PathLike]) -> CLoRAConfig:
    source = Path(clora_config) if clora_config else tag_dir / CLORA_CONFIG_NAME
    if not source.exists():
        raise CheckpointError(f"no {CLORA_CONFIG_NAME} in {tag_dir}: DeepSpeed's files do not hold the LoRA settings "
                              f"(alpha, dropout, CLoRA k/λ). Pass --clora_config FILE (the {CLORA_CONFIG_NAME} of the run, e.g. "
                              "from its final adapter)")
    try:
        return CLoRAConfig.load(source)
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(f"{source}: {err}") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source}:{err.lineno}: malformed JSON ({err.msg})") from None


def convert_checkpoint(checkpoint: PathLike, output_dir: PathLike, *, dtype: Optional[str] = None, merge: bool = False,
                       base_model: Optional[PathLike] = None, verify: bool = False, verify_tolerance: Optional[float] = None,
                       overwrite: bool = False, allow_incomplete: bool = False, clora_config: Optional[PathLike] = None,
                       log: Callable[[str], None] = print) -> Conversion:
    """A ZeRO checkpoint -> a PEFT adapter in ``output_dir`` (or, with ``merge``, the merged model).

    ``dtype``: fp32 | bf16 | fp16 of the adapter tensors (default: the training precision, from train_config.json;
    fp32 when unknown). ``base_model``: for ``merge`` / ``verify`` (default: the run's --model_name_or_path).
    ``verify``: compare logits of the result with the checkpoint's weights before publishing it.
    Raises CheckpointError (or FileExistsError) with a message for the user; nothing is written then.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tag_dir = locate_checkpoint(checkpoint, allow_incomplete, log)
    if output_dir.resolve() == tag_dir.resolve() or output_dir.resolve() in tag_dir.resolve().parents:
        raise CheckpointError(f"OUT_DIR {output_dir} would replace the checkpoint it is converted from; choose another directory")
    layout = inspect_checkpoint(tag_dir)
    clora = _clora_settings(tag_dir, clora_config)
    record = read_training_record(layout)
    ranks = sorted({shape[0] if ".lora_A." in n else shape[1] for n, shape in layout.lora_shapes.items()})
    if ranks != [clora.r]:
        raise CheckpointError(f"{tag_dir}: the LoRA weights have rank {ranks}, but its CLoRA settings say r={clora.r}")
    base = Path(base_model) if base_model else Path(record.base_model) if record.base_model else None
    if (merge or verify) and (base is None or not (base / "config.json").is_file()):
        flag = "--merge" if merge else "--verify"
        where = f"the run's base model {base} is not a saved HF model here" if base else "the checkpoint does not record its base model"
        raise CheckpointError(f"{flag} needs the base model: {where}; pass --base_model PATH")
    out_dtype = dtype or record.dtype or "fp32"
    checked_dtype = DTYPES[out_dtype]
    if merge:
        checked_dtype = _stored_dtype(base, next(iter(_lora_pairs(layout.lora_shapes))))
    notes = [] if dtype or record.dtype else ["training precision not recorded (no train_config.json): writing fp32"]
    if layout.frozen_numel:
        notes.append(f"the checkpoint also stores {layout.frozen_numel:,} frozen base numbers (saved without "
                     "exclude_frozen_parameters); they are not used")
    log(f"reading {tag_dir}: ZeRO-{layout.zero_stage}, {layout.world_size} rank(s), {len(layout.lora_shapes)} LoRA tensors")
    weights = read_lora_weights(layout)
    numel = sum(w.numel() for w in weights.values())
    verification: List[Verification] = []

    def check(written: Path) -> None:
        tolerance = verify_tolerance if verify_tolerance is not None else VERIFY_TOLERANCE.get(checked_dtype, 1e-6)
        result = verify_export(written, weights, clora, base, merged=merge, rel_tolerance=tolerance)
        verification.append(result)
        log(f"verify: {result}")
        if not result.passed:
            raise CheckpointError(f"verification failed: {result}; nothing was written to {output_dir}")

    if merge:
        log(f"merging into a copy of {base}, shard by shard")
        merge_into_base(output_dir, weights, clora, base, record, overwrite, check if verify else None)
    else:
        export_peft_adapter(output_dir, weights, clora, record, DTYPES[out_dtype], overwrite, check if verify else None)
    return Conversion(output_dir, tag_dir, layout, record, out_dtype, numel, merge, verification[0] if verification else None, notes)
