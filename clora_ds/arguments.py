"""Training settings: typed dataclasses with help text, the single source of truth for launch/train.py.

HF-style names. Flags and a YAML/JSON config file both feed these (``parse_train_arguments``); the resolved values
are saved beside every checkpoint. The LoRA / CLoRA flags are generated from ``CLoRAConfig``'s fields (flag names
in their metadata; same defaults and help text), so the launcher and the library cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .activation_memory import checkpointing_problems
from .config import CLoRAConfig
from .data import DATA_FILE_SUFFIXES, FORMATS
from .ds_config import HF_SCHEDULERS, MONITORS, OPTIMIZERS
from .errors import ConfigError
from .run_dir import best_metric_direction

ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
DATASET_FORMATS = ("auto",) + tuple(FORMATS)  # clora_ds.data's formats; docs/data.md shows each


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Local model directory (or a hub id, when the hub is reachable)."})
    attn_implementation: str = field(default="auto", metadata={"help": "auto | flash_attention_2 | sdpa | eager. auto: flash_attention_2 when flash-attn imports on CUDA, else sdpa."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint (off unless you ask)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bits (bitsandbytes; double quantization, compute and quant storage in the training dtype, so ZeRO-3 can shard it). pip install 'clora_ds[qlora]'."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4: the 4-bit data type of --load_in_4bit."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8 bits (bitsandbytes LLM.int8)."})
    base_adapters: Optional[str] = field(default=None, metadata={"help": "Earlier PEFT LoRA adapters (directories, comma-separated) merged into the base weights in memory at start-up, in order (W += (α/r)·B·A, float32 math), before the new adapter is created: sequential tasks (with --clora_p_init adapters --clora_p_adapters the same directories, O-LoRA-style). The new adapter is then used on the base with these merged. Not with --load_in_4bit / --load_in_8bit."})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "Training data: a .json, .jsonl, .parquet or .txt file or a hub dataset name (NAME@SPLIT; default split train); several, comma-separated, make a mixture (see --train_weights). Each source's format is detected from its own keys unless --dataset_format is given, which then applies to every source."})
    train_weights: Optional[str] = field(default=None, metadata={"help": "Mixture weights, comma-separated, one per --train_file source in its order (finite, > 0; normalised to sum 1), e.g. 0.8,0.1,0.1. Each epoch draws round(w_i * N) examples from source i (N: the examples of all sources), without replacement, cycling a source whose share exceeds its size; a pure function of (--seed, epoch), so resume is exact. Default: every example of every source once per epoch (proportional to size)."})
    eval_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same kinds of source as train_file (a hub dataset reads split test; NAME@SPLIT for another). One source is logged as eval_loss (and eval_accuracy for a commonsense task); several are named: SET=SOURCE,SET=SOURCE, e.g. task=t.jsonl,general=g.txt, each logged as eval_SET_loss (and eval_SET_accuracy)."})
    dataset_format: str = field(default="auto", metadata={"help": "alpaca | commonsense | metamath | messages | sharegpt | text | auto (detected from each source's keys; a .txt file is text). messages and sharegpt are chat: the ids are the tokenizer's apply_chat_template, the loss on the assistant turns and their end-of-turn token; text: the loss on every token. docs/data.md shows each format."})
    max_seq_length: int = field(default=1024, metadata={"help": "Examples are truncated to this many tokens; those left without a response token are dropped."})
    packing: bool = field(default=False, metadata={"help": "Padding-free packing: several examples per row, position_ids restart, no cross-attention."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Also put the loss on prompt tokens (default: response tokens only)."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where tokenized data is cached (default: the datasets cache, HF_DATASETS_CACHE/clora_ds; never inside output_dir)."})


@dataclass(frozen=True)
class DataSource:
    """One source of --train_file or --eval_file: a local file, or a hub dataset and its split."""

    path: str
    split: Optional[str] = None  # the hub split; None for a local file (it has none)
    name: Optional[str] = None   # an eval set's name (SET=SOURCE); None for training data and a bare --eval_file

    def __str__(self) -> str:
        return self.path if self.split is None else f"{self.path}@{self.split}"


SET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _source(text: str, flag: str, default_split: str, name: Optional[str] = None) -> DataSource:
    if not text:
        raise ConfigError(f"{flag}: an empty source; give comma-separated files or hub dataset names")
    if Path(text).suffix in DATA_FILE_SUFFIXES or "@" not in text:  # a local file keeps any @ in its name
        return DataSource(text, None if Path(text).suffix in DATA_FILE_SUFFIXES else default_split, name)
    path, split = text.rsplit("@", 1)
    if not path or not split:
        raise ConfigError(f"{flag} {text!r}: give a hub dataset as NAME@SPLIT (e.g. {path or 'org/data'}@{default_split})")
    return DataSource(path, split, name)


def train_sources(data: DataArguments) -> List[DataSource]:
    """--train_file's sources, in order; ConfigError when it does not parse."""
    return [_source(part.strip(), "--train_file", "train") for part in str(data.train_file).split(",")]


