"""The ``clora-ds-convert`` command (also ``python launch/convert_to_peft.py``): a sharded DeepSpeed checkpoint ->
a PEFT adapter or a merged model. Argument parsing only; the work is ``clora_ds.checkpoint.convert_checkpoint``.

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
from typing import List, Optional


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
    from clora_ds.checkpoint import CheckpointError, convert_checkpoint

    try:
        result = convert_checkpoint(args.checkpoint, args.output_dir, dtype=args.dtype, merge=args.merge,
                                    base_model=args.base_model, verify=args.verify, verify_tolerance=args.verify_tolerance,
                                    overwrite=args.overwrite, allow_incomplete=args.allow_incomplete,
                                    clora_config=args.clora_config)
    except (CheckpointError, FileExistsError) as err:
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
