"""Training settings: typed dataclasses with help text, the single source of truth for launch/train.py.

HF-style names. Flags and a YAML/JSON config file both feed these (launch/train.py parses them); the
resolved values are saved beside every checkpoint.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local model directory (or a hub id, when the hub is reachable)."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | flash_attention_2 | sdpa | eager. auto: flash_attention_2 when flash-attn imports on CUDA, else sdpa."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint (off unless you ask)."})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "Training data: .json, .jsonl or .parquet, or a hub dataset name."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same formats as train_file."})
    dataset_format: str = field(default="auto", metadata={"help": "alpaca | commonsense | metamath | messages | auto (detected from the keys)."})
    max_seq_length: int = field(default=1024, metadata={"help": "Examples are truncated to this many tokens; those left without a response token are dropped."})
    packing: bool = field(default=False, metadata={"help": "Padding-free packing: several examples per row, position_ids restart, no cross-attention."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also put the loss on prompt tokens (default: response tokens only)."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where tokenized data is cached (default OUTPUT_DIR/.cache)."})


@dataclass
class TrainArguments:
    output_dir: str = field(metadata={"help": "Checkpoints (checkpoint-STEP/), metrics.jsonl, loss_curve.png and the final adapter/ go here."})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed JSON config (ds_configs/zero2.json, zero3.json, zero3_offload.json)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a previous run in output_dir."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Micro-batch per device (rows when packing)."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Evaluation batch per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs, used when max_steps is not set."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear | cosine | constant (after warmup)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    seed: int = field(default=42, metadata={"help": "Seed for LoRA init, data order and dropout."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision."})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision with dynamic loss scaling."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Activation checkpointing of decoder layers."})
    gradient_checkpointing_reentrant: bool = field(default=False, metadata={"help": "Use reentrant checkpointing (default non-reentrant)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (usually 2*r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch input."})
    target_modules: str = field(default="q_proj,k_proj,v_proj,up_proj,down_proj", metadata={"help": "Comma-separated module suffixes, or all-linear."})
    clora_k: int = field(default=128, metadata={"help": "CLoRA subspace dimension k (<= in and out of every adapted module)."})
    clora_lambda: float = field(default=1.0, metadata={"help": "Regularizer weight λ; 0 gives the plain LoRA baseline."})
    clora_p_init: str = field(default="orthogonal", metadata={"help": "orthogonal | svd_major | svd_minor."})
    clora_p_dtype: str = field(default="float32", metadata={"help": "Storage dtype of P: float32 | bfloat16 | float16."})
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps (0: only at the end)."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep at most N complete checkpoints (older complete ones are deleted)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps (metrics.jsonl, progress bar, monitors)."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps (needs eval_file; default: at the end only)."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A checkpoint-STEP path, or auto (newest complete checkpoint in output_dir)."})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb | csv (comma-separated for several): DeepSpeed's monitor."})
    profile_steps: Optional[str] = field(default=None, metadata={"help": "Profile optimizer steps A-B (1-based, e.g. 6-7) with torch.profiler on rank 0: OUTPUT_DIR/profile/ gets a Chrome trace and the top ops by time."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainArguments)


def arguments_dict(*groups) -> dict:
    out = {}
    for g in groups:
        out.update(asdict(g))
    return out


def profile_window(spec: str) -> Optional[Tuple[int, int]]:
    """"A-B" (or "A") -> (A, B), 1-based optimizer steps; None when it does not parse."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec or "")
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    return (first, last) if 1 <= first <= last else None


def validate_arguments(model: ModelArguments, data: DataArguments, train: TrainArguments) -> None:
    """Every problem in one ValueError (litgpt's validate_args habit)."""
    problems = argument_problems(model, data, train)
    if problems:
        raise ValueError("invalid arguments:\n  - " + "\n  - ".join(problems))


def argument_problems(model: ModelArguments, data: DataArguments, train: TrainArguments) -> List[str]:
    """Each problem with the arguments, one message each (empty: they are valid)."""
    problems: List[str] = []
    if model.attn_implementation not in ("auto", "flash_attention_2", "sdpa", "eager"):
        problems.append(f"--attn_implementation {model.attn_implementation!r}: choose auto, flash_attention_2, sdpa or eager")
    if data.dataset_format not in ("auto", "alpaca", "commonsense", "metamath", "messages"):
        problems.append(f"--dataset_format {data.dataset_format!r}: choose auto, alpaca, commonsense, metamath or messages")
    if data.max_seq_length < 8:
        problems.append(f"--max_seq_length {data.max_seq_length} is too small")
    if train.bf16 and train.fp16:
        problems.append("--bf16 and --fp16 are both set; choose one")
    if train.lr_scheduler_type not in ("linear", "cosine", "constant"):
        problems.append(f"--lr_scheduler_type {train.lr_scheduler_type!r}: choose linear, cosine or constant")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(train, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if train.max_steps <= 0 and train.num_train_epochs <= 0:
        problems.append("set --max_steps > 0 or --num_train_epochs > 0")
    if train.save_steps < 0 or (train.save_total_limit is not None and train.save_total_limit < 1):
        problems.append("--save_steps must be >= 0 and --save_total_limit >= 1")
    bad_monitors = [m for m in train.report_to.split(",") if m.strip() not in ("none", "tensorboard", "wandb", "csv")]
    if bad_monitors:
        problems.append(f"--report_to {bad_monitors}: choose none, tensorboard, wandb or csv")
    if train.profile_steps is not None and profile_window(train.profile_steps) is None:
        problems.append(f"--profile_steps {train.profile_steps!r}: give A-B with 1 <= A <= B (e.g. 6-7)")
    if train.eval_steps is not None and not data.eval_file:
        problems.append("--eval_steps needs --eval_file")
    return problems
