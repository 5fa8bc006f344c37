"""The DeepSpeed training loop: plan -> build -> train -> save -> final adapter, top to bottom.

    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero2.json --model_name_or_path M \
        --train_file data.jsonl --output_dir OUT ...

Everything is checked (``plan_run``) before the output directory is created, cleared or written; the model is
built and put in train mode; only then does the run write its first file. Checkpoints and the run directory's
layout: ``run_dir.py``; what a resume checks: ``resume.py``.

Loss normalisation: every micro-batch's task loss is sum(token losses) / (loss tokens of the whole global
batch), times world·accum to undo DeepSpeed's averaging, so the update is the same whatever the split
into ranks and micro-batches.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .calibration import data_subspaces
from .compile import compile_decoder_layers, compiled_graphs
from .batches import pad_batch
from .data import loss_token_count
from .loss import causal_lm_loss, chunked_loss_problem
from .distributed import collective_device, log, on_rank0, rank, rank0_first, world_size
from .ds_config import deepspeed_cuda_arch_list, make_client_optimizer, make_lr_scheduler, zero_stage
from .export.convert import convert_checkpoint
from .model import build_model, quantization_config, training_dtype
from .plan import RunPlan, plan_run
from .profiling import ModelFlops, StepProfiler, peak_tflops, squared_lengths
from .resume import load_checkpoint_safely
from .run_dir import ADAPTER_DIR, LOSS_CURVE_FILE, METRICS_FILE, MetricsLog, plot_losses, save_training_checkpoint, start_run_dir


def train(model_args, data_args, clora_args, train_args) -> Path:
    import deepspeed

    plan = rank0_first(lambda: plan_run(model_args, data_args, clora_args, train_args, world_size(),
                                        check_checkpoint_files=rank() == 0))
    for note in plan.notes + [deepspeed_cuda_arch_list()]:
        if note:
            log(note)
    batches, total_steps, out = plan.batches, plan.total_steps, plan.start.output_dir
    log(f"attention: {plan.attention} (asked: {model_args.attn_implementation}, packing={data_args.packing}); world size "
        f"{plan.world}; ZeRO stage {zero_stage(plan.ds_config)}; {total_steps} steps of {batches.global_batch} "
        f"{'rows' if data_args.packing else 'examples'}")

    dtype = training_dtype(train_args.bf16, train_args.fp16)
    quantization = quantization_config(model_args.load_in_4bit, model_args.load_in_8bit, model_args.bnb_4bit_quant_type, dtype)
    shard = (rank(), world_size()) if train_args.clora_p_shard == "auto" and world_size() > 1 else None
    model, keep_alive = build_model(model_args.model_name_or_path, plan.clora, plan.ds_config, plan.attention, dtype,
                                    train_args.gradient_checkpointing, train_args.gradient_checkpointing_reentrant,
                                    model_args.trust_remote_code, train_args.seed, quantization, shard,
                                    saved_subspaces=plan.calibration.saved if plan.calibration else None,
                                    fused_lora=train_args.fused_lora, chunked_loss=train_args.chunked_loss,
                                    activation_offloading=train_args.activation_offloading,
                                    base_adapters=plan.base_adapters)
    log(model.activation_memory.note())
    log(model.clora.fused_lora_note or "fused LoRA projection: off (--fused_lora off); PEFT's path for every layer")
    log("chunked loss: " + ("on (the loss from the last hidden state in chunks; never the full fp32 logits)" if model.chunked_loss
                            else "off (--chunked_loss off)" if train_args.chunked_loss == "off"
                            else f"off, HF's full-logits loss ({chunked_loss_problem(model)})"))
    log(f"P: {model.clora.p_nbytes / 2**20:,.1f} MiB ({model.clora.p_nbytes:,} bytes) on this rank"
        + (f" (sharded: {shard[1]} ranks hold a share of every module's k={plan.clora.k} columns each)" if shard
           else " (every rank holds all of it; --clora_p_shard auto shards it across ranks)" if world_size() > 1 else ""))
    if quantization is not None:
        packed = sum(1 for m in model.modules() if type(getattr(m, "weight", None)).__name__ in ("Params4bit", "Int8Params"))
        log(f"base: {'4-bit ' + model_args.bnb_4bit_quant_type if model_args.load_in_4bit else '8-bit'} "
            f"(bitsandbytes, {packed} quantized linear layers; compute and storage dtype {dtype})")
    start_run_dir(plan.start, plan.settings(model_args, data_args, clora_args, train_args))  # the run's first write
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if train_args.optim != "auto":
        optimizer = make_client_optimizer(train_args, trainable)
        log(f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__} (--optim {train_args.optim}), handed to "
            "DeepSpeed as a client optimizer; zero_allow_untested_optimizer is set so that ZeRO accepts it")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=plan.ds_config,
        lr_scheduler=None if "scheduler" in plan.ds_config else make_lr_scheduler(train_args, total_steps))
    data_subspaces(engine, model.clora, plan.calibration, out, train_args.per_device_eval_batch_size, log)  # activations P
    compiled = None
    if train_args.compile_layers:  # after calibration: its forward hooks are not for a compiled graph
        compiled = compile_decoder_layers(model, train_args.compile_backend)
        log(compiled.note())
    start_step = 0
    if plan.start.resume is not None:
        start_step = load_checkpoint_safely(engine, plan.start.resume, rank())
        log(f"resumed from {plan.start.resume} at step {start_step}")

    metrics = MetricsLog(out)
    peak = peak_tflops(train_args.peak_tflops, dtype)
    progress = StepLog(engine, model.clora, batches, metrics, total_steps, start_step, train_args.logging_steps,
                       ModelFlops.of(model), peak, compiled=compiled is not None)
    log(f"MFU over {peak:g} TFLOP/s per GPU" if peak else "MFU: null in metrics.jsonl (no peak known for this device "
        "and dtype; --peak_tflops gives one)")
    profiler = StepProfiler(train_args.profile_steps, out)
    evaluated: dict = {}  # step -> the metrics of the evaluation at that step (recorded in its checkpoint)
    keep = dict(best_metric=train_args.save_best_metric, protect=tuple(p for p in [plan.start.resume] if p))
    try:
        for step in range(start_step, total_steps):
            profiler.before(step)
            lr = engine.get_lr()[0]  # the lr this step uses (the scheduler advances inside engine.step)
            task_loss = train_step(engine, model.clora, batches, step, model.chunked_loss)
            profiler.after(step)
            done = progress.step(step, task_loss, lr)
            if done == total_steps:
                break
            if plan.eval_sets and train_args.eval_steps and done % train_args.eval_steps == 0:
                evaluated[done] = log_evaluation(engine, plan, train_args, done, metrics)
            if train_args.save_steps and done % train_args.save_steps == 0:
                save_training_checkpoint(engine, out, done, trainer_state(plan, done, evaluated.get(done)), plan.clora,
                                         train_args.save_total_limit, **keep)
    finally:
        progress.close()  # an error message then starts on a line of its own

    if plan.eval_sets:
        evaluated[total_steps] = log_evaluation(engine, plan, train_args, total_steps, metrics)
    final = save_training_checkpoint(engine, out, total_steps, trainer_state(plan, total_steps, evaluated.get(total_steps)),
                                     plan.clora, train_args.save_total_limit, **keep)
    adapter = out / ADAPTER_DIR  # what `clora-ds-convert OUT/checkpoint-STEP` writes: one code path
    on_rank0(lambda: convert_checkpoint(final, adapter, overwrite=True, log=log))
    metrics.close()
    if rank() == 0:
        plot_losses(out / METRICS_FILE, out / LOSS_CURVE_FILE)
    log(f"done: adapter in {adapter}, metrics in {out / METRICS_FILE}")
    engine.destroy()
    return adapter


def train_step(engine, clora, batches, step: int, chunked=None) -> float:
    """One optimizer step over this rank's micro-batches; returns the global batch's task loss. ``chunked``: the
    model's ChunkedCausalLMLoss (--chunked_loss), else HF's loss over the full logits."""
    n_loss_tokens = batches.label_tokens(step)
    scale = batches.world * batches.accum
    step_task = torch.zeros((), dtype=torch.float64, device=engine.device)
    for batch in batches.micro_batches(step, rank()):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = causal_lm_loss(engine, batch, n_loss_tokens, chunked)
        engine.backward(clora.penalty_term(loss * scale))
        engine.step()
        step_task += loss.detach().double()
    if dist.is_initialized():
        dist.all_reduce(step_task)
    return step_task.item()


class StepLog:
    """Per-step progress: the bar (rank 0) and, every logging_steps, a metrics.jsonl row and the DeepSpeed monitor.

    Throughput columns: tokens_per_s (real tokens of the global batch per second), tokens_per_s_per_gpu (over the
    world size) and mfu (``flops`` of those tokens per second per GPU over ``peak_tflops``; null without a peak).
    With ``compiled`` (--compile_layers) also compiled_graphs: the graphs torch.compile has built in this process."""

    def __init__(self, engine, clora, batches, metrics: MetricsLog, total_steps: int, start_step: int, every: int,
                 flops: Optional[ModelFlops] = None, peak_tflops: Optional[float] = None, compiled: bool = False):
        from tqdm import tqdm

        self.engine, self.clora, self.batches, self.metrics = engine, clora, batches, metrics
        self.total_steps, self.every = total_steps, every
        self.flops, self.peak_tflops, self.compiled = flops, peak_tflops, compiled
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=rank() != 0, dynamic_ncols=True)
        self.tokens, self.squared, self.since = 0, 0, time.time()

    def step(self, step: int, task_loss: float, lr: float) -> int:
        """Record 0-based ``step``; returns the number of steps done."""
        done = step + 1
        self.tokens += self.batches.real_tokens(step)
        if self.flops is not None and self.peak_tflops:
            self.squared += squared_lengths(self.batches, step)
        if done % self.every == 0 or done == self.total_steps:
            r = self.clora.total_penalty().item()  # with sharded P, summed over ranks (every rank is here)
            seconds = max(time.time() - self.since, 1e-9)
            per_gpu = self.tokens / seconds / self.batches.world
            mfu = None
            if self.flops is not None and self.peak_tflops:
                mfu = self.flops(self.tokens, self.squared) / seconds / self.batches.world / (self.peak_tflops * 1e12)
            row = {"step": done, "epoch": round(self.batches.epoch_at(done), 4), "task_loss": task_loss,
                   "penalty": self.clora.config.lam * r, "R": r, "lr": lr, "grad_norm": grad_norm(self.engine),
                   "real_tokens": self.tokens, "tokens_per_s": self.tokens / seconds, "tokens_per_s_per_gpu": per_gpu,
                   "mfu": mfu, "peak_mem_gb": round(peak_memory_gb(), 3)}
            if self.compiled:
                row["compiled_graphs"] = compiled_graphs()
            self.tokens, self.squared, self.since = 0, 0, time.time()
            self.metrics.write(row)
            if self.engine.monitor.enabled:
                self.engine.monitor.write_events([(f"Train/{k}", v, done) for k, v in row.items() if k != "step" and v is not None])
            self.bar.set_postfix(loss=f"{task_loss:.4f}", pen=f"{row['penalty']:.3g}", lr=f"{lr:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}")
        self.bar.update(1)
        return done

    def close(self) -> None:
        self.bar.close()


def trainer_state(plan: RunPlan, step: int, metrics: Optional[dict] = None) -> dict:
    """trainer_state.json of a checkpoint: the position in the run, the evaluation at this step (what
    --save_best_metric compares) and the run's identity (what resume compares)."""
    batches = plan.batches
    return {"step": step, "epoch": batches.epoch_at(step), "global_batch": batches.global_batch,
            "packing": batches.packed, "steps_per_epoch": batches.steps_per_epoch, "metrics": metrics or {},
            "run": plan.identity}


