"""Collect a k-sweep (launch/slurm/sweep.sbatch) into one table.

    python launch/slurm/collect_sweep.py out/sweep

Every directory under the sweep root holding a train_config.json is a run. A run is finished when its final adapter
exists (launch/train.py writes adapter/ after the last checkpoint; the job converts it to peft_adapter/). Final loss,
penalty (λ·R) and R are the last logged step's (metrics.jsonl: the last line of a step wins, as a resumed run re-logs
steps); wall time sums the job attempts in slurm_attempts.jsonl, so a preempted run counts every attempt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

from .run_dir import METRICS_FILE, TRAIN_CONFIG_FILE, read_metrics, read_train_config

ATTEMPTS_FILE = "slurm_attempts.jsonl"  # one JSON line per job attempt, appended by launch/slurm/train.sbatch
BASELINE_RUN = "lora"                   # the λ = 0 run of a sweep (clora_ds.slurm.sweep_runs names it)
ADAPTER_DIRS = ("peft_adapter", "adapter")  # converted first, then the launcher's own


@dataclass
class SweepRun:
    name: str
    k: int
    lam: float
    final_loss: float
    penalty: float       # λ·R at the last logged step
    R: float             # the regularizer R at the last logged step (also for λ = 0: how far plain LoRA goes into P)
    steps: int
    wall_s: Optional[float]
    adapter: Path
    eval_loss: Optional[float] = None


def collect_sweep(root: Union[str, Path]) -> Tuple[List[SweepRun], List[Tuple[str, str]]]:
    """(finished runs, [(run, why it is not in the table)]), CLoRA runs by k first, the λ = 0 baseline last."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such sweep directory")
    finished, pending = [], []
    for run_dir in sorted(p for p in root.iterdir() if (p / TRAIN_CONFIG_FILE).is_file()):
        adapter = next((run_dir / d for d in ADAPTER_DIRS if (run_dir / d / "adapter_config.json").is_file()), None)
        rows = read_metrics(run_dir / METRICS_FILE)
        train_rows = [r for r in rows.values() if "task_loss" in r]
        if adapter is None or not train_rows:
            pending.append((run_dir.name, "no final adapter yet (running, queued, stopped or failed: see its slurm-*.out)"))
            continue
        args = read_train_config(run_dir)["arguments"]
        last = max(train_rows, key=lambda r: r["step"])
        evals = [r for r in rows.values() if "eval_loss" in r]
        finished.append(SweepRun(
            name=run_dir.name, k=int(args["clora_k"]), lam=float(args["clora_lambda"]), final_loss=last["task_loss"],
            penalty=last["penalty"], R=last["R"], steps=last["step"], wall_s=_wall_seconds(run_dir), adapter=adapter,
            eval_loss=max(evals, key=lambda r: r["step"])["eval_loss"] if evals else None))
    finished.sort(key=lambda r: (r.lam == 0, r.k, r.name))
    return finished, pending


def _wall_seconds(run_dir: Path) -> Optional[float]:
    path = run_dir / ATTEMPTS_FILE
    if not path.is_file():
        return None
    attempts = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return float(sum(a["end"] - a["start"] for a in attempts))


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_sweep_table(runs: List[SweepRun]) -> str:
    """A Markdown table, one row per finished run."""
    with_eval = any(r.eval_loss is not None for r in runs)
    header = ["run", "k", "λ", "final loss"] + (["eval loss"] if with_eval else []) + \
             ["penalty λ·R", "R", "steps", "wall time", "adapter"]
    lines = []
    for r in runs:
        k = "-" if r.lam == 0 and r.name == BASELINE_RUN else str(r.k)
        cells = [r.name, k, f"{r.lam:g}", f"{r.final_loss:.4f}"] + \
                ([f"{r.eval_loss:.4f}" if r.eval_loss is not None else "-"] if with_eval else []) + \
                [f"{r.penalty:.4g}", f"{r.R:.4g}", str(r.steps), _clock(r.wall_s), str(r.adapter)]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]

    def row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([row(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [row(c) for c in lines])
