"""The whole conversion: a ZeRO checkpoint -> a PEFT adapter (or a merged model), and the ``clora-ds-convert``
command (also ``python launch/convert_to_peft.py``).

    clora-ds-convert OUT/checkpoint-1200 OUT/adapter-1200                       # adapter, training dtype
    clora-ds-convert OUT/checkpoint-1200 OUT/adapter-1200 --dtype bf16 --verify
    clora-ds-convert OUT/checkpoint-1200 OUT/merged-1200 --merge --base_model /models/Llama-2-7b-hf

Needs no GPU and memory in proportion to the adapter: the frozen base weights are never read (except by
--merge, one shard at a time, and --verify, which builds the model once).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

from ..config import CLORA_CONFIG_NAME, CLORA_SUBSPACES_NAME, DATA_INITS, CLoRAConfig
from ..errors import CheckpointError, OutputExistsError, UserError
from .merge import _lora_pairs, _stored_dtype, merge_into_base
from .peft_writer import TrainingRecord, export_peft_adapter, read_training_record
from .verify import VERIFY_TOLERANCE, Verification, verify_export
from .zero_reader import CheckpointLayout, inspect_checkpoint, locate_checkpoint, read_lora_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PathLike = Union[str, Path]


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
    return CLoRAConfig.load(source)


def convert_checkpoint(checkpoint: PathLike, output_dir: PathLike, *, dtype: Optional[str] = None, merge: bool = False,
                       base_model: Optional[PathLike] = None, verify: bool = False, verify_tolerance: Optional[float] = None,
                       overwrite: bool = False, allow_incomplete: bool = False, clora_config: Optional[PathLike] = None,
                       base_adapters: Optional[str] = None, log: Callable[[str], None] = print) -> Conversion:
    """A ZeRO checkpoint -> a PEFT adapter in ``output_dir`` (or, with ``merge``, the merged model).

    ``dtype``: fp32 | bf16 | fp16 of the adapter tensors (default: the training precision, from train_config.json;
    fp32 when unknown). ``base_model``: for ``merge`` / ``verify`` (default: the run's --model_name_or_path).
    ``verify``: compare logits of the result with the checkpoint's weights before publishing it.
    ``base_adapters`` (DIR[,DIR]; default: the run's --base_adapters): with ``merge``, the earlier adapters a run trained
    with --base_adapters merged into its base, merged first (their files must be the ones the run recorded).
    Raises a UserError (CheckpointError, OutputExistsError, ...) with a message for the user; nothing is written then.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(f"{output_dir} already exists; pass --overwrite to replace it")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tag_dir = locate_checkpoint(checkpoint, allow_incomplete, log)
    out, source = output_dir.resolve(), tag_dir.resolve()
    if out == source or out in source.parents:
        raise CheckpointError(f"OUT_DIR {output_dir} would replace the checkpoint it is converted from; choose another directory")
    if source in out.parents:
        raise CheckpointError(f"OUT_DIR {output_dir} is inside the checkpoint {tag_dir} it is converted from (a checkpoint "
                              "holds only what its run wrote); choose a directory outside it, e.g. "
                              f"{tag_dir.parent / ('adapter-' + tag_dir.name.split('-')[-1])}")
    layout = inspect_checkpoint(tag_dir)
    clora = _clora_settings(tag_dir, clora_config)
    subspaces = tag_dir / CLORA_SUBSPACES_NAME  # data-derived P: saved beside the checkpoint, copied into the adapter
    if clora.p_init in DATA_INITS and not merge and not subspaces.is_file():
        raise CheckpointError(f"{tag_dir} has no {CLORA_SUBSPACES_NAME}: its P (p_init={clora.p_init}) was computed from "
                              "data and saved there, and the adapter needs it; copy the whole checkpoint directory")
    record = read_training_record(layout)
    ranks = sorted({shape[0] if ".lora_A." in n else shape[1] for n, shape in layout.lora_shapes.items()})
    if ranks != [clora.r]:
        raise CheckpointError(f"{tag_dir}: the LoRA weights have rank {ranks}, but its CLoRA settings say r={clora.r}")
    base = Path(base_model) if base_model else Path(record.base_model) if record.base_model else None
    if (merge or verify) and (base is None or not (base / "config.json").is_file()):
        flag = "--merge" if merge else "--verify"
        where = f"the run's base model {base} is not a saved HF model here" if base else "the checkpoint does not record its base model"
        raise CheckpointError(f"{flag} needs the base model: {where}; pass --base_model PATH")
    merged_first = _base_adapters_to_merge(tag_dir, record, base_adapters, base) if merge else []
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
        result = verify_export(written, weights, clora, base, merged=merge, rel_tolerance=tolerance,
                               base_adapters=merged_first)
        verification.append(result)
        log(f"verify: {result}")
        if not result.passed:
            raise CheckpointError(f"verification failed: {result}; nothing was written to {output_dir}")
        if record.quantization:
            from .verify import quantized_training_difference

            diff = quantized_training_difference(written, weights, clora, base, record.quantization, merge)
            log(f"verify: against the {record.quantization} base the adapter was trained on: max |Δlogit| = {diff:.3g} "
                "(the quantization error of the base; reported, not checked)")

    if merge:
        log(f"merging into a copy of {base}, shard by shard"
            + (f", after {', '.join(str(a.path) for a in merged_first)} (the run's --base_adapters)" if merged_first else ""))
        merge_into_base(output_dir, weights, clora, base, record, overwrite, check if verify else None,
                        base_adapters=merged_first)
    else:
        export_peft_adapter(output_dir, weights, clora, record, DTYPES[out_dtype], overwrite, check if verify else None,
                            subspaces_file=subspaces if clora.p_init in DATA_INITS else None)
    return Conversion(output_dir, tag_dir, layout, record, out_dtype, numel, merge, verification[0] if verification else None, notes)


def _base_adapters_to_merge(tag_dir: Path, record, spec: Optional[str], base: Path) -> list:
    """The base adapters (base_adapters.LoraAdapter) a --merge must merge before this checkpoint's adapter: --base_adapters
    or the run's own, checked against the sha256 the run recorded; [] for a run trained on the plain base."""
    from transformers import AutoConfig

    from ..base_adapters import read_adapters, recorded_base_adapters, same_adapter_files
    from ..model import linear_shapes
    from ..run_dir import TRAIN_CONFIG_FILE

    recorded = recorded_base_adapters(tag_dir, tag_dir.parent) or []
    spec = spec or record.base_adapters
    if not spec:
        return []
    linears = linear_shapes(AutoConfig.from_pretrained(str(base)))
    flag = "--base_adapters" if spec != record.base_adapters else f"the run's --base_adapters ({TRAIN_CONFIG_FILE})"
    adapters, problems = read_adapters(spec, flag, linears)
    if problems:
        hint = "" if flag == "--base_adapters" else "; pass --base_adapters with those adapters' paths from here"
        raise CheckpointError("--merge needs the adapters the run merged into its base first:\n  - "
                              + "\n  - ".join(problems) + hint)
    if recorded and not same_adapter_files(recorded, adapters):
        raise CheckpointError(f"--base_adapters {spec}: {tag_dir} was trained on the base with "
                              f"{', '.join(a['path'] for a in recorded)} merged into it; these files differ (or their "
                              "order): the merged model would not be the one the adapter was trained on")
    return adapters


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clora-ds-convert", description="Convert a sharded DeepSpeed checkpoint into a PEFT adapter or a merged model; no GPU needed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 on success, 2 on bad input (one message, nothing written).")
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="OUT/checkpoint-STEP, a DeepSpeed global_stepN directory, or a directory whose 'latest' file names one.")
    parser.add_argument("output_dir", metavar="OUT_DIR", help="Where the adapter (or merged model) goes; must not exist unless --overwrite.")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtype of the adapter tensors (default: the training precision recorded in train_config.json; fp32 if unknown).")
    parser.add_argument("--merge", action="store_true",
                        help="Write the base model with W + (alpha/r)·B·A merged in (sharded safetensors, config, tokenizer) instead of an adapter.")
    parser.add_argument("--base_model", default=None,
                        help="Base model directory for --merge / --verify (default: the run's --model_name_or_path).")
    parser.add_argument("--base_adapters", default=None, metavar="DIR[,DIR...]",
                        help="For --merge of a run trained with launch/train.py --base_adapters: those earlier adapters, "
                             "merged into the base first (default: the paths the run recorded; their sha256 must match).")
    parser.add_argument("--verify", action="store_true",
                        help="Before publishing, load the result with plain PEFT (or transformers, for --merge) and compare its logits "
                             "with the checkpoint's own weights on a few random inputs; print the max abs difference.")
    parser.add_argument("--verify_tolerance", type=float, default=None,
                        help="Allowed max |Δlogit| relative to max(1, largest |logit|) (default 1e-6 for fp32, 1e-2 for bf16/fp16).")
    parser.add_argument("--overwrite", action="store_true", help="Replace OUT_DIR if it exists (only once the new result is complete).")
    parser.add_argument("--allow_incomplete", action="store_true",
                        help="Convert a clora_ds checkpoint that lacks its COMPLETE marker (a run that died while saving).")
    parser.add_argument("--clora_config", default=None,
                        help="clora_config.json to use when the checkpoint has none (a checkpoint not written by launch/train.py).")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading a checkpoint needs no accelerator
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # --verify / --merge load models: keep the output to our lines
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        result = convert_checkpoint(args.checkpoint, args.output_dir, dtype=args.dtype, merge=args.merge,
                                    base_model=args.base_model, verify=args.verify, verify_tolerance=args.verify_tolerance,
                                    overwrite=args.overwrite, allow_incomplete=args.allow_incomplete,
                                    clora_config=args.clora_config, base_adapters=args.base_adapters)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    what = "merged model" if result.merged else f"PEFT adapter ({result.numel:,} numbers, {result.dtype})"
    step = f"step {result.record.step}" if result.record.step is not None else "step not recorded"
    print(f"wrote {what} to {result.output_dir} from {result.checkpoint} ({step}, ZeRO-{result.layout.zero_stage}, "
          f"{result.layout.world_size} rank(s))", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
