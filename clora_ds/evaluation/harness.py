"""Forgetting through lm-evaluation-harness, offline: lm-eval's own tasks, and local-file tasks this package ships.

    --lm_eval_tasks clora_mc               every commonsense --task_file as multiple choice by log-likelihood
    --lm_eval_tasks clora_bbh              BIG-Bench Hard from DATA_DIR/bbh/<task>.json(l) (records: input, target)
    --lm_eval_tasks clora_bbh_mc           the multiple-choice ones of those (records with choices, label), by
                                           log-likelihood (python launch/prepare_assets.py bbh writes both)
    --lm_eval_tasks clora_mmlu_pro         MMLU-Pro from DATA_DIR/mmlu_pro/<file> (question, options, answer_index)
    --lm_eval_tasks hellaswag,arc_easy     lm-eval's own tasks, which read their data from the hub

The shipped YAML templates (``lm_eval_tasks/*.yaml.in``) are rendered into EVAL_DIR/lm_eval_tasks/ with the local
paths filled in (``dataset_path: json`` + ``data_files``), so they run with the hub off and can be read afterwards.
The model is the one already loaded (a PeftModel for an adapter: no merge), wrapped in lm-eval's HFLM.
"""
from __future__ import annotations

import difflib
import functools
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import ConfigError

TEMPLATES = Path(__file__).parent / "lm_eval_tasks"
OURS = ("clora_mc", "clora_bbh", "clora_bbh_mc", "clora_mmlu_pro")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def lm_eval_available() -> Optional[str]:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        return f"lm-evaluation-harness is not installed ({err}); pip install 'clora_ds[eval]'"
    return None


