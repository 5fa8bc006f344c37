"""eval_results.json, its table (eval_results.md: every number beside the base model's, with the change), and for
a sweep the plot of in-domain accuracy and forgetting against k with the LoRA baseline as a line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

RESULTS_FILE, TABLE_FILE, PLOT_FILE = "eval_results.json", "eval_results.md", "eval_vs_k.png"
WEIGHT_COLUMNS = ("delta_w_fro", "delta_w_spec", "F", "leakage_in", "leakage_out")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_results(directory: Path) -> Optional[dict]:
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def in_domain_average(entry: dict) -> Optional[float]:
    tasks = entry.get("tasks") or {}
    return sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else None


def lm_eval_score(metrics: Dict[str, float]) -> Optional[float]:
    """The headline number of an lm-eval task: acc, else exact_match (any filter), else the first metric."""
    for key in ("acc", "exact_match"):
        hits = [v for k, v in metrics.items() if k == key or k.startswith(key + ",")]
        if hits:
            return max(hits)
    return next(iter(metrics.values()), None)


def lm_eval_average(entry: dict) -> Optional[float]:
    scores = [lm_eval_score(m) for m in (entry.get("lm_eval") or {}).values()]
    scores = [s for s in scores if s is not None]
    return sum(scores) / len(scores) if scores else None


def format_table(results: dict) -> str:
    models = results["models"]
    base = models.get("base", {})
    tasks = sorted({t for e in models.values() for t in (e.get("tasks") or {})})
    lm_tasks = sorted({t for e in models.values() for t in (e.get("lm_eval") or {})})
    has_weights = any(e.get("weights") for e in models.values())
    losses = sorted({t for e in models.values() for t in (e.get("loss") or {})})
    header = ["model"] + [f"{t} acc" for t in tasks] + (["in-domain avg"] if len(tasks) > 1 else [])
    header += lm_tasks + (["lm-eval avg"] if len(lm_tasks) > 1 else []) + [f"{t} NLL" for t in losses]
    header += list(WEIGHT_COLUMNS) if has_weights else []

    def cell(value, reference=None, pct=True):
        if value is None:
            return "-"
        text = f"{100 * value:.2f}" if pct else f"{value:.4g}"
        if reference is not None and value is not reference:
            delta = 100 * (value - reference) if pct else value - reference
            text += f" ({delta:+.2f})" if pct else f" ({delta:+.3g})"
        return text

    rows = []
    for name, e in models.items():
        ref = name != "base"
        row = [name]
        row += [cell(e["tasks"].get(t, {}).get("accuracy"), base.get("tasks", {}).get(t, {}).get("accuracy") if ref else None)
                for t in tasks]
        if len(tasks) > 1:
            row.append(cell(in_domain_average(e), in_domain_average(base) if ref else None))
        row += [cell(lm_eval_score(e["lm_eval"].get(t, {})), lm_eval_score(base.get("lm_eval", {}).get(t, {})) if ref else None)
                for t in lm_tasks]
        if len(lm_tasks) > 1:
            row.append(cell(lm_eval_average(e), lm_eval_average(base) if ref else None))
        row += [cell((e.get("loss") or {}).get(t, {}).get("nll"),
                     (base.get("loss") or {}).get(t, {}).get("nll") if ref else None, pct=False) for t in losses]
        if has_weights:
            row += [cell((e.get("weights") or {}).get(c), pct=False) for c in WEIGHT_COLUMNS]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    notes = ["", "Accuracies in %; in parentheses the change from the base model. Weight metrics: ‖ΔW‖_F, ‖ΔW‖_2, "
             "F = mean ‖ΔW·x‖/‖x‖, subspace leakage ‖A·P_in‖/‖A‖ and ‖Bᵀ·P_out‖/‖B‖ (clora_ds docs/evaluation.md: Weight-space metrics)."]
    if results.get("base_adapters"):
        notes.append("'base' is the base model with " + ", ".join(a["path"] for a in results["base_adapters"])
                     + " merged into it (--base_adapters), the model every adapter here was applied to.")
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows] + notes) + "\n"


def write_results(directory: Path, results: dict, sweep_k: Optional[Dict[str, Optional[int]]] = None) -> None:
    directory = Path(directory)
    _write_atomic(directory / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    _write_atomic(directory / TABLE_FILE, format_table(results))
    if sweep_k:
        plot_sweep(results, sweep_k, directory / PLOT_FILE)


def plot_sweep(results: dict, sweep_k: Dict[str, Optional[int]], out_png: Path) -> None:
    """In-domain average, lm-eval change from base and F against k; the λ = 0 run (k None) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    base = models.get("base", {})
    panels = [("in-domain accuracy (avg)", in_domain_average, False), ("lm-eval change from base", lm_eval_average, True),
              ("F = mean ‖ΔW·x‖/‖x‖", lambda e: (e.get("weights") or {}).get("F"), False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, value, relative) in zip(axes, panels):
        ref = value(base) if relative else None
        runs = sorted((k, value(models[n])) for n, k in sweep_k.items() if k is not None and n in models)
        runs = [(k, v - ref if relative and v is not None and ref is not None else v) for k, v in runs if v is not None]
        if runs:
            ax.plot([k for k, _ in runs], [v for _, v in runs], "o-", label="CLoRA")
            ax.set_xscale("log", base=2)
        for n, k in sweep_k.items():
            v = value(models.get(n, {})) if k is None else None
            if v is not None:
                ax.axhline(v - ref if relative and ref is not None else v, ls="--", color="gray", label=f"LoRA ({n})")
        ax.set_title(title)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
