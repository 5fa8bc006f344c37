"""One evaluation: a base model and its adapters on in-domain tasks (generation, the paper's protocols), lm-eval
tasks (forgetting) and weight-space metrics, with the base model always beside them.

    python launch/evaluate.py --base_model DIR --adapter [NAME=]DIR --task_file [NAME=]FILE --output_dir EVAL_DIR
    torchrun --nproc_per_node 8 launch/evaluate.py ...        # data-parallel: each rank a shard, same numbers

Everything is checked before a model is loaded; the results are written at the end, atomically:

    EVAL_DIR/eval_results.json      {"models": {NAME: {"adapter", "tasks", "lm_eval", "weights"}}} (README: Evaluation)
    EVAL_DIR/eval_results.md        the same as a table, each metric also as the change from the base
    EVAL_DIR/predictions/NAME/TASK.jsonl   every prediction: input, generated text, extracted answer, gold, correct
    EVAL_DIR/lm_eval_tasks/         the rendered local-file lm-eval task YAMLs
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..data import read_records
from ..distributed import barrier, log, on_rank0, rank, rank0_first
from ..errors import CheckpointError, ConfigError, DataError, RunProblems, UserError
from ..run_dir import TRAIN_CONFIG_FILE, read_train_config
from .harness import plan_tasks, render_tasks, run_lm_eval
from .protocols import Commonsense, Protocol, load_items, protocol_for
from .weights import AdapterFactors, activation_ratios, read_adapter, subspace_leakage, weight_metrics

ACCURACY_METRIC = Path(__file__).parent / "metrics" / "accuracy"
DEFAULT_NEW_TOKENS = {"commonsense": 32, "choice": 32, "number": 256, "metamath": 512, "boxed": 512}
RESULTS_FILE, TABLE_FILE = "eval_results.json", "eval_results.md"


@dataclass
class EvalRequest:
    base_model: Optional[str] = None
    adapters: List[Tuple[str, Path]] = field(default_factory=list)
    tasks: List[Tuple[str, Path]] = field(default_factory=list)
    output_dir: Optional[Path] = None
    limit: Optional[int] = None
    max_new_tokens: Optional[int] = None       # None: per protocol (DEFAULT_NEW_TOKENS)
    batch_size: int = 32
    lm_eval_tasks: List[str] = field(default_factory=list)
    lm_eval_data_dir: Optional[Path] = None
    lm_eval_limit: Optional[int] = None
    weights: bool = True
    f_file: Optional[Path] = None              # records whose activations define F (default: the first task file)
    f_records: int = 100
    clora_config: Optional[Path] = None        # P for the leakage of adapters without clora_config.json
    loss_files: List[Tuple[str, Path]] = field(default_factory=list)  # held-out text: mean token NLL per model
    dtype: str = "auto"                        # auto: bf16 on CUDA, fp32 on CPU
    overwrite: bool = False


@dataclass
class Task:
    name: str
    path: Path
    records: list
    protocol: Protocol


# ---------------------------------------------------------------------------------------------------
# checks: everything before a model loads
# ---------------------------------------------------------------------------------------------------
def _adapter_problems(name: str, path: Path, linear_shapes: Dict[str, Tuple[int, int]], base: str) -> List[str]:
    try:
        adapter = read_adapter(path)
    except UserError as err:
        return [f"--adapter {name}: {err}"]
    problems = []
    for module, (a, b) in sorted(adapter.factors.items()):
        shape = linear_shapes.get(module)
        if shape is None:
            problems.append(f"--adapter {name}: adapts {module}, which the base model {base} does not have (an adapter "
                            "of another architecture?)")
            break
        if (b.shape[0], a.shape[1]) != shape:
            problems.append(f"--adapter {name}: {module} is [out={b.shape[0]}, in={a.shape[1]}] in the adapter but "
                            f"[out={shape[0]}, in={shape[1]}] in {base}: it was trained on another base model")
            break
    return problems


def check_request(req: EvalRequest) -> Tuple[List[Task], List[str], object, object]:
    """(tasks, lm-eval task names, HF config, tokenizer); RunProblems listing every problem."""
    from ..model import inspect_model
    from transformers import AutoModelForCausalLM

    problems = []
    if not req.base_model:
        problems.append("--base_model is required (or --run_dir / --sweep_dir, which name it)")
    if req.output_dir is None:
        problems.append("--output_dir EVAL_DIR is required")
    elif (Path(req.output_dir) / RESULTS_FILE).exists() and not req.overwrite:
        problems.append(f"--output_dir {req.output_dir} already holds {RESULTS_FILE}; pass --overwrite to replace it")
    if not req.tasks and not req.lm_eval_tasks and not req.loss_files and not (req.weights and req.adapters):
        problems.append("nothing to evaluate: give --task_file, --lm_eval_tasks, --loss_file, or an --adapter (weight "
                        "metrics)")
    for name, path in req.loss_files:
        try:
            texts = loss_texts(path)
            if not texts:
                problems.append(f"--loss_file {name}: {path} has no texts")
        except UserError as err:
            problems.append(f"--loss_file {name}: {err}")
    if req.limit is not None and req.limit < 1:
        problems.append(f"--limit must be >= 1, got {req.limit}")
    config = tokenizer = None
    if req.base_model:
        config, tokenizer, model_problems = inspect_model(req.base_model)
        problems += [p.replace("--model_name_or_path", "--base_model") for p in model_problems]
    names = [n for n, _ in req.adapters] + [n for n, _ in req.tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or "base" in [n for n, _ in req.adapters]:
        problems.append(f"names must be unique and not 'base': {', '.join(dupes) or 'base'}; give NAME=PATH")
    if config is not None:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        shapes = {n: (m.out_features, m.in_features) for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
        for name, path in req.adapters:
            problems += _adapter_problems(name, Path(path), shapes, req.base_model)
    tasks = []
    for name, path in req.tasks:
        try:
            records = read_records(str(path))
            protocol = protocol_for(records, str(path))
            tasks.append(Task(name, Path(path), records[: req.limit] if req.limit else records, protocol))
        except UserError as err:
            problems.append(f"--task_file {name}: {err}")
    commonsense = {t.name: t.path for t in tasks if isinstance(t.protocol, Commonsense)}
    lm_names, lm_problems = plan_tasks(req.lm_eval_tasks, commonsense, req.lm_eval_data_dir)
    problems += lm_problems
    if req.f_file is not None:
        try:
            loss_texts(req.f_file)
        except UserError as err:
            problems.append(f"--f_file: {err}")
    if req.clora_config is not None:
        from ..config import CLoRAConfig

        try:
            CLoRAConfig.load(req.clora_config)
        except UserError as err:
            problems.append(f"--clora_config: {err}")
    if problems:
        raise RunProblems(problems, "cannot evaluate")
    return tasks, lm_names, config, tokenizer


# ---------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def loss_texts(path: Path) -> List[str]:
    """The texts of a --loss_file: records' "text" field, or (any other layout) the training prompt + answer."""
    records = read_records(str(path))
    if records and all(isinstance(r.get("text"), str) for r in records):
        return [r["text"] for r in records]
    protocol = protocol_for(records, str(path))
    return [_example_text(r, protocol) for r in records]


