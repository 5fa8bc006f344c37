"""Merging W + (α/r)·B·A into a copy of the base model's safetensors shards, one block of rows at a time.

Memory holds the adapter and one block, never a whole shard; every shape is checked before anything is written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..config import CLoRAConfig
from ..errors import CheckpointError
from ..run_dir import read_json
from .peft_writer import TrainingRecord, model_card, staged_directory
from .zero_reader import LORA_PARAM_RE

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
PathLike = Union[str, Path]


def _base_shards(base_model: Path) -> Tuple[List[str], Optional[Path]]:
    """The base model's safetensors shard names (in order) and its index file, if sharded."""
    if not (base_model / "config.json").is_file():
        raise CheckpointError(f"--base_model {base_model}: no config.json there; expected a saved HF model directory")
    index = base_model / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
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


def _stacked_pairs(adapters) -> Dict[str, tuple]:
    """Base weight key -> (A, B) with B·A = Σ_i s_i·B_i·A_i over the adapters that adapt it (rows s_i·A_i stacked,
    columns B_i side by side): one GEMM per block, one rounding to W's dtype."""
    stacked: Dict[str, tuple] = {}
    for name in sorted({n for adapter in adapters for n in adapter.factors}):
        pairs = [(adapter.scale * adapter.factors[name][0].float(), adapter.factors[name][1].float())
                 for adapter in adapters if name in adapter.factors]
        stacked[name + ".weight"] = (torch.cat([a for a, _ in pairs], 0), torch.cat([b for _, b in pairs], 1))
    return stacked


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
                    check: Optional[Callable[[Path], None]] = None, base_adapters=()) -> Path:
    """Write the base model with W + (α/r)·B·A merged into every adapted weight: the base's own safetensors shards
    (copied, then the adapted tensors rewritten in place, a block of rows at a time), its index, config and
    tokenizer files. Memory holds the adapter and one block, never a whole shard; the sum is taken in fp32 and
    stored in each weight's own dtype. Every shape is checked before anything is written.
    ``base_adapters`` (base_adapters.LoraAdapter, checked against the base): merged first, W + Σ_i s_i·B_i·A_i in one
    fp32 sum stored once in W's dtype, as launch/train.py --base_adapters merged them before training.
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
            if base_adapters:
                _merge_in_place(tmp / shard, *layouts[shard], _stacked_pairs(base_adapters), 1.0)
            _merge_in_place(tmp / shard, *layouts[shard], pairs, scale)
        for p in base_model.iterdir():
            if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES) and p.name != "README.md":
                shutil.copy2(p, tmp / p.name)  # config, generation config, tokenizer files, the shard index
        clora.save(tmp)
        (tmp / "README.md").write_text(model_card(record, clora, modules, f"base weights + (α/r)·B·A, {len(shards)} shard(s)", merged=True))
        if check is not None:
            check(tmp)
    return Path(output_dir)