def eval_sources(data: DataArguments) -> List[DataSource]:
    """--eval_file's sets (none without it): one bare source, or several SET=SOURCE with distinct names."""
    if not data.eval_file:
        return []
    parts = [part.strip() for part in str(data.eval_file).split(",")]
    sets = []
    for part in parts:
        name, sep, text = (piece.strip() for piece in part.partition("="))
        if sep and SET_NAME_RE.fullmatch(name):
            sets.append(_source(text, "--eval_file", "test", name))
            continue
        if sep and "/" not in name and "." not in name:  # meant as a name (not a path with = in it), but not one
            raise ConfigError(f"--eval_file: set name {name!r} in {part!r}: use letters, digits, _ and - (starting "
                              "with a letter or digit), e.g. task=t.jsonl")
        if len(parts) > 1:
            raise ConfigError(f"--eval_file: {part!r} has no name; several eval sets are named each, SET=SOURCE,"
                              "SET=SOURCE (logged as eval_SET_loss), e.g. task=t.jsonl,general=g.txt")
        sets.append(_source(part, "--eval_file", "test"))
    names = [s.name for s in sets if s.name]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--eval_file names {', '.join(twice)} more than once; give every eval set its own name")
    return sets


def mixture_weights(data: DataArguments) -> Optional[List[float]]:
    """--train_weights as numbers, one per --train_file source (None without it); ConfigError when they do not fit."""
    if data.train_weights is None:
        return None
    n_sources = len(str(data.train_file).split(","))
    weights = []
    for i, part in enumerate(str(data.train_weights).split(","), 1):
        try:
            w = float(part)
        except ValueError:
            raise ConfigError(f"--train_weights {data.train_weights!r}: {part.strip()!r} is not a number; give one "
                              "number > 0 per --train_file source, comma-separated") from None
        if not _finite(w) or w <= 0:
            raise ConfigError(f"--train_weights: weight {i} is {part.strip()}; each must be a finite number > 0 (leave "
                              "a source out of --train_file rather than weighting it 0)")
        weights.append(w)
    if n_sources == 1:
        raise ConfigError("--train_weights weighs the sources of a mixture, and --train_file has one; give several "
                          "comma-separated sources or leave --train_weights out")
    if len(weights) != n_sources:
        raise ConfigError(f"--train_weights gives {len(weights)} weights for {n_sources} --train_file sources; give one "
                          "per source, in the same order, or leave it out (each source in proportion to its size)")
    return weights


# The CLoRA group: one flag per CLoRAConfig field, named by its metadata. P's seed is --seed (TrainArguments).
# CLoRAConfig's annotations are strings (postponed evaluation); target_modules ("a,b" or all-linear) is a str here.
_CLI_TYPES = {"int": int, "float": float, "str": str}
CLoRAArguments = dataclasses.make_dataclass("CLoRAArguments", [
    (f.metadata["flag"], _CLI_TYPES.get(f.type, str), field(default=f.default, metadata={"help": f.metadata["help"]}))
    for f in dataclasses.fields(CLoRAConfig) if f.name != "seed" and f.metadata["flag"]])