def _example_text(record: dict, protocol: Protocol) -> str:
    answer = record.get("output") or record.get("response") or record.get("solution") or ""
    return protocol.prompt(record) + str(answer)


def evaluate_task(model, tokenizer, task: Task, max_new_tokens: Optional[int], batch_size: int) -> Tuple[dict, list]:
    """({"accuracy", "n"}, predictions) of one model on one task; the same on every rank."""
    import evaluate
    from tqdm import tqdm

    from .generation import generate_greedy

    items = load_items(task.records, task.protocol)
    budget = max_new_tokens or DEFAULT_NEW_TOKENS[task.protocol.name]
    bar = tqdm(total=len(items), desc=f"{task.name}", disable=rank() != 0, dynamic_ncols=True)
    texts = generate_greedy(model, tokenizer, [it.prompt for it in items], budget, batch_size, progress=bar.update)
    bar.close()
    judged = [task.protocol.judge(text, item.gold) for text, item in zip(texts, items)]
    metric = evaluate.load(str(ACCURACY_METRIC))
    accuracy = metric.compute(predictions=[int(j.correct) for j in judged], references=[1] * len(judged))["accuracy"]
    predictions = [{"index": it.index, "input": it.prompt, "generated": text, "extracted": j.extracted,
                    "gold": it.gold, "correct": j.correct} for it, text, j in zip(items, texts, judged)]
    if items and all(j.extracted is None for j in judged):
        log(f"warning: no generation on {task.name} matched {task.protocol.describe()}: the model does not answer in "
            "the task's format (a base model never trained on it, or a prompt template other than training's)")
    return {"accuracy": accuracy, "n": len(items)}, predictions


