"""The DeepSpeed training loop: setup -> train -> save_checkpoint -> final adapter.

    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json --model_name_or_path M \
        --train_file data.jsonl --output_dir OUT ...

Checkpoints: OUT/checkpoint-STEP/ holds DeepSpeed's sharded state of the trainable parameters and the
optimizer (frozen weights excluded), trainer_state.json (step, data position, settings), one
rng_state_RANK.pt per rank, and COMPLETE, written last, after every rank has finished. Only complete
checkpoints are resumed from or deleted by --save_total_limit.

Loss normalisation: every micro-batch's task loss is sum(token losses) / (loss tokens of the whole global
batch), times world·accum to undo DeepSpeed's averaging, so the update is the same whatever the split
into ranks and micro-batches.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .adapter import attach_clora
from .arguments import DataArguments, ModelArguments, TrainArguments, arguments_dict, profile_window
from .checkpoint import CHECKPOINT_RE, COMPLETE_MARKER, STATE_FILE, TRAIN_CONFIG_FILE, convert_checkpoint, list_checkpoints
from .config import CLoRAConfig
from .data import GlobalBatches, load_records, loss_token_count, pack_examples, pad_batch, tokenize_records

RUN_ARTIFACTS = ("metrics.jsonl", "train_config.json", "adapter", "loss_curve.png", "profile")


class ConfigError(ValueError):
    """A DeepSpeed config / CLI contradiction or an unusable output directory."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class SiblingFailed(RuntimeError):
    """Another rank hit an error and reports it; this rank exits quietly."""


def collective_device() -> torch.device:
    """Where a tensor must live for a collective: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t)
    return t.item() > 0


def on_rank0(fn):
    """Run fn on rank 0 only (None elsewhere); an error there is raised on rank 0 and stops the others."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the other ranks know
            error = err
    if _any_rank(error is not None):
        raise error if error is not None else SiblingFailed()
    return result


def rank0_first(fn):
    """Run fn on rank 0, then (if it worked everywhere) on the others; an error on any rank stops all."""
    result = on_rank0(fn)
    if rank() != 0:
        result = fn()
    return result