CLoRAArguments.__doc__ = "LoRA and CLoRA settings (generated from CLoRAConfig: same defaults and help)."


@dataclass
class TrainArguments:
    output_dir: str = field(metadata={"help": "Checkpoints (checkpoint-STEP/), metrics.jsonl, loss_curve.png and the final adapter/ go here."})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed JSON config (ds_configs/zero2.json, zero3.json, zero3_offload.json)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a previous run in output_dir (removed only once every input has been checked and the new run is about to write)."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Micro-batch per device (rows when packing)."})
    per_device_eval_batch_size: int = field(default=4, metadata={"help": "Evaluation batch per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (> 0)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs, used when max_steps is not set."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps (>= 0, at most the run's steps)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear | cosine | constant (after warmup)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (>= 0)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    seed: int = field(default=42, metadata={"help": "Seed for LoRA init, data order, dropout and the CLoRA subspaces P."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision."})
    fp16: bool = field(default=False, metadata={"help": "float16 mixed precision with dynamic loss scaling (GPU only)."})
    gradient_checkpointing: str = field(default="off", metadata={"help": "Activation checkpointing of the decoder layers: off | full | selective | every_N. full (a bare --gradient_checkpointing, or true): each layer keeps its input only and recomputes its forward in backward; selective: each layer keeps its matmul and attention outputs and recomputes the cheap ops between them (norms, RoPE, SwiGLU, casts; non-reentrant only); every_N: full checkpointing of every N-th layer (0, N, 2N, ...), e.g. every_2. docs/performance.md says what each trades.", "nargs": "?", "const": "full"})
    gradient_checkpointing_reentrant: bool = field(default=False, metadata={"help": "Use reentrant checkpointing (default non-reentrant)."})
    activation_offloading: bool = field(default=False, metadata={"help": "Move the tensors the decoder layers save for backward (with checkpointing: the checkpointed layers' inputs) to pinned CPU memory in forward, copied on a side CUDA stream, and back in backward; tensors under 1 MiB and parameters stay on the device. Combines with every --gradient_checkpointing policy."})
    clora_p_shard: str = field(default="auto", metadata={"help": "auto | off. auto: with more than one rank, each rank keeps 1/W of every module's P columns (the same subspaces and gradients, 1/W of P's memory, no extra communication); off: every rank keeps all of P."})
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps (0: only at the end)."})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "Keep at most N complete checkpoints (older complete ones are deleted)."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps (metrics.jsonl, progress bar, monitors)."})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps (needs eval_file; default: at the end only): each eval set's loss, and multiple-choice accuracy by log-likelihood for a set that is a commonsense task."})
    save_best_metric: Optional[str] = field(default=None, metadata={"help": "eval_loss | eval_accuracy (a bare --eval_file) or eval_SET_loss | eval_SET_accuracy (a named set SET=SOURCE; accuracy for a commonsense task only): keep the best checkpoint by this metric besides the newest (within --save_total_limit, which must then be >= 2); needs --eval_steps dividing --save_steps."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A checkpoint-STEP path, or auto (the newest complete checkpoint in output_dir; starts fresh, and says so, when there is none). The checkpoint must have been trained with the same settings."})
    optim: str = field(default="auto", metadata={"help": "auto | adamw_torch | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit. auto: the DeepSpeed config's optimizer (DeepSpeed's AdamW when its type is auto); the others are handed to DeepSpeed as a client optimizer (bitsandbytes for the 8-bit and paged ones); the config's optimizer type must then be auto."})
    report_to: str = field(default="none", metadata={"help": "none | tensorboard | wandb | csv (comma-separated for several): DeepSpeed's monitor."})
    profile_steps: Optional[str] = field(default=None, metadata={"help": "Profile optimizer steps A-B (1-based, e.g. 6-7) with torch.profiler on rank 0: OUTPUT_DIR/profile/ gets a Chrome trace and the top ops by time."})
    fused_lora: str = field(default="auto", metadata={"help": "auto | off. auto: every LoRA layer with LoRA dropout 0 (--lora_dropout 0) over a plain linear base runs as one fused autograd Function (y = W·x + s·B·(A·x), the scale folded into the GEMM; the CLoRA penalty taken inside, exact under ZeRO-3 and checkpointing); LoRA dropout > 0 and bitsandbytes 4-/8-bit bases keep PEFT's path (the log says which); off: PEFT's path everywhere."})
    chunked_loss: str = field(default="auto", metadata={"help": "auto | off. The task loss from the last hidden state in chunks of tokens through the output layer, never the full float32 logits (the same loss and gradients; only label tokens enter the output GEMM). auto: on for LLaMA, Mistral and Qwen2/3 models (it measured less memory and less time on CPU: docs/performance.md), HF's loss for other architectures (the log says so); off: HF's loss over the full logits."})
    compile_layers: bool = field(default=False, metadata={"help": "torch.compile every decoder layer (one graph per layer shape, shared by all layers; the sequence length becomes symbolic at its first change, so later steps do not recompile: compiled_graphs in metrics.jsonl counts). The CLoRA penalty is then taken from the LoRA weights, outside the layers (the same R and gradient). Combines with ZeRO-0/1/2 and every --gradient_checkpointing policy; refused with ZeRO-3, --activation_offloading and a 4-/8-bit base. Off by default: docs/performance.md has what it measured."})
    compile_backend: str = field(default="inductor", metadata={"help": "The torch.compile backend of --compile_layers: inductor (default; on a CPU it builds C++ kernels, so it needs a C++ compiler and Python's headers) or a debugging backend such as aot_eager."})
    peak_tflops: Optional[float] = field(default=None, metadata={"help": "Peak dense TFLOP/s of one GPU, for the mfu column of metrics.jsonl. Default: from the GPU's name (its bf16/fp16 tensor-core rate; the table is in docs/performance.md) when training in bf16 or fp16; mfu is null on the CPU, for fp32 training and for a GPU not in the table."})
    local_rank: int = field(default=-1, metadata={"help": "Set by the deepspeed launcher."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, CLoRAArguments, TrainArguments)


def arguments_dict(*groups) -> dict:
    out = {}
    for g in groups:
        out.update(asdict(g))
    return out


def clora_config(clora_args, train: TrainArguments) -> CLoRAConfig:
    """The CLoRAConfig the flags describe (P's seed is --seed)."""
    values = {f.name: getattr(clora_args, f.metadata["flag"]) for f in dataclasses.fields(CLoRAConfig) if f.name != "seed" and f.metadata["flag"]}
    return CLoRAConfig(seed=train.seed, **values)


def profile_window(spec: str) -> Optional[Tuple[int, int]]:
    """"A-B" (or "A") -> (A, B), 1-based optimizer steps; None when it does not parse."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec or "")
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    return (first, last) if 1 <= first <= last else None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def argument_problems(model: ModelArguments, data: DataArguments, clora_args, train: TrainArguments) -> List[str]:
    """Each problem with the arguments, one message each (empty: they are valid). Pure: reads no file."""
    problems: List[str] = []
    if model.attn_implementation not in ATTENTION_CHOICES:
        problems.append(f"--attn_implementation {model.attn_implementation!r}: choose {', '.join(ATTENTION_CHOICES)}")
    if data.dataset_format not in DATASET_FORMATS:
        problems.append(f"--dataset_format {data.dataset_format!r}: choose {', '.join(DATASET_FORMATS)}")
    if data.max_seq_length < 8:
        problems.append(f"--max_seq_length {data.max_seq_length} is too small (at least 8)")
    for parse in (train_sources, eval_sources, mixture_weights):
        try:
            parse(data)
        except ConfigError as err:
            problems.append(str(err))
    values = {f.name: getattr(clora_args, f.metadata["flag"]) for f in dataclasses.fields(CLoRAConfig) if f.name != "seed" and f.metadata["flag"]}
    flag = {f.name: f.metadata["flag"] for f in dataclasses.fields(CLoRAConfig)}
    problems += [f"--{flag[name]} {text}" for name, text in CLoRAConfig.problems({**values, "seed": train.seed})]
    if train.bf16 and train.fp16:
        problems.append("--bf16 and --fp16 are both set; choose one")
    if model.load_in_4bit and model.load_in_8bit:
        problems.append("--load_in_4bit and --load_in_8bit are both set; choose one")
    if model.base_adapters and (model.load_in_4bit or model.load_in_8bit):
        problems.append(f"--base_adapters with {'--load_in_4bit' if model.load_in_4bit else '--load_in_8bit'}: merging "
                        "into a quantized base is lossy (the merged weights are quantized again, and the earlier "
                        "adapters' update is lost to the quantization error); merge them into a full-precision copy of "
                        "the base (PEFT's merge_and_unload, saved) and quantize that, or train without quantization")
    if model.bnb_4bit_quant_type not in ("nf4", "fp4"):
        problems.append(f"--bnb_4bit_quant_type {model.bnb_4bit_quant_type!r}: choose nf4 or fp4")
    if train.fp16 and (model.load_in_4bit or model.load_in_8bit):
        problems.append("--fp16 with a quantized base (--load_in_4bit / --load_in_8bit) is not supported: train QLoRA in "
                        "--bf16 (or fp32); DeepSpeed's fp16 loss scaling over a bitsandbytes base is untested here")
    problems += checkpointing_problems(train.gradient_checkpointing, train.gradient_checkpointing_reentrant)
    if train.clora_p_shard not in ("auto", "off"):
        problems.append(f"--clora_p_shard {train.clora_p_shard!r}: choose auto or off")
    for flag in ("fused_lora", "chunked_loss"):
        if getattr(train, flag) not in ("auto", "off"):
            problems.append(f"--{flag} {getattr(train, flag)!r}: choose auto or off")
    if train.peak_tflops is not None and not (_finite(train.peak_tflops) and train.peak_tflops > 0):
        problems.append(f"--peak_tflops {train.peak_tflops}: give the GPU's peak dense TFLOP/s, a number > 0 (e.g. 989 "
                        "for an H100 SXM in bf16), or leave it out")
    if train.optim not in OPTIMIZERS:
        problems.append(f"--optim {train.optim!r}: choose {', '.join(OPTIMIZERS)}")
    if train.lr_scheduler_type not in HF_SCHEDULERS:
        problems.append(f"--lr_scheduler_type {train.lr_scheduler_type!r}: choose {', '.join(HF_SCHEDULERS)}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps"):
        if getattr(train, name) < 1:
            problems.append(f"--{name} must be >= 1, got {getattr(train, name)}")
    if not _finite(train.learning_rate) or train.learning_rate <= 0:
        problems.append(f"--learning_rate must be a finite number > 0, got {train.learning_rate}")
    for name in ("weight_decay", "max_grad_norm"):
        if not _finite(getattr(train, name)) or getattr(train, name) < 0:
            problems.append(f"--{name} must be a finite number >= 0, got {getattr(train, name)}")
    if train.warmup_steps < 0:
        problems.append(f"--warmup_steps must be >= 0, got {train.warmup_steps}")
    elif train.max_steps > 0 and train.warmup_steps > train.max_steps:
        problems.append(f"--warmup_steps {train.warmup_steps} exceeds --max_steps {train.max_steps}: the learning rate "
                        "would never reach --learning_rate")
    if not _finite(train.num_train_epochs):
        problems.append(f"--num_train_epochs must be a finite number, got {train.num_train_epochs}")
    elif train.max_steps <= 0 and train.num_train_epochs <= 0:
        problems.append("set --max_steps > 0 or --num_train_epochs > 0")
    if train.seed < 0:
        problems.append(f"--seed must be >= 0, got {train.seed}")
    if train.save_steps < 0:
        problems.append(f"--save_steps must be >= 0 (0: only at the end), got {train.save_steps}")
    if train.save_total_limit is not None and train.save_total_limit < 1:
        problems.append(f"--save_total_limit must be >= 1, got {train.save_total_limit}")
    if train.eval_steps is not None and train.eval_steps < 1:
        problems.append(f"--eval_steps must be >= 1, got {train.eval_steps}")
    bad_monitors = [m for m in train.report_to.split(",") if m.strip() not in MONITORS]
    if bad_monitors:
        problems.append(f"--report_to {bad_monitors}: choose {', '.join(MONITORS)}")
    if train.profile_steps is not None and profile_window(train.profile_steps) is None:
        problems.append(f"--profile_steps {train.profile_steps!r}: give A-B with 1 <= A <= B (e.g. 6-7)")
    if train.eval_steps is not None and not data.eval_file:
        problems.append("--eval_steps needs --eval_file")
    if train.save_best_metric is not None:
        if best_metric_direction(train.save_best_metric) is None:
            problems.append(f"--save_best_metric {train.save_best_metric!r}: choose eval_loss or eval_accuracy (a bare "
                            "--eval_file), or eval_SET_loss or eval_SET_accuracy (a named eval set SET=SOURCE)")
        if not train.eval_steps or (train.save_steps and train.save_steps % train.eval_steps):
            problems.append("--save_best_metric needs --eval_steps, and --save_steps a multiple of it (every checkpoint "
                            "is then evaluated)")
        if train.save_total_limit is not None and train.save_total_limit < 2:
            problems.append("--save_best_metric needs --save_total_limit >= 2 (the best and the newest) or no limit")
    if train.resume_from_checkpoint and train.overwrite_output_dir:
        problems.append("--resume_from_checkpoint and --overwrite_output_dir contradict each other: continue the run in "
                        "--output_dir or replace it, not both")
    return problems


def validate_arguments(model: ModelArguments, data: DataArguments, clora_args, train: TrainArguments) -> None:
    """Every problem in one ConfigError (litgpt's validate_args habit)."""
    problems = argument_problems(model, data, clora_args, train)
    if problems:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------------
# parsing: flags and YAML/JSON config files
# ---------------------------------------------------------------------------------------------------
def build_parser(description: Optional[str] = None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ARGUMENT_CLASSES, description=description,
                              epilog="Flags may also be given in a YAML/JSON file: launch/train.py FILE [flags].")
    parser.add_argument("--config", help="YAML/JSON file of flags (same names, without --); flags given here override it.")
    return parser


def config_file_to_argv(path: str, known: Sequence[str]) -> List[str]:
    """A YAML/JSON file of flags -> argv; ConfigError naming the file (and line) for anything wrong with it."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: YAML syntax error ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of argument names to values")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {unknown}; see `python launch/train.py --help`")
    argv = []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            raise ConfigError(f"config file {path}: {key} must be a single value, found a mapping")
        argv += [f"--{key}", str(value)]
    return argv


def parse_train_arguments(argv: Sequence[str], description: Optional[str] = None):
    """(ModelArguments, DataArguments, CLoRAArguments, TrainArguments) from flags and an optional config file
    (first argument, or --config FILE; flags override it). Unknown flags exit with argparse's usage message."""
    parser = build_parser(description)
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--config"] + argv
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a file")
        known = [a.dest for a in parser._actions]
        argv = config_file_to_argv(argv[i + 1], known) + argv[:i] + argv[i + 2:]
    *outputs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return tuple(outputs[: len(ARGUMENT_CLASSES)])  # the last output is the namespace holding --config