def run_evaluation(req: EvalRequest, sweep_k: Optional[Dict[str, Optional[int]]] = None) -> dict:
    """Evaluate the base model and every adapter; returns the results (rank 0 also writes them)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tasks, lm_names, _, tokenizer = rank0_first(lambda: check_request(req))
    out = Path(req.output_dir)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    started = time.time()
    base = AutoModelForCausalLM.from_pretrained(req.base_model, dtype=_dtype(req.dtype)).to(device).eval()
    results: Dict[str, dict] = {"models": {}}
    adapters = {name: read_adapter(Path(path)) for name, path in req.adapters}
    weights = _weights(base, tokenizer, tasks, adapters, req) if req.weights and adapters and rank() == 0 else {}
    include_dir = out / "lm_eval_tasks"
    if lm_names and rank() == 0:
        render_tasks(lm_names, {t.name: t.path for t in tasks}, req.lm_eval_data_dir, include_dir)
    for name, path in [("base", None)] + list(req.adapters):
        model = base if path is None else PeftModel.from_pretrained(base, str(path)).eval()
        log(f"evaluating {name}" + (f" ({path})" if path else f" ({req.base_model})"))
        entry = {"adapter": str(path) if path else None, "tasks": {}, "lm_eval": {}, "weights": weights.get(name)}
        if req.loss_files:
            from .generation import text_nll

            entry["loss"] = {}
            for loss_name, loss_path in req.loss_files:
                nll, tokens = text_nll(model, tokenizer, loss_texts(loss_path)[: req.limit], req.batch_size)
                entry["loss"][loss_name] = {"nll": nll / max(tokens, 1), "tokens": tokens}
                log(f"  {loss_name}: mean token NLL {nll / max(tokens, 1):.4f} over {tokens} tokens")
        for task in tasks:
            entry["tasks"][task.name], predictions = evaluate_task(model, tokenizer, task, req.max_new_tokens,
                                                                   req.batch_size)
            log(f"  {task.name}: accuracy {entry['tasks'][task.name]['accuracy']:.4f} over {len(predictions)}")
            if rank() == 0:
                _write_jsonl(out / "predictions" / name / f"{task.name}.jsonl", predictions)
        if lm_names:
            entry["lm_eval"] = on_rank0(lambda: run_lm_eval(model, tokenizer, lm_names, include_dir, req.batch_size,
                                                            req.lm_eval_limit)) or {}
        results["models"][name] = entry
        if path is not None:
            base = model.unload()
    results["seconds"] = round(time.time() - started, 1)
    if rank() == 0:
        from .report import write_results

        write_results(out, results, sweep_k)
    barrier()
    return results


def _weights(base, tokenizer, tasks: List[Task], adapters: Dict[str, AdapterFactors], req: EvalRequest) -> Dict[str, dict]:
    from ..config import CLoRAConfig

    if req.f_file:
        texts = loss_texts(req.f_file)[: req.f_records]
    elif tasks:
        texts = [_example_text(r, tasks[0].protocol) for r in tasks[0].records[: req.f_records]]
    else:
        texts = []
    ratios = activation_ratios(base, tokenizer, texts, adapters) if texts else {}
    out = {}
    for name, adapter in adapters.items():
        source = adapter.path / "clora_config.json" if (adapter.path / "clora_config.json").is_file() else req.clora_config
        leakage = subspace_leakage(adapter, CLoRAConfig.load(source), base) if source else None
        out[name] = weight_metrics(adapter, ratios.get(name), leakage)
    return out


def _write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# what to evaluate: explicit, a training run, a sweep
# ---------------------------------------------------------------------------------------------------
ADAPTER_DIRS = ("peft_adapter", "adapter")


def run_adapter(run_dir: Path) -> Optional[Path]:
    return next((run_dir / d for d in ADAPTER_DIRS if (run_dir / d / "adapter_config.json").is_file()), None)


def from_run_dirs(run_dirs: List[Path]) -> Tuple[str, List[Tuple[str, Path]], List[str]]:
    """(base model, [(run name, adapter)], notes) of finished training runs; ConfigError when none or mixed bases."""
    bases, adapters, notes = set(), [], []
    for d in run_dirs:
        settings = read_train_config(d) or {}
        adapter = run_adapter(d)
        if not settings or adapter is None:
            notes.append(f"skipped {d.name}: no {TRAIN_CONFIG_FILE} and final adapter (unfinished?)")
            continue
        bases.add(settings["arguments"]["model_name_or_path"])
        adapters.append((d.name, adapter))
    if not adapters:
        raise ConfigError(f"no finished training run (train_config.json and adapter/) in {', '.join(map(str, run_dirs))}")
    if len(bases) > 1:
        raise ConfigError(f"the runs were trained on different base models ({', '.join(sorted(bases))}); evaluate them "
                          "separately")
    return bases.pop(), adapters, notes


def sweep_runs(root: Path, with_k: bool = False):
    """The run directories of a sweep (those holding train_config.json), or with ``with_k`` (name, k) pairs, k None
    for the λ = 0 baseline."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--sweep_dir {root}: no such directory")
    runs = sorted(p for p in root.iterdir() if (p / TRAIN_CONFIG_FILE).is_file())
    if not with_k:
        return runs
    out = []
    for d in runs:
        args = (read_train_config(d) or {}).get("arguments", {})
        out.append((d.name, None if float(args.get("clora_lambda", 1)) == 0 else int(args.get("clora_k", 0))))
    return out
