"""The DeepSpeed config: read it, fill "auto" from the command line, refuse contradictions.

An explicit value that contradicts a flag is an error naming both, never a silent override (HF's rule for "auto",
stricter on the rest). Also here: what DeepSpeed's JIT op builder needs from the environment.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .errors import ConfigError, RunProblems

HF_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
OPTIMIZERS = ("auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")  # --optim
MONITORS = ("none", "tensorboard", "wandb", "csv")


def read_deepspeed_config(path: Optional[str]) -> dict:
    """The --deepspeed JSON file as written (before "auto" is filled); ConfigError when missing or malformed."""
    if not path:
        raise ConfigError("--deepspeed CONFIG is required (ds_configs/zero2.json, zero3.json or zero3_offload.json)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file")
    try:
        cfg = json.loads(p.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"--deepspeed {path}: not a text file (expected DeepSpeed's JSON config)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed {path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed {path}: expected a JSON object, found a {type(cfg).__name__}")
    stage = cfg.get("zero_optimization", {}).get("stage", 0) if isinstance(cfg.get("zero_optimization", {}), dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"--deepspeed {path}: zero_optimization.stage must be 0, 1, 2 or 3, found {stage!r}")
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def make_lr_scheduler(train, total_steps: int):
    """For "scheduler": {"type": "auto"}: transformers' schedule, handed to deepspeed.initialize (which checkpoints it)."""
    from transformers import get_scheduler

    def build(optimizer):
        return get_scheduler(HF_SCHEDULERS[train.lr_scheduler_type], optimizer, num_warmup_steps=train.warmup_steps,
                             num_training_steps=total_steps)

    return build


def make_client_optimizer(train, params):
    """The --optim optimizer over ``params`` (torch's AdamW, or bitsandbytes' 8-bit / paged AdamW), with the flags'
    lr, weight decay and AdamW's usual betas and eps; handed to deepspeed.initialize as a client optimizer."""
    import torch

    kwargs = dict(lr=train.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=train.weight_decay)
    if train.optim == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[train.optim]
    return cls(params, **kwargs)


