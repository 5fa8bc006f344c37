"""Reading a ZeRO checkpoint: find it, check every rank's files, and reassemble only the LoRA weights, safely.

A checkpoint directory holds DeepSpeed's files: one ``*_optim_states.pt`` per rank with that rank's fp32 master
partition of the trainable weights, ``*_model_states.pt`` with the parameter names and shapes.

Reading: only the trainable (LoRA) weights are read. DeepSpeed's own reader (``deepspeed.utils.zero_to_fp32``,
``exclude_frozen_parameters=True``) reassembles them from the partitions of every rank; the frozen base is never
touched, so memory follows the adapter, not the model.

Unpickling: DeepSpeed calls ``torch.load(weights_only=False)``, which would run any code a crafted file names.
Every load through ``restricted_unpickling`` (this reader, and resuming a run) uses torch's restricted unpickler
instead (``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides DeepSpeed's argument), with an allowlist of the only classes
a DeepSpeed checkpoint holds: ``LossScaler``, ``DynamicLossScaler``, ``ZeroStageEnum``, ``fragment_address``.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch

from ..errors import CheckpointError
from ..run_dir import CHECKPOINT_RE, COMPLETE_MARKER, STATE_FILE, list_checkpoints

DEEPSPEED_FILE_RE = re.compile(r"^(?:bf16_)?(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_(optim|model)_states\.pt$")
LORA_PARAM_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.(?P<adapter>[^.]+)\.weight$")
PathLike = Union[str, Path]


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
    if not files:
        raise CheckpointError(f"{tag_dir} is not a DeepSpeed checkpoint: it holds no *_optim_states.pt / *_model_states.pt "
                              f"files (found {_describe(tag_dir)}); copy the whole checkpoint directory")
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

