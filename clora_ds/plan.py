"""Every check a training run needs, done before anything is written: ``plan_run``.

One function serves the launcher (every rank, rank 0 first), the SLURM preflight (on the head node, before any rank
starts) and library users. It reads the arguments, the output directory, the DeepSpeed config, the model directory
(config, tokenizer, weight headers; the CLoRA targets on a meta-device copy), the data (tokenized into a cache outside
the output directory) and, for a resume, the checkpoint (rank files through the restricted unpickler, and the run's
recorded settings against these). It writes nothing in the output directory: every problem found is reported at
once in one ``RunProblems``, and the user's files stay exactly as they were.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .activation_memory import layer_count_problems, offloading_problems
from .arguments import (DataArguments, DataSource, ModelArguments, TrainArguments, argument_problems, arguments_dict,
                        clora_config, eval_sources, mixture_weights, train_sources)
from .calibration import CalibrationPlan, plan_calibration
from .compile import compile_problems
from .config import CLoRAConfig
from .batches import PACKER_VERSION, GlobalBatches, Mixture, pack_row_indices
from .data import TokenizedData, default_cache_dir, load_records, tokenize_records, units_fingerprint
from .ds_config import precision_problems, read_deepspeed_config, resolve_ds_config, zero_stage
from .errors import RunProblems, UserError
from .model import (choose_attention, head_size, inspect_model, module_shapes, quantization_problems,
                    sequence_length_problems, target_problems)
from .resume import identity_differences, resume_problems, run_identity
from .run_dir import RunStart, best_metric_direction, eval_metric, inspect_output_dir, read_trainer_state


@dataclass
class RunPlan:
    """A run that passed every check: what it starts from and everything it was resolved to."""

    start: RunStart
    clora: CLoRAConfig
    hf_config: object
    tokenizer: object
    pad_id: int
    attention: str
    train_data: TokenizedData     # every --train_file source's examples, in order (train_sets: each source's own)
    eval_sets: List["EvalSet"]    # --eval_file's sets, in order (empty without it)
    batches: GlobalBatches
    total_steps: int
    ds_config: dict
    identity: dict
    world: int
    notes: List[str] = field(default_factory=list)
    train_sets: List[TokenizedData] = field(default_factory=list)
    calibration: Optional[CalibrationPlan] = None  # data-derived P: the calibration rows, or the resumed checkpoint's P
    base_adapters: list = field(default_factory=list)  # --base_adapters, read and checked (base_adapters.LoraAdapter)

    def settings(self, *argument_groups) -> dict:
        """What OUT/train_config.json records."""
        return {"arguments": arguments_dict(*argument_groups), "deepspeed": self.ds_config, "world_size": self.world,
                "attention": self.attention, "run": self.identity}


@dataclass
class EvalSet:
    """One --eval_file set, read once: its examples (for the loss) and, for a commonsense or choice task, its records and
    protocol (for multiple-choice accuracy)."""

    name: Optional[str]     # SET of SET=SOURCE; None for a bare --eval_file (eval_loss / eval_accuracy)
    source: DataSource
    examples: list
    choice: Optional[tuple]  # (records, protocol) of a commonsense or choice task, else None

    @property
    def metrics(self) -> List[str]:
        """The keys this set logs: eval[_SET]_loss, and eval[_SET]_accuracy for a commonsense or choice task."""
        return [eval_metric(self.name, "loss")] + ([eval_metric(self.name, "accuracy")] if self.choice else [])


def choice_task(records: List[dict], where: str) -> Optional[tuple]:
    """(records, protocol) when the eval records are a commonsense task (LLM-Adapters labels) or choice records
    ({input, choices, label}: protocol CHOICE), else None."""
    from .data import FORMATS
    from .evaluation.choice import CHOICE
    from .evaluation.protocols import Commonsense, protocol_for

    if set(FORMATS["choice"]) <= set(records[0]):
        return records, CHOICE

    try:
        protocol = protocol_for(records, where)
    except UserError:
        return None
    return (records, protocol) if isinstance(protocol, Commonsense) else None


def _read_tokenized(source: DataSource, data: DataArguments, tokenizer, cache_dir: Path) -> Tuple[List[dict], TokenizedData]:
    """(records, tokenized) of one source: each source is read once and in its own format (detected from its own
    keys unless --dataset_format is given, which then holds for every source)."""
    records = load_records(source.path, source.split)
    return records, tokenize_records(records, str(source), tokenizer, data.dataset_format, data.max_seq_length,
                                     data.train_on_prompt, cache_dir)


def eval_metrics_available(eval_sets: List[EvalSet]) -> List[str]:
    """The metric names the planned eval sets log, in order: what --save_best_metric (or anything that reads an
    evaluation's metrics) may name."""
    return [m for s in eval_sets for m in s.metrics]


def best_metric_problem(metric: Optional[str], eval_sets: List[EvalSet]) -> Optional[str]:
    """Why --save_best_metric cannot be computed from the planned eval sets (None when it can, or is unset)."""
    if metric is None or best_metric_direction(metric) is None:  # unset, or already refused by argument_problems
        return None
    available = eval_metrics_available(eval_sets)
    if metric in available:
        return None
    if not eval_sets:
        return f"--save_best_metric {metric}: there is no --eval_file to compute it from"
    return (f"--save_best_metric {metric}: the eval sets of --eval_file log {', '.join(available)}"
            + (" (accuracy only for a commonsense task, records with instruction, output and an answer label, or a "
                  "choice task, records with input, choices and label)"
               if metric.endswith("_accuracy") else "") + "; choose one of those")


def _combined(sets: List[TokenizedData]) -> TokenizedData:
    """The sources' tokenized data as one (a single source: itself)."""
    if len(sets) == 1:
        return sets[0]
    return TokenizedData([ex for t in sets for ex in t.examples], ",".join(t.dataset_format for t in sets),
                         sum(t.n_records for t in sets), sum(t.n_truncated for t in sets), sum(t.n_dropped for t in sets))


# ---------------------------------------------------------------------------------------------------
# packed rows, cached beside the tokenized data: rank 0 packs (plan_run runs there first), every other rank reads
# ---------------------------------------------------------------------------------------------------
def packing_cache_path(lengths: np.ndarray, max_len: int, seed: int, cache_dir: Path) -> Path:
    """The cache file of a packing. Rows are index lists and a pure function of (lengths, max_len, seed, packer
    version), so the key hashes exactly those: the examples' lengths [n] in order, not their token ids."""
    return Path(cache_dir) / f"packed-v{PACKER_VERSION}-{_lengths_sha256(lengths)[:20]}-{max_len}-{seed}.npz"


def _lengths_sha256(lengths: np.ndarray) -> str:
    return hashlib.sha256(lengths.astype("<i8").tobytes()).hexdigest()


def _packing_meta(lengths: np.ndarray, max_len: int, seed: int) -> dict:
    return {"version": PACKER_VERSION, "examples": int(lengths.size), "max_len": max_len, "seed": seed,
            "lengths_sha256": _lengths_sha256(lengths)}


def _rows_sha256(flat: np.ndarray, offsets: np.ndarray) -> str:
    return hashlib.sha256(flat.astype("<i8").tobytes() + b"|" + offsets.astype("<i8").tobytes()).hexdigest()


def _is_packing(flat: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, max_len: int) -> bool:
    """flat [n] holds every example index once; offsets [rows + 1] cut it into non-empty rows of <= max_len tokens."""
    n = lengths.size
    if flat.dtype.kind not in "iu" or offsets.dtype.kind not in "iu" or flat.shape != (n,) or offsets.ndim != 1:
        return False
    if offsets.size < 2 or offsets[0] != 0 or offsets[-1] != n or (np.diff(offsets) < 1).any():
        return False
    if flat.min() < 0 or flat.max() >= n or (np.bincount(flat, minlength=n) != 1).any():
        return False
    return bool(np.add.reduceat(lengths[flat], offsets[:-1]).max() <= max_len)


def read_packing(path: Path, lengths: np.ndarray, max_len: int, seed: int) -> Tuple[Optional[List[List[int]]], Optional[str]]:
    """(rows, None) from a valid cache file; (None, why it cannot be used) otherwise, (None, None) when absent.

    Valid: written for these lengths, max_len, seed and packer version; its checksum matches; every example is in
    exactly one row and no row is over max_len. Anything else (a truncated write, a flipped byte, another run's file
    under this name) is rebuilt, never trusted."""
    if not path.is_file():
        return None, None
    try:
        with np.load(path, allow_pickle=False) as saved:
            flat, offsets, meta = saved["rows"], saved["offsets"], json.loads(str(saved["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        return None, f"unreadable ({type(err).__name__})"
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in _packing_meta(lengths, max_len, seed).items()):
        return None, "written for other data or settings"
    if meta.get("rows_sha256") != _rows_sha256(flat, offsets):
        return None, "corrupt (checksum mismatch)"
    if not _is_packing(flat, offsets, lengths, max_len):
        return None, "not a packing of these examples"
    flat_list, bounds = flat.tolist(), offsets.tolist()
    return [flat_list[a:b] for a, b in zip(bounds[:-1], bounds[1:])], None


def write_packing(path: Path, rows: List[List[int]], lengths: np.ndarray, max_len: int, seed: int) -> None:
    """Write atomically (a temporary file renamed over the name), so a reading rank never sees half a file."""
    flat = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=lengths.size)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    meta = {**_packing_meta(lengths, max_len, seed), "rows_sha256": _rows_sha256(flat, offsets)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, rows=flat, offsets=offsets, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def cached_packing(examples: List[dict], max_len: int, seed: int, cache_dir: Path) -> Tuple[List[List[dict]], str]:
    """(rows of examples, a note for the log): ``pack_row_indices`` read from ``cache_dir`` when a valid packing of
    these lengths is there, else packed and written there."""
    lengths = np.fromiter((len(ex["input_ids"]) for ex in examples), dtype=np.int64, count=len(examples))
    path = packing_cache_path(lengths, max_len, seed, cache_dir)
    rows, problem = read_packing(path, lengths, max_len, seed)
    if rows is not None:
        how = f"read from the cache {path}"
    else:
        rows = pack_row_indices(lengths, max_len, seed)
        write_packing(path, rows, lengths, max_len, seed)
        how = f"best-fit decreasing, cached in {path}" + (f"; the file there was {problem} and was rebuilt" if problem else "")
    fill = lengths.sum() / max(len(rows) * max_len, 1)
    return [[examples[i] for i in row] for row in rows], f"{fill:.1%} full; {how}"


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
    if hf_config is not None:
        problems += sequence_length_problems(hf_config, data.max_seq_length)
        problems += layer_count_problems(train.gradient_checkpointing, getattr(hf_config, "num_hidden_layers", None))
    problems += offloading_problems(train.activation_offloading, raw_ds)
    problems += compile_problems(train.compile_layers, train.compile_backend, zero_stage(raw_ds) if raw_ds else 0,
                                 train.activation_offloading, model.load_in_4bit or model.load_in_8bit)

    train_data = batches = weights = None
    sources, evals, train_sets, eval_sets = [], [], [], []
    try:
        sources, evals, weights = train_sources(data), eval_sources(data), mixture_weights(data)
    except UserError:  # argument_problems has said why
        sources = []
    cache_dir = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    cache_inside_output = Path(cache_dir).resolve().is_relative_to(Path(train.output_dir).resolve())
    if cache_inside_output:
        problems.append(f"--cache_dir {cache_dir} is inside --output_dir {train.output_dir}: the data cache outlives runs "
                        "(and checking a run writes nothing in --output_dir); choose a directory outside it, or leave "
                        "--cache_dir unset (the datasets cache)")
    elif tokenizer is not None and data.max_seq_length >= 8 and sources:
        data_problems = []
        for i, src in enumerate(sources + evals):
            try:
                records, tokenized = _read_tokenized(src, data, tokenizer, cache_dir)
            except UserError as err:
                data_problems.append(str(err))
                continue
            if i < len(sources):
                train_sets.append(tokenized)
            else:
                eval_sets.append(EvalSet(src.name, src, tokenized.examples, choice_task(records, str(src))))
        problems += data_problems
        if not data_problems:
            train_data = _combined(train_sets)
            problem = best_metric_problem(train.save_best_metric, eval_sets)
            if problem:
                problems.append(problem)
    calibration, calibration_notes, linears, targets = None, [], None, None
    if clora is not None and tokenizer is not None and data.max_seq_length >= 8 and not cache_inside_output:
        if hf_config is not None and (model.base_adapters or clora.p_init == "adapters"):
            linears, targets = module_shapes(hf_config, clora, model.trust_remote_code)
        calibration, clora, found, calibration_notes = plan_calibration(clora, tokenizer, data.max_seq_length, cache_dir,
                                                                        start.resume, targets, linears)
        problems += found
    base_adapters = []
    if model.base_adapters and linears is not None:
        from .base_adapters import read_adapters

        base_adapters, found = read_adapters(model.base_adapters, "--base_adapters", linears)
        problems += found
        calibration_notes += [f"--base_adapters: {a.path} ({len(a.factors)} modules, scale {a.scale:g}) is merged into "
                              "the base weights at start-up" for a in base_adapters]
    pad_id = None
    if tokenizer is not None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if train_data is not None and train.per_device_train_batch_size >= 1 and train.gradient_accumulation_steps >= 1:
        units, packing_note = train_data.examples, None
        if weights is not None:  # each epoch its own draw (packed per epoch): a function of the epoch
            units = Mixture([t.examples for t in train_sets], weights, train.seed,
                            data.max_seq_length if data.packing else None)
        elif data.packing:
            units, packing_note = cached_packing(train_data.examples, data.max_seq_length, train.seed, cache_dir)
        try:
            batches = GlobalBatches(units, train.per_device_train_batch_size, world, train.gradient_accumulation_steps,
                                    train.seed, data.packing, pad_id)
        except UserError as err:
            problems.append(str(err))
    if problems or batches is None:
        raise RunProblems(problems or ["cannot start the run"])

    total_steps = train.max_steps if train.max_steps > 0 else batches.steps_for_epochs(train.num_train_epochs)
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
    if len(sources) > 1:  # each source's own content, so that a resume names the one that changed; and the mixture
        data_id["sources"] = [{"source": str(src), "examples": len(t.examples), "fingerprint": units_fingerprint(t.examples, False)}
                              for src, t in zip(sources, train_sets)]
        data_id["weights"] = batches.units_for_epoch.weights if weights is not None else None
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
    if base_adapters:  # the weights the adapter is trained on: a resume with other base adapters is refused
        identity["base_adapters"] = [adapter.record() for adapter in base_adapters]
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
    for src, t in zip(sources, train_sets):
        notes.append(f"train data {src}: {t.n_records} records, format {t.dataset_format}; {t.n_truncated} truncated to "
                     f"{data.max_seq_length} tokens, {t.n_dropped} dropped (no response token left)")
    if weights is not None:
        mixture = batches.units_for_epoch
        notes.append("mixture, each epoch: " + "; ".join(
            f"{n} examples from {src} (weight {w:.3g}, {n / len(t.examples):.2f} of its {len(t.examples)})"
            for src, t, n, w in zip(sources, train_sets, mixture.counts, mixture.weights)))
    notes += calibration_notes
    for ev in eval_sets:
        notes.append(f"eval set {ev.source}: {len(ev.examples)} examples, logged as {' and '.join(ev.metrics)}")
    if data.packing and weights is not None:
        notes.append(f"packing each epoch's draw into rows of <= {data.max_seq_length} tokens (epoch 0: "
                     f"{len(batches.units)} rows)")
    elif data.packing:
        notes.append(f"packed {len(train_data.examples)} examples into {len(batches.units)} rows of <= "
                     f"{data.max_seq_length} tokens ({packing_note})")
    return RunPlan(start=start, clora=clora, hf_config=hf_config, tokenizer=tokenizer, pad_id=pad_id, attention=attention,
                   train_data=train_data, eval_sets=eval_sets, batches=batches, total_steps=total_steps,
                   ds_config=ds_config, identity=identity, world=world, notes=notes, train_sets=train_sets,
                   calibration=calibration, base_adapters=base_adapters)
