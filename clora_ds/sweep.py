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

from .evaluation.report import in_domain_average, lm_eval_average, read_results
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
    evaluation: Optional[dict] = None  # this run's entry of ROOT/eval/eval_results.json (launch/evaluate.py --sweep_dir)


def collect_sweep(root: Union[str, Path]):
    """(finished runs, [(run, why it is not in the table)], the base model's evaluation or None): CLoRA runs by k
    first, the λ = 0 baseline last; each run carries its evaluation when ROOT/eval/eval_results.json has one."""
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
    evaluated = read_results(root / "eval") or {}
    for run in finished:
        run.evaluation = evaluated.get("models", {}).get(run.name)
    return finished, pending, evaluated.get("models", {}).get("base")


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


def format_sweep_table(runs: List[SweepRun], base: Optional[dict] = None) -> str:
    """A Markdown table, one row per finished run; with an evaluation, its in-domain average, lm-eval average (and
    change from the base model), F and subspace leakage too."""
    with_eval = any(r.eval_loss is not None for r in runs)
    evaluated = any(r.evaluation for r in runs)
    header = ["run", "k", "λ", "final loss"] + (["eval loss"] if with_eval else []) + \
             ["penalty λ·R", "R", "steps", "wall time"] + \
             (["in-domain acc", "lm-eval (Δ base)", "F", "leakage_in"] if evaluated else []) + ["adapter"]
    lines = []
    for r in runs:
        k = "-" if r.lam == 0 and r.name == BASELINE_RUN else str(r.k)
        cells = [r.name, k, f"{r.lam:g}", f"{r.final_loss:.4f}"] + \
                ([f"{r.eval_loss:.4f}" if r.eval_loss is not None else "-"] if with_eval else []) + \
                [f"{r.penalty:.4g}", f"{r.R:.4g}", str(r.steps), _clock(r.wall_s)]
        if evaluated:
            e = r.evaluation or {}
            acc, lm = in_domain_average(e) if e else None, lm_eval_average(e) if e else None
            lm_base = lm_eval_average(base) if base else None
            weights = e.get("weights") or {}
            cells += [f"{100 * acc:.2f}" if acc is not None else "-",
                      (f"{100 * lm:.2f}" + (f" ({100 * (lm - lm_base):+.2f})" if lm_base is not None else "")) if lm is not None else "-",
                      f"{weights['F']:.4g}" if weights.get("F") is not None else "-",
                      f"{weights['leakage_in']:.4g}" if weights.get("leakage_in") is not None else "-"]
        lines.append(cells + [str(r.adapter)])
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]

    def row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    table = [row(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [row(c) for c in lines]
    if evaluated and base:
        acc, lm = in_domain_average(base), lm_eval_average(base)
        table.append(f"\nbase model: in-domain acc {100 * acc:.2f}" if acc is not None else "\nbase model:")
        if lm is not None:
            table[-1] += f", lm-eval {100 * lm:.2f}"
    return "\n".join(table)