def log(msg: str) -> None:
    if rank() == 0:
        print(f"[clora_ds] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# DeepSpeed config: fill "auto" from the CLI, refuse contradictions
# ---------------------------------------------------------------------------------------------------
HF_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def make_lr_scheduler(train: TrainArguments, total_steps: int):
    """For "scheduler": {"type": "auto"}: transformers' schedule, handed to deepspeed.initialize (which checkpoints it)."""
    from transformers import get_scheduler

    def build(optimizer):
        return get_scheduler(HF_SCHEDULERS[train.lr_scheduler_type], optimizer, num_warmup_steps=train.warmup_steps,
                             num_training_steps=total_steps)

    return build


def resolve_ds_config(raw: dict, train: TrainArguments, world: int, hidden_size: int, total_steps: int, output_dir: Path) -> dict:
    """The DeepSpeed config with every "auto" filled from the CLI; ConfigError listing each contradiction."""
    cfg = copy.deepcopy(raw)
    problems = []

    def fill(section: dict, key: str, value, flag: str):
        if key not in section or section[key] == "auto":
            section[key] = value
        elif section[key] != value and not (isinstance(value, float) and isinstance(section[key], (int, float)) and math.isclose(section[key], value)):
            problems.append(f"{key}={section[key]!r} in the DeepSpeed config contradicts {flag} (= {value!r}); set it to \"auto\" or make them agree")

    micro, accum = train.per_device_train_batch_size, train.gradient_accumulation_steps
    fill(cfg, "train_micro_batch_size_per_gpu", micro, "--per_device_train_batch_size")
    fill(cfg, "gradient_accumulation_steps", accum, "--gradient_accumulation_steps")
    fill(cfg, "train_batch_size", micro * accum * world, f"--per_device_train_batch_size x --gradient_accumulation_steps x {world} ranks")
    fill(cfg, "gradient_clipping", float(train.max_grad_norm), "--max_grad_norm")
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
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
        cfg["tensorboard"] = {"enabled": True, "output_path": str(output_dir / "monitor"), "job_name": job}
    if "csv" in monitors:
        cfg["csv_monitor"] = {"enabled": True, "output_path": str(output_dir / "monitor"), "job_name": job}
    if "wandb" in monitors:
        cfg["wandb"] = {"enabled": True, "project": os.environ.get("WANDB_PROJECT", "clora_ds"), "group": job}
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        problems.append(f"\"auto\" is not supported for {', '.join(leftover)}; give explicit values")
    if problems:
        raise ConfigError("DeepSpeed config does not fit the command line:\n  - " + "\n  - ".join(problems))
    return cfg


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# ---------------------------------------------------------------------------------------------------
# output directory and checkpoints
# ---------------------------------------------------------------------------------------------------
def check_output_dir(output_dir: Path, train: TrainArguments) -> Optional[Path]:
    """The checkpoint to resume from (or None); ConfigError if output_dir holds a run we may not touch."""
    if train.resume_from_checkpoint:
        if train.resume_from_checkpoint == "auto":
            done = list_checkpoints(output_dir)
            return done[-1][1] if done else None
        ckpt = Path(train.resume_from_checkpoint)
        if not (ckpt / COMPLETE_MARKER).is_file():
            raise ConfigError(f"--resume_from_checkpoint {ckpt}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        return ckpt
    if output_dir.is_dir() and not train.overwrite_output_dir:
        found = [p.name for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) or p.name in RUN_ARTIFACTS]
        if found:
            raise ConfigError(f"--output_dir {output_dir} holds another run ({', '.join(sorted(found)[:5])}); pass "
                              "--resume_from_checkpoint auto to continue it or --overwrite_output_dir to replace it")
    return None


def clear_output_dir(output_dir: Path) -> None:
    if rank() == 0 and output_dir.is_dir():
        for p in output_dir.iterdir():
            if CHECKPOINT_RE.match(p.name) or p.name in RUN_ARTIFACTS or p.name == "monitor":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    barrier()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(engine, output_dir: Path, step: int, state: dict, save_total_limit: Optional[int]) -> Path:
    """Every rank calls this. COMPLETE is written by rank 0 after all ranks wrote their shards."""
    tag = f"checkpoint-{step}"
    ckpt = output_dir / tag
    if rank() == 0 and ckpt.exists():  # a leftover from a crash mid-save: never half-trust it
        shutil.rmtree(ckpt)
    barrier()
    engine.save_checkpoint(str(output_dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    torch.save(_rng_state(), ckpt / f"rng_state_{rank()}.pt")
    if rank() == 0:
        (ckpt / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        engine.module.clora.config.save(ckpt)
        if (output_dir / TRAIN_CONFIG_FILE).is_file():  # a checkpoint describes itself (base model, data, dtype)
            shutil.copyfile(output_dir / TRAIN_CONFIG_FILE, ckpt / TRAIN_CONFIG_FILE)
    barrier()
    _fault_point("kill_in_save", step)
    if rank() == 0:
        (ckpt / COMPLETE_MARKER).write_text(f"{step}\n")
        if save_total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    _fault_point("kill_after_save", step)
    return ckpt


def _fault_point(name: str, step: int) -> None:
    """Test hook: CLORA_DS_FAULT=NAME:STEP SIGKILLs rank 0 here (used to prove crash safety)."""
    if os.environ.get("CLORA_DS_FAULT") == f"{name}:{step}" and rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------
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


def flash_attention_available():
    """(True, "") when flash-attn can run here, else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "flash-attn needs a CUDA GPU and none is visible"
    try:
        import flash_attn  # noqa: F401  (the import is the check)
    except ImportError as err:
        return False, f"the flash-attn package does not import ({err}); pip install 'clora_ds[flash]'"
    return True, ""


def choose_attention(requested: str, packing: bool) -> str:
    """The attn_implementation to build the model with.

    auto: flash_attention_2 when flash-attn imports on CUDA (its varlen kernels handle packed rows), else
    SDPA. SDPA with --packing runs per packed sequence (clora_ds.attention) instead of over a dense
    block-diagonal mask: same result, Σ len² work instead of T² per row.
    """
    flash_ready, why_not = flash_attention_available()
    attn = requested
    if requested == "auto":
        attn = "flash_attention_2" if flash_ready else "sdpa"
    elif requested == "flash_attention_2" and not flash_ready:
        raise ConfigError(f"--attn_implementation flash_attention_2: {why_not}. Use --attn_implementation sdpa (or auto, "
                          "which picks flash_attention_2 only where it works)")
    if attn == "sdpa" and packing:
        from .attention import PACKED_SDPA

        return PACKED_SDPA
    return attn


def read_deepspeed_config(path: Optional[str]) -> dict:
    """The --deepspeed JSON file as written (before "auto" is filled); ConfigError when missing or malformed."""
    if not path:
        raise ConfigError("--deepspeed CONFIG is required (ds_configs/zero2.json, zero3.json or zero3_offload.json)")
    if not Path(path).is_file():
        raise ConfigError(f"--deepspeed {path}: no such file")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed {path}:{err.lineno}: malformed JSON ({err.msg})") from None


def check_model_path(name_or_path: str) -> None:
    p = Path(name_or_path)
    looks_local = p.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") != 1
    if looks_local and not p.exists():
        raise ConfigError(f"--model_name_or_path {name_or_path}: no such directory")
    if p.exists() and not (p / "config.json").is_file():
        raise ConfigError(f"--model_name_or_path {name_or_path}: no config.json there; expected a saved HF model")


def training_dtype(train: TrainArguments) -> torch.dtype:
    return torch.bfloat16 if train.bf16 else torch.float16 if train.fp16 else torch.float32


def build_model(model_args: ModelArguments, train: TrainArguments, ds_config: dict, attn: str):
    """The base model (under zero.Init for ZeRO-3, so it is never whole on one rank) with CLoRA attached."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None  # noqa: F841  (from_pretrained checks it)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=training_dtype(train),
                                                 attn_implementation=attn, trust_remote_code=model_args.trust_remote_code)
    model.config.use_cache = False  # a KV cache in training also hides packed sequences from the mask builder
    torch.manual_seed(train.seed)
    clora = CLoRAConfig(r=train.lora_r, alpha=train.lora_alpha, dropout=train.lora_dropout, target_modules=train.target_modules,
                        k=train.clora_k, lam=train.clora_lambda, p_init=train.clora_p_init, seed=train.seed,
                        p_dtype=train.clora_p_dtype)
    device = "cuda" if torch.cuda.is_available() else None
    model = attach_clora(model, clora, subspace_device=device)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": train.gradient_checkpointing_reentrant})
        model.enable_input_require_grads()
    return model, keep_alive


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------
def prepare_data(path, data: DataArguments, tokenizer, cache_dir: Path, what: str):
    tok = tokenize_records(load_records(path), path, tokenizer, data.dataset_format, data.max_seq_length,
                           data.train_on_prompt, cache_dir)
    log(f"{what} data {path}: {tok.n_records} records, format {tok.dataset_format}; {tok.n_truncated} truncated to "
        f"{data.max_seq_length} tokens, {tok.n_dropped} dropped (no response token left)")
    return tok


def evaluate(engine, examples, batch_size: int, pad_id: int) -> float:
    """Token-mean loss over examples sharded across ranks."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=collective_device())  # NCCL cannot reduce a CPU tensor
    mine = examples[rank()::world_size()]
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            batch = {k: v.to(engine.device) for k, v in pad_batch(chunk, pad_id).items()}
            n = sum(loss_token_count(e["labels"]) for e in chunk)
            out = engine(**batch, use_cache=False, num_items_in_batch=max(n, 1))
            total += torch.tensor([out.loss.item() * n, n], dtype=torch.float64, device=total.device)
    if dist.is_initialized():
        dist.all_reduce(total)
    engine.train()
    return (total[0] / total[1].clamp(min=1)).item()


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    train_rows = [r for r in rows if "task_loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["task_loss"] for r in train_rows], label="task loss")
    ax.plot([r["step"] for r in train_rows], [r["task_loss"] + r["penalty"] for r in train_rows], label="task + λ·R", alpha=0.7)
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["eval_loss"] for r in eval_rows], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def train(model_args: ModelArguments, data: DataArguments, train: TrainArguments) -> Path:
    import deepspeed
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    output_dir = Path(train.output_dir)
    resume = check_output_dir(output_dir, train)
    check_model_path(model_args.model_name_or_path)
    raw_ds = read_deepspeed_config(train.deepspeed)

    hf_config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache_dir = Path(data.cache_dir) if data.cache_dir else output_dir / ".cache"
    # rank 0 tokenizes first and fills the cache; the others then read it
    tokenized, eval_examples = rank0_first(lambda: (
        prepare_data(data.train_file, data, tokenizer, cache_dir, "train"),
        prepare_data(data.eval_file, data, tokenizer, cache_dir, "eval").examples if data.eval_file else None))
    units = pack_examples(tokenized.examples, data.max_seq_length, train.seed) if data.packing else tokenized.examples
    if data.packing:
        log(f"packed {len(tokenized.examples)} examples into {len(units)} rows of <= {data.max_seq_length} tokens")
    world = world_size()
    batches = GlobalBatches(units, train.per_device_train_batch_size, world, train.gradient_accumulation_steps,
                            train.seed, data.packing, pad_id)
    total_steps = train.max_steps if train.max_steps > 0 else math.ceil(train.num_train_epochs * batches.steps_per_epoch)
    ds_config = resolve_ds_config(raw_ds, train, world, hf_config.hidden_size, total_steps, output_dir)

    if resume is not None:
        saved_world = len(list(resume.glob("rng_state_*.pt")))
        if saved_world != world:
            raise ConfigError(f"cannot resume {resume}: it was written by {saved_world} ranks and this run has {world}; "
                              f"DeepSpeed cannot re-partition ZeRO optimizer state to another world size. Resume with "
                              f"{saved_world} ranks, or export the adapter (OUT/adapter) and start a new run from it")
    attn = choose_attention(model_args.attn_implementation, data.packing)
    arch_note = deepspeed_cuda_arch_list()
    if arch_note:
        log(arch_note)
    if resume is None and train.overwrite_output_dir:
        clear_output_dir(output_dir)
    if rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        settings = {"arguments": arguments_dict(model_args, data, train), "deepspeed": ds_config, "world_size": world,
                     "attention": attn}
        (output_dir / "train_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    barrier()

    log(f"attention: {attn} (asked: {model_args.attn_implementation}, packing={data.packing}); world size {world}; "
        f"ZeRO stage {ds_config.get('zero_optimization', {}).get('stage', 0)}; {total_steps} steps of "
        f"{batches.global_batch} {'rows' if data.packing else 'examples'}")
    model, keep_alive = build_model(model_args, train, ds_config, attn)
    clora = model.clora
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config,
                                      lr_scheduler=None if "scheduler" in ds_config else make_lr_scheduler(train, total_steps))
    start_step = 0
    if resume is not None:
        engine.load_checkpoint(str(resume.parent), tag=resume.name, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
        state = json.loads((resume / STATE_FILE).read_text())
        if state["global_batch"] != batches.global_batch or state["packing"] != data.packing:
            raise ConfigError(f"cannot resume {resume}: it was trained with global batch {state['global_batch']} "
                              f"(packing={state['packing']}), this run has {batches.global_batch} (packing={data.packing})")
        rng_file = resume / f"rng_state_{rank()}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        start_step = state["step"]
        log(f"resumed from {resume} at step {start_step}")

    metrics = open(output_dir / "metrics.jsonl", "a") if rank() == 0 else None
    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=rank() != 0, dynamic_ncols=True)
    scale = world * train.gradient_accumulation_steps
    window_tokens, window_start = 0, time.time()
    profiler = StepProfiler(train.profile_steps, output_dir)
    for step in range(start_step, total_steps):
        profiler.before(step)
        n_loss_tokens = batches.label_tokens(step)
        step_lr = engine.get_lr()[0]  # the lr this step uses (the scheduler advances inside engine.step)
        step_task = torch.zeros((), dtype=torch.float64, device=engine.device)
        for batch in batches.micro_batches(step, rank()):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            out = engine(**batch, use_cache=False, num_items_in_batch=n_loss_tokens)
            loss = clora.penalty_term(out.loss * scale)
            engine.backward(loss)
            engine.step()
            step_task += out.loss.detach().double()
        if dist.is_initialized():
            dist.all_reduce(step_task)
        profiler.after(step)
        window_tokens += batches.real_tokens(step)
        done = step + 1
        if done % train.logging_steps == 0 or done == total_steps:
            elapsed = max(time.time() - window_start, 1e-9)
            row = {"step": done, "epoch": round(done / batches.steps_per_epoch, 4), "task_loss": step_task.item(),
                   "penalty": clora.config.lam * clora.last_penalty.item(), "R": clora.last_penalty.item(),
                   "lr": step_lr, "grad_norm": _grad_norm(engine), "tokens_per_s": window_tokens / elapsed,
                   "peak_mem_gb": round(peak_memory_gb(), 3)}
            window_tokens, window_start = 0, time.time()
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"Train/{k}", v, done) for k, v in row.items() if k != "step" and v is not None])
            bar.set_postfix(loss=f"{row['task_loss']:.4f}", pen=f"{row['penalty']:.3g}", lr=f"{row['lr']:.2e}",
                            tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if eval_examples and train.eval_steps and done % train.eval_steps == 0 and done != total_steps:
            _log_eval(engine, eval_examples, train, pad_id, done, metrics)
        if train.save_steps and done % train.save_steps == 0 and done != total_steps:
            save_training_checkpoint(engine, output_dir, done, _state(done, batches, data), train.save_total_limit)
    bar.close()
    if eval_examples:
        _log_eval(engine, eval_examples, train, pad_id, total_steps, metrics)
    final = save_training_checkpoint(engine, output_dir, total_steps, _state(total_steps, batches, data), train.save_total_limit)
    adapter = output_dir / "adapter"  # what `clora-ds-convert OUT/checkpoint-STEP` writes: one code path
    on_rank0(lambda: convert_checkpoint(final, adapter, overwrite=True, log=log))
    if metrics:
        metrics.close()
        plot_losses(output_dir / "metrics.jsonl", output_dir / "loss_curve.png")
    log(f"done: adapter in {adapter}, metrics in {output_dir / 'metrics.jsonl'}")
    engine.destroy()
    return adapter


class StepProfiler:
    """torch.profiler over optimizer steps [first, last] (1-based) on rank 0; other ranks and steps pay nothing.

    Writes OUTPUT_DIR/profile/trace.json (chrome://tracing, Perfetto) and top_ops.txt (ops by self time on the
    GPU, or the CPU without one), and logs where they are.
    """

    def __init__(self, spec: Optional[str], output_dir: Path):
        window = profile_window(spec) if spec else None
        self.first, self.last = window if window and rank() == 0 else (0, -1)
        self.dir = output_dir / "profile"
        self.prof = None

    def before(self, step: int) -> None:
        if step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()

    def after(self, step: int) -> None:
        if self.prof is None or step + 1 != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.dir / "trace.json"))
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60)
        (self.dir / "top_ops.txt").write_text(f"steps {self.first}-{self.last}, sorted by {key}\n{table}\n")
        self.prof = None
        log(f"profiled steps {self.first}-{self.last}: {self.dir / 'trace.json'}, {self.dir / 'top_ops.txt'}")


def _state(step: int, batches: GlobalBatches, data: DataArguments) -> dict:
    return {"step": step, "epoch": step / batches.steps_per_epoch, "global_batch": batches.global_batch,
            "packing": data.packing, "steps_per_epoch": batches.steps_per_epoch}


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _log_eval(engine, examples, train, pad_id, step, metrics) -> None:
    loss = evaluate(engine, examples, train.per_device_eval_batch_size, pad_id)
    log(f"step {step}: eval loss {loss:.4f}")
    if metrics:
        metrics.write(json.dumps({"step": step, "eval_loss": loss}) + "\n")
        metrics.flush()