def resolve_ds_config(raw: dict, train, world: int, hidden_size: int, total_steps: int, output_dir: Path) -> dict:
    """The DeepSpeed config with every "auto" filled from the CLI; RunProblems listing each contradiction."""
    cfg = copy.deepcopy(raw)
    problems: List[str] = []

    def fill(section: dict, key: str, value, flag: str):
        if key not in section or section[key] == "auto":
            section[key] = value
        elif section[key] != value and not (isinstance(value, float) and isinstance(section[key], (int, float))
                                            and math.isclose(section[key], value)):
            problems.append(f"{key}={section[key]!r} in the DeepSpeed config contradicts {flag} (= {value!r}); set it to "
                            "\"auto\" or make them agree")

    micro, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    fill(cfg, "train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size")
    fill(cfg, "gradient_accumulation_steps", accum, "--gradient_accumulation_steps")
    fill(cfg, "train_batch_size", micro * accum * world,
         f"--per_device_train_batch_size x --gradient_accumulation_steps x {world} ranks")
    fill(cfg, "gradient_clipping", float(train.max_grad_norm), "--max_grad_norm")
    opt = cfg.setdefault("optimizer", {"type": "auto", "params": {}})
    optim = getattr(train, "optim", "auto")
    if optim != "auto":  # a client optimizer (make_client_optimizer): the config may not name another
        if opt.get("type", "auto") != "auto":
            problems.append(f"optimizer.type={opt['type']!r} in the DeepSpeed config contradicts --optim {optim}; set the "
                            "type to \"auto\" (or drop the optimizer block) to use --optim, or drop --optim to use the "
                            "config's optimizer")
        if cfg.get("zero_optimization", {}).get("offload_optimizer"):
            problems.append(f"--optim {optim} cannot run with zero_optimization.offload_optimizer: DeepSpeed offloads only "
                            "its own CPU Adam; drop --optim (DeepSpeed's AdamW) or the optimizer offload")
        del cfg["optimizer"]
        cfg["zero_allow_untested_optimizer"] = True  # DeepSpeed refuses other optimizers under ZeRO without it
    else:
        if opt.get("type", "auto") == "auto":
            opt["type"] = "AdamW"
        params = opt.setdefault("params", {})
        fill(params, "lr", train.learning_rate, "--learning_rate")
        fill(params, "weight_decay", train.weight_decay, "--weight_decay")
        for key, default in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
            if params.get(key, "auto") == "auto":
                params[key] = default
    sched = cfg.get("scheduler")
    if sched is not None and sched.get("type", "auto") == "auto":
        del cfg["scheduler"]  # built from --lr_scheduler_type by make_lr_scheduler
    elif sched is not None:
        params = sched.setdefault("params", {})
        for key, value in (("warmup_max_lr", train.learning_rate), ("warmup_num_steps", train.warmup_steps),
                           ("total_num_steps", total_steps)):
            if params.get(key) == "auto":
                params[key] = value
    for section, flag, value in (("bf16", "--bf16", train.bf16), ("fp16", "--fp16", train.fp16)):
        sec = cfg.setdefault(section, {"enabled": "auto"})
        fill(sec, "enabled", value, flag)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    bucket = max(hidden_size * hidden_size, 2**20)  # HF's hidden², floored so tiny models do not make 1000s of calls
    for key, value in (("reduce_bucket_size", bucket),
                       ("allgather_bucket_size", bucket),
                       ("stage3_prefetch_bucket_size", int(0.9 * bucket)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    monitors = {m.strip() for m in train.report_to.split(",")} - {"none"}
    job = Path(output_dir).name or "clora"
    if "tensorboard" in monitors:
        cfg["tensorboard"] = {"enabled": True, "output_path": str(Path(output_dir) / "monitor"), "job_name": job}
    if "csv" in monitors:
        cfg["csv_monitor"] = {"enabled": True, "output_path": str(Path(output_dir) / "monitor"), "job_name": job}
    if "wandb" in monitors:
        cfg["wandb"] = {"enabled": True, "project": os.environ.get("WANDB_PROJECT", "clora_ds"), "group": job}
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        problems.append(f"\"auto\" is not supported for {', '.join(leftover)}; give explicit values")
    if problems:
        raise RunProblems(problems, "the DeepSpeed config does not fit the command line")
    return cfg


def _walk(d: dict, prefix: str = "") -> Iterator[Tuple[str, object]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


ARCH_SUFFIX_RE = re.compile(r"^(\d+\.\d+)[a-z]+(\+PTX)?$")


def deepspeed_cuda_arch_list() -> Optional[str]:
    """Make TORCH_CUDA_ARCH_LIST readable by DeepSpeed's JIT builder; returns a note when it was changed.

    PyTorch accepts arch-specific targets such as "9.0a" (sm_90a), and CUDA images often set them, but
    DeepSpeed's builder parses every entry as MAJOR.MINOR integers and fails on them ("invalid literal for
    int() with base 10: '0a'") before FusedAdam / cpu_adam are built. Its ops use no arch-specific
    instruction, so each "X.Ya" becomes "X.Y" for this process; the computation is unchanged.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    entries = [e for e in value.replace(" ", ";").split(";") if e]
    fixed = [ARCH_SUFFIX_RE.sub(r"\1\2", e) for e in entries]
    if fixed == entries:
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(dict.fromkeys(fixed))
    return (f"TORCH_CUDA_ARCH_LIST={value!r} has arch-specific targets DeepSpeed cannot parse; its JIT-built ops use "
            f"{os.environ['TORCH_CUDA_ARCH_LIST']!r}")


def precision_problems(bf16: bool, fp16: bool) -> List[str]:
    """--bf16 / --fp16 where this machine's DeepSpeed accelerator cannot train in that precision."""
    if not (bf16 or fp16):
        return []
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    problems = []
    if fp16 and not acc.is_fp16_supported():
        problems.append(f"--fp16: DeepSpeed's {name} accelerator cannot train in float16 here; use --bf16"
                        + ("" if acc.is_bf16_supported() else " on a GPU") + " or leave both off (float32)")
    if bf16 and not acc.is_bf16_supported():
        problems.append(f"--bf16: DeepSpeed's {name} accelerator cannot train in bfloat16 here (a GPU older than "
                        "Ampere?); use --fp16 or leave both off (float32)")
    return problems
