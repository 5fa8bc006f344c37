"""Export: sharded DeepSpeed checkpoints -> PEFT adapters or merged models.

    zero_reader.py   find a checkpoint, check every rank's files, reassemble the LoRA weights (restricted unpickling)
    peft_writer.py   the one adapter writer (export_peft_adapter), its model card, staged (atomic) directories
    merge.py         W + (α/r)·B·A into a copy of the base's safetensors shards, a block of rows at a time
    verify.py        logits of the written result against the checkpoint's own weights
    convert.py       the whole conversion (convert_checkpoint) and the clora-ds-convert command
"""
from .convert import Conversion, convert_checkpoint
from .peft_writer import TrainingRecord, export_peft_adapter, peft_file_key, staged_directory
from .zero_reader import (CheckpointLayout, inspect_checkpoint, load_checkpoint_file, locate_checkpoint, read_lora_weights,
                          restricted_unpickling)

__all__ = ["Conversion", "convert_checkpoint", "TrainingRecord", "export_peft_adapter", "peft_file_key", "staged_directory",
           "CheckpointLayout", "inspect_checkpoint", "load_checkpoint_file", "locate_checkpoint", "read_lora_weights",
           "restricted_unpickling"]
