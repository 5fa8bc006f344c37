"""Every check a training run needs, done before anything is written: ``plan_run``.

One function serves the launcher (every rank, rank 0 first), the SLURM preflight (on the head node, before any rank
starts) and library users. It reads the arguments, the output directory, the DeepSpeed config, the model directory
(config, tokenizer, weight headers; the CLoRA targets on a meta-device copy), the data (tokenized into a cache outside
the output directory) and, for a resume, the checkpoint (rank files through the restricted unpickler, and the run's
recorded settings against these). It writes nothing in the output directory: every problem found is reported at
once in one ``RunProblems``, and the user's files stay exactly as they were.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from .arguments import DataArguments, ModelArguments, TrainArguments, argument_problems, arguments_dict, clora_config
from .config import CLoRAConfig
from .data import (GlobalBatches, TokenizedData, default_cache_dir, load_records, pack_examples, tokenize_records,
                   units_fingerprint)
from .ds_config import precision_problems, read_deepspeed_config, resolve_ds_config
from .errors import RunProblems, UserError
from .model import choose_attention, head_size, inspect_model, quantization_problems, target_problems
from .resume import identity_differences, resume_problems, run_identity
from .run_dir import RunStart, inspect_output_dir, read_trainer_state


@dataclass
class RunPlan:
    """A run that passed every check: what it starts from and everything it was resolved to."""

    start: RunStart
    clora: CLoRAConfig
    hf_config: object
    tokenizer: object
    pad_id: int
    attention: str
    train_data: TokenizedData
    eval_examples: Optional[list]
    eval_choice: Optional[tuple]  # (records, protocol) of a commonsense eval file: multiple-choice accuracy
    batches: GlobalBatches
    total_steps: int
    ds_config: dict
    identity: dict
    world: int
    notes: List[str] = field(default_factory=list)

    def settings(self, *argument_groups) -> dict:
        """What OUT/train_config.json records."""
        return {"arguments": arguments_dict(*argument_groups), "deepspeed": self.ds_config, "world_size": self.world,
                "attention": self.attention, "run": self.identity}


def choice_task(path: str) -> Optional[tuple]:
    """(records, protocol) when the eval file is a commonsense task (LLM-Adapters labels), else None."""
    from .evaluation.protocols import Commonsense, protocol_for

    records = load_records(path)
    try:
        protocol = protocol_for(records, path)
    except UserError:
        return None
    return (records, protocol) if isinstance(protocol, Commonsense) else None


def _tokenize(path: str, data: DataArguments, tokenizer, cache_dir: Path) -> TokenizedData:
    return tokenize_records(load_records(path), path, tokenizer, data.dataset_format, data.max_seq_length,
                            data.train_on_prompt, cache_dir)


def plan_run(model: ModelArguments, data: DataArguments, clora_args, train: TrainArguments, world: int,
             check_checkpoint_files: bool = True) -> RunPlan:
    """Check everything; RunProblems listing every problem, or the plan. Writes nothing in --output_dir."""
    problems = argument_problems(model, data, clora_args, train)
    clora = None
    if not any(p.startswith(("--lora_", "--clora_", "--target_modules", "--seed")) for p in problems):
        clora = clora_config(clora_args, train)
    start, out_problems = inspect_output_dir(Path(train.output_dir), train.resume_from_checkpoint, train.overwrite_output_dir)
    problems += out_problems
    raw_ds = None
    try:
        raw_ds = read_deepspeed_config(train.deepspeed)
    except UserError as err:
        problems.append(str(err))
    problems += precision_problems(train.bf16, train.fp16)
    problems += quantization_problems(model.load_in_4bit, model.load_in_8bit, raw_ds)
    hf_config, tokenizer, model_problems = inspect_model(model.model_name_or_path, model.trust_remote_code)
    problems += model_problems
    attention = None
    try:
        attention = choose_attention(model.attn_implementation, data.packing, train.bf16 or train.fp16, head_size(hf_config))
    except UserError as err:
        problems.append(str(err))
    if hf_config is not None and clora is not None:
        problems += target_problems(hf_config, clora, model.trust_remote_code)

    train_data = eval_examples = eval_choice = batches = None
    if tokenizer is not None and data.max_seq_length >= 8:
        cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
        try:
            train_data = _tokenize(data.train_file, data, tokenizer, cache_dir)
            if data.eval_file:
                eval_examples = _tokenize(data.eval_file, data, tokenizer, cache_dir).examples
                eval_choice = choice_task(data.eval_file)
        except UserError as err:
            problems.append(str(err))
    pad_id = None
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if train_data is not None and train.per_device_train_batch_size >= 1 and train.gradient_accumulation_steps >= 1:
        units = pack_examples(train_data.examples, data.max_seq_length, train.seed) if data.packing else train_data.examples
        try:
            batches = GlobalBatches(units, train.per_device_train_batch_size, world, train.gradient_accumulation_steps,
                                    train.seed, data.packing, pad_id)
        except UserError as err:
            problems.append(str(err))
    if problems or batches is None:
        raise RunProblems(problems or ["cannot start the run"])

    total_steps = train.max_steps if train.max_steps > 0 else math.ceil(train.num_train_epochs * batches.steps_per_epoch)
    if train.warmup_steps > total_steps:
        problems.append(f"--warmup_steps {train.warmup_steps} exceeds the run's {total_steps} steps: the learning rate "
                        "would never reach --learning_rate")
    ds_config = None
    try:
        ds_config = resolve_ds_config(raw_ds, train, world, hf_config.hidden_size, total_steps, Path(train.output_dir))
    except RunProblems as err:
        problems += err.problems
    if problems:
        raise RunProblems(problems)

    precision = "bf16" if train.bf16 else "fp16" if train.fp16 else "fp32"
    if model.load_in_4bit or model.load_in_8bit:  # the base the adapter is trained against is part of the run
        precision += f" on a {'4-bit ' + model.bnb_4bit_quant_type if model.load_in_4bit else '8-bit'} base"
    data_id = {"train_file": str(data.train_file), "fingerprint": units_fingerprint(batches.units, data.packing),
               "units": len(batches.units), "packing": data.packing, "max_seq_length": data.max_seq_length,
               "dataset_format": train_data.dataset_format, "train_on_prompt": data.train_on_prompt}
    scheduler = dict(ds_config.get("scheduler") or {})
    if "params" in scheduler:  # its length may change on resume, like --max_steps (a note, below)
        scheduler["params"] = {k: v for k, v in scheduler["params"].items() if k != "total_num_steps"}
    optimizer = {"learning_rate": train.learning_rate, "weight_decay": train.weight_decay,
                 "lr_scheduler_type": train.lr_scheduler_type, "warmup_steps": train.warmup_steps,
                 "max_grad_norm": train.max_grad_norm, "optim": train.optim, "deepspeed optimizer": ds_config.get("optimizer"),
                 "deepspeed scheduler": scheduler or None}
    identity = run_identity(hf_config=hf_config, clora=clora, model_path=model.model_name_or_path, data=data_id,
                            global_batch=batches.global_batch, world=world, precision=precision, optimizer=optimizer,
                            total_steps=total_steps)
    if start.resume is not None:
        problems += resume_problems(start.resume, identity, check_checkpoint_files)
    elif start.leftover_config is not None and start.leftover_config.get("run") is not None:
        differences = identity_differences(start.leftover_config["run"], identity)
        if differences:
            problems.append(f"--output_dir {train.output_dir} holds an earlier attempt with other settings "
                            f"({'; '.join(differences[:3])}); pass --overwrite_output_dir to replace it, or the same "
                            "settings to restart it")
    if problems:
        raise RunProblems(problems)

    notes = list(start.notes)
    if start.resume is not None:
        notes.append(f"resuming from {start.resume}")
        saved_steps = (read_trainer_state(start.resume).get("run") or {}).get("total_steps")
        if saved_steps is not None and saved_steps != total_steps:
            notes.append(f"the run's length changed from {saved_steps} to {total_steps} steps: the learning-rate schedule "
                         f"continues on the {total_steps}-step schedule from step {read_trainer_state(start.resume)['step']}, "
                         f"not the one an uninterrupted {total_steps}-step run would have followed")
    notes.append(f"train data {data.train_file}: {train_data.n_records} records, format {train_data.dataset_format}; "
                 f"{train_data.n_truncated} truncated to {data.max_seq_length} tokens, {train_data.n_dropped} dropped "
                 "(no response token left)")
    if data.packing:
        notes.append(f"packed {len(train_data.examples)} examples into {len(batches.units)} rows of <= "
                     f"{data.max_seq_length} tokens")
    return RunPlan(start=start, clora=clora, hf_config=hf_config, tokenizer=tokenizer, pad_id=pad_id, attention=attention,
                   train_data=train_data, eval_examples=eval_examples, eval_choice=eval_choice, batches=batches,
                   total_steps=total_steps,
                   ds_config=ds_config, identity=identity, world=world, notes=notes)
