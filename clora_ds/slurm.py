"""What a SLURM job decides and checks on its head node before it starts any rank.

launch/slurm/train.sbatch (and sweep.sbatch through it) calls these via launch/slurm/preflight.py, so bad use
costs seconds, is reported in one message, and leaves nothing behind:

    job_flags   flags the job adds to the user's train arguments: the sweep run of this array task
                (--output_dir ROOT/k{K} --clora_k K, or ROOT/lora with --clora_lambda 0) and, on a requeued
                attempt, --resume_from_checkpoint auto
    check_job   every problem at once: everything the launcher checks before it writes (``plan_run``: arguments,
                DeepSpeed config, model, data, output directory, the checkpoint to resume and its settings) for
                this job's world size, plus a node / rank layout the script does not expect

The allocation (`JobShape`) is read from SLURM_* variables by the entry point, never here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .arguments import DataArguments, ModelArguments, TrainArguments
from .errors import ConfigError, RunProblems, UserError
from .plan import plan_run
from .run_dir import inspect_output_dir, list_checkpoints, read_trainer_state
from .sweep import BASELINE_RUN


@dataclass(frozen=True)
class JobShape:
    """The allocation as SLURM describes it, and what the script will start on it."""

    nodes: int                              # SLURM_JOB_NUM_NODES
    ranks_per_node: int                     # ranks the script starts per node: one per GPU (GPUS_PER_NODE)
    tasks_per_node: str = ""                # SLURM_TASKS_PER_NODE, e.g. "8(x4)" or "2,1" ("" outside SLURM)
    gpus_on_node: Optional[int] = None      # SLURM_GPUS_ON_NODE (None: no GPUs requested)
    expected_nodes: Optional[int] = None    # NODES from the script: the node count the recipe is written for
    restart_count: int = 0                  # SLURM_RESTART_COUNT: > 0 on a requeued attempt
    array_task_id: Optional[int] = None     # SLURM_ARRAY_TASK_ID

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def expand_tasks_per_node(spec: str) -> List[int]:
    """SLURM_TASKS_PER_NODE ("2(x3),1") -> [2, 2, 2, 1]."""
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ConfigError(f"cannot read SLURM_TASKS_PER_NODE={spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def sweep_runs(k_values: Sequence[int]) -> List[Tuple[str, List[str]]]:
    """The k-sweep as (run name, flags): one CLoRA run per k, then the λ = 0 LoRA baseline (at the smallest k,
    which builds the least P; λ = 0 ignores it)."""
    if not k_values:
        raise ConfigError("SWEEP_K is empty: give the subspace dimensions to sweep, e.g. SWEEP_K=\"128 256 512\"")
    runs = [(f"k{k}", ["--clora_k", str(k)]) for k in k_values]
    return runs + [(BASELINE_RUN, ["--clora_k", str(min(k_values)), "--clora_lambda", "0"])]


def job_flags(train: TrainArguments, clora_args, shape: JobShape, sweep_k: Optional[Sequence[int]] = None) -> List[str]:
    """Flags appended to the user's train arguments (the last occurrence of a flag wins)."""
    flags: List[str] = []
    output_dir = Path(train.output_dir)
    if sweep_k is not None:
        runs = sweep_runs(sweep_k)
        names = ", ".join(name for name, _ in runs)
        last = len(runs) - 1
        if shape.array_task_id is None:
            raise ConfigError(f"this is a sweep of {len(runs)} runs ({names}) but not a job array; submit with "
                              f"sbatch --array=0-{last}")
        if not 0 <= shape.array_task_id <= last:
            raise ConfigError(f"array task {shape.array_task_id} has no sweep run: the sweep has {len(runs)} runs "
                              f"({names}); submit with --array=0-{last}")
        if clora_args.clora_lambda == 0:
            raise ConfigError("--clora_lambda 0 would make every sweep run plain LoRA; the sweep adds the λ = 0 "
                              "baseline itself, give the λ of the CLoRA runs (default 1)")
        name, run_flags = runs[shape.array_task_id]
        output_dir = output_dir / name
        flags += ["--output_dir", str(output_dir)] + run_flags
    if shape.restart_count > 0:
        # a requeued attempt continues its own run; an explicit --resume_from_checkpoint only counts until this
        # run has a checkpoint of its own
        if train.resume_from_checkpoint in (None, "") or list_checkpoints(output_dir):
            flags += ["--resume_from_checkpoint", "auto"]
    return flags


def check_job(model: ModelArguments, data: DataArguments, clora_args, train: TrainArguments, shape: JobShape) -> Optional[Path]:
    """The checkpoint the job will resume from (or None); ConfigError listing every reason it cannot start."""
    problems = _shape_problems(shape)
    resume = None
    try:
        resume = plan_run(model, data, clora_args, train, shape.world_size).start.resume
    except RunProblems as err:
        hint = _nodes_hint(train, shape)  # says what the generic global-batch difference says, and what to do
        problems += [p for p in err.problems if not (hint and "global batch (per device" in p)] + hint
    if problems:
        raise ConfigError("this job cannot start:\n  - " + "\n  - ".join(problems))
    return resume


def _shape_problems(shape: JobShape) -> List[str]:
    problems = []
    rpn = shape.ranks_per_node
    if shape.expected_nodes is not None and shape.nodes != shape.expected_nodes:
        problems.append(f"sbatch gave {shape.nodes} node(s) but the script expects NODES={shape.expected_nodes}; "
                        f"submit with sbatch --nodes={shape.expected_nodes} (or change NODES)")
    tasks = expand_tasks_per_node(shape.tasks_per_node)
    if tasks and any(t != rpn for t in tasks):
        problems.append(f"SLURM allocated {shape.tasks_per_node} tasks per node but the script starts {rpn} rank(s) "
                        f"on every node (one per GPU, GPUS_PER_NODE={rpn}); submit with --ntasks-per-node={rpn} "
                        f"and no --ntasks")
    if shape.gpus_on_node and shape.gpus_on_node != rpn:
        problems.append(f"{shape.gpus_on_node} GPUs per node are allocated but GPUS_PER_NODE={rpn}; make them agree")
    return problems


def _nodes_hint(train: TrainArguments, shape: JobShape) -> List[str]:
    """When the checkpoint to resume has another global batch: the node count that would give it."""
    start, _ = inspect_output_dir(Path(train.output_dir), train.resume_from_checkpoint, train.overwrite_output_dir)
    if start.resume is None:
        return []
    try:
        saved = read_trainer_state(start.resume)["global_batch"]
    except (UserError, KeyError):
        return []
    per_node = train.per_device_train_batch_size * shape.ranks_per_node * train.gradient_accumulation_steps
    if saved == per_node * shape.nodes:
        return []
    fits = saved // per_node if saved % per_node == 0 else None
    hint = f"resubmit with --nodes={fits}" if fits else "change --per_device_train_batch_size or --gradient_accumulation_steps"
    return [f"{start.resume} was trained with a global batch of {saved}; this job's is {train.per_device_train_batch_size} "
            f"per device x {shape.world_size} rank(s) ({shape.nodes} node(s) x {shape.ranks_per_node}) x "
            f"{train.gradient_accumulation_steps} accumulation = {per_node * shape.nodes}; {hint}"]