def evaluate(engine, examples, batch_size: int, pad_id: int) -> float:
    """Token-mean loss over examples sharded across ranks, in eval mode (training mode is restored after)."""
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


def log_evaluation(engine, plan: RunPlan, train_args, step: int, metrics: MetricsLog) -> dict:
    """Each eval set's loss, and multiple-choice accuracy by log-likelihood for a commonsense or choice set, under the set's
    keys (eval_loss / eval_accuracy for a bare --eval_file, eval_SET_loss / eval_SET_accuracy for SET=SOURCE);
    logged everywhere: one metrics.jsonl row, the log line, the DeepSpeed monitor."""
    row = {}
    for ev in plan.eval_sets:
        loss_key, *accuracy_key = ev.metrics
        row[loss_key] = evaluate(engine, ev.examples, train_args.per_device_eval_batch_size, plan.pad_id)
        if ev.choice:
            from .evaluation.choice import multiple_choice_accuracy

            engine.eval()
            records, protocol = ev.choice
            row[accuracy_key[0]] = multiple_choice_accuracy(engine, plan.tokenizer, records, protocol,
                                                            train_args.per_device_eval_batch_size, engine.device).accuracy
            engine.train()
    log(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items()))
    metrics.write({"step": step, **row})
    if engine.monitor.enabled:
        engine.monitor.write_events([(f"Eval/{k[len('eval_'):]}", v, step) for k, v in row.items()])
    return row


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