def _offline() -> bool:
    return any(os.environ.get(v) == "1" for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _data_file(directory: Path) -> Optional[Path]:
    files = sorted(p for p in directory.iterdir() if p.suffix in DATA_SUFFIXES) if directory.is_dir() else []
    return files[0] if files else None


def _has_choices(path: Path) -> bool:
    import json

    with open(path) as f:
        first = f.readline() if path.suffix == ".jsonl" else f.read(65536)
    try:
        return "choices" in json.loads(first) if path.suffix == ".jsonl" else '"choices"' in first
    except json.JSONDecodeError:
        return False


@functools.lru_cache(maxsize=1)
def known_tasks() -> frozenset:
    """Every task, group and tag name lm-eval ships (its task index: YAML files read, no data, no hub)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def plan_tasks(requested: List[str], commonsense_files: Dict[str, Path], data_dir: Optional[Path]) -> Tuple[List[str], List[str]]:
    """(lm-eval task names to run, problems), checked before any model is loaded."""
    problems, names = [], []
    if not requested:
        return [], []
    why = lm_eval_available()
    if why:
        return [], [f"--lm_eval_tasks: {why}"]
    for task in requested:
        if task == "clora_mc":
            if not commonsense_files:
                problems.append("--lm_eval_tasks clora_mc needs at least one commonsense --task_file (LLM-Adapters labels)")
            names += [f"clora_mc_{name}" for name in commonsense_files]
        elif task in ("clora_bbh", "clora_bbh_mc", "clora_mmlu_pro"):
            sub = "mmlu_pro" if task == "clora_mmlu_pro" else "bbh"
            where = data_dir / sub if data_dir else None
            if where is None or not where.is_dir() or _data_file(where) is None:
                problems.append(f"--lm_eval_tasks {task} reads a local copy: give --lm_eval_data_dir DIR with "
                                f"DIR/{sub}/ holding {'one JSON file per task (input, target)' if sub == 'bbh' else 'the test set (question, options, answer_index)'}"
                                + (f"; {where} has none" if where else ""))
            elif task == "clora_bbh":
                names += [f"clora_bbh_{p.stem}" for p in sorted(where.iterdir()) if p.suffix in DATA_SUFFIXES]
            elif task == "clora_bbh_mc":
                found = [f"clora_bbh_mc_{p.stem}" for p in sorted(where.iterdir())
                         if p.suffix in DATA_SUFFIXES and _has_choices(p)]
                if not found:
                    problems.append(f"--lm_eval_tasks clora_bbh_mc: no task in {where} has multiple-choice records "
                                    "(choices, label); python launch/prepare_assets.py bbh writes them")
                names += found
            else:
                names.append("clora_mmlu_pro")
        elif task not in known_tasks():
            near = difflib.get_close_matches(task, sorted(known_tasks()) + list(OURS), n=3)
            problems.append(f"--lm_eval_tasks {task}: no such task in lm-eval (nor one of ours: {', '.join(OURS)})"
                            + (f"; did you mean {' or '.join(near)}?" if near else ""))
        else:
            if _offline():
                problems.append(f"--lm_eval_tasks {task}: lm-eval's own tasks read their data from the hub, which is off "
                                "here (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); use the local-file tasks (clora_bbh, "
                                "clora_mmlu_pro with --lm_eval_data_dir, clora_mc with --task_file) or run with hub access")
            names.append(task)
    return names, problems


def render_tasks(names: List[str], commonsense_files: Dict[str, Path], data_dir: Optional[Path], out: Path) -> Path:
    """Write the YAMLs of our task names (and their document functions) into ``out``; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TEMPLATES / "clora_lm_eval_utils.py", out / "clora_lm_eval_utils.py")
    for task in names:
        if task.startswith("clora_mc_"):
            text = (TEMPLATES / "clora_mc.yaml.in").read_text().format(
                task=task, data_file=commonsense_files[task[len("clora_mc_"):]].resolve())
        elif task.startswith("clora_bbh_mc_"):
            data = next(p for p in (data_dir / "bbh").iterdir() if p.stem == task[len("clora_bbh_mc_"):])
            text = (TEMPLATES / "clora_bbh_mc.yaml.in").read_text().format(task=task, data_file=data.resolve())
        elif task.startswith("clora_bbh_"):
            data = next(p for p in (data_dir / "bbh").iterdir() if p.stem == task[len("clora_bbh_"):])
            field = "  field: examples\n" if data.suffix == ".json" and '"examples"' in data.read_text()[:4096] else ""
            text = (TEMPLATES / "clora_bbh.yaml.in").read_text().format(task=task, data_file=data.resolve(),
                                                                        field_line=field)
        elif task == "clora_mmlu_pro":
            data = _data_file(data_dir / "mmlu_pro")
            text = (TEMPLATES / "clora_mmlu_pro.yaml.in").read_text().format(
                task=task, data_file=data.resolve(), loader="parquet" if data.suffix == ".parquet" else "json")
        else:
            continue
        (out / f"{task}.yaml").write_text(text)
    return out


def framing_tokenizer(tokenizer):
    """The tokenizer lm-eval should use: one that starts every encoded text with [bos], as clora_ds trains (LLaMA's
    tokenizers do; a tokenizer saved with add_bos_token=False gets a copy with it on)."""
    import copy

    if tokenizer.bos_token_id is None or tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        return tokenizer
    framed = copy.deepcopy(tokenizer)
    framed.add_bos_token = True
    return framed


def run_lm_eval(model, tokenizer, names: List[str], include_dir: Path, batch_size: int = 8,
                limit: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} of lm-eval over the loaded model; a hub failure names the task and the local way."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=framing_tokenizer(tokenizer), batch_size=batch_size, add_bos_token=True)
    try:
        out = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(include_dir)),
                              limit=limit, log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    except (ConnectionError, OSError) as err:
        raise ConfigError(f"lm-eval could not load the data of {', '.join(names)} ({str(err).splitlines()[0]}); "
                          "lm-eval's own tasks need the hub: use the local-file tasks instead") from None
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {}
        for key, value in metrics.items():
            name, _, filtered = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in name and filtered:
                results[task][name if filtered == "none" else f"{name},{filtered}"] = float(value)
    return results
