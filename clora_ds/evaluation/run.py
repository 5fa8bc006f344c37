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

import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..data import read_records
from ..distributed import barrier, log, on_rank0, rank, rank0_first
from ..errors import ConfigError, RunProblems, UserError
from ..run_dir import TRAIN_CONFIG_FILE, _write_problem, read_train_config
from .harness import plan_tasks, render_tasks, run_lm_eval
from .protocols import Boxed, Commonsense, MetaMath, Protocol, _is_number, load_items, protocol_for
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
    task_dir: Optional[Path] = None            # LLM-Adapters' dataset/ layout: every NAME/test.json is a task
    run_dir: Optional[Path] = None             # a launch/train.py --output_dir: its final adapter and base model
    sweep_dir: Optional[Path] = None           # a k-sweep: every finished run in it
    base_adapters: Optional[str] = None        # DIR[,DIR]: earlier adapters merged into the base first


@dataclass
class Task:
    name: str
    path: Path
    records: list
    protocol: Protocol


@dataclass
class EvalPlan:
    """A request that passed every check: what is loaded, evaluated and written."""

    base_model: str
    adapters: Dict[str, AdapterFactors]        # name -> factors (its directory: .path), in the request's order
    tasks: List[Task]
    lm_names: List[str]                        # lm-eval task names, ours rendered into EVAL_DIR/lm_eval_tasks/
    output_dir: Path
    tokenizer: object
    sweep_k: Optional[Dict[str, Optional[int]]] = None  # run name -> k (None: the λ = 0 baseline) of a --sweep_dir
    notes: List[str] = field(default_factory=list)
    base_adapters: list = field(default_factory=list)  # base_adapters.LoraAdapter, merged into the base in this order


# ---------------------------------------------------------------------------------------------------
# checks: everything before a model loads
# ---------------------------------------------------------------------------------------------------
POSITIVE = ("limit", "max_new_tokens", "batch_size", "lm_eval_limit", "f_records")  # flags that count something


def _path_problem(path: Path, directory: bool, expected: str) -> Optional[str]:
    """What is wrong with a path the user gave (it does not exist, or is a file where a directory is wanted, or the
    reverse); None when it is the right kind."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if directory and not path.is_dir():
        return f"{path} is a file; expected {expected}"
    if not directory and path.is_dir():
        return f"{path} is a directory; expected {expected}"
    return None


def _output_problem(out: Path, overwrite: bool) -> Optional[str]:
    if out.exists() and not out.is_dir():
        return f"--output_dir {out} is a file; expected a directory (EVAL_DIR, created if missing)"
    if (out / RESULTS_FILE).exists() and not overwrite:
        return f"--output_dir {out} already holds {RESULTS_FILE}; pass --overwrite to replace it"
    why = _write_problem(out)
    return f"--output_dir {out}: {why}" if why else None


def _adapter_problems(label: str, adapter: AdapterFactors, linear_shapes: Dict[str, Tuple[int, int]],
                      base: str) -> List[str]:
    for module, (a, b) in sorted(adapter.factors.items()):
        shape = linear_shapes.get(module)
        if shape is None:
            return [f"{label}: adapts {module}, which the base model {base} does not have (an adapter of another "
                    "architecture?)"]
        if (b.shape[0], a.shape[1]) != shape:
            return [f"{label}: {module} is [out={b.shape[0]}, in={a.shape[1]}] in the adapter but [out={shape[0]}, "
                    f"in={shape[1]}] in {base}: it was trained on another base model"]
    return []


def _task_problem(label: str, name: str, path: Path, limit: Optional[int], tasks: List[Task]) -> Optional[str]:
    """Reads one task file (every record checked against its protocol) into ``tasks``; the problem, or None."""
    from .harness import lm_eval_available

    why = _path_problem(path, False, "a test file (.json, .jsonl or .parquet)")
    if why:
        return f"{label}: {why}"
    try:
        records = read_records(str(path))
        protocol = protocol_for(records, str(path))
    except UserError as err:
        return f"{label}: {err}"
    # MATH answers are compared by lm-eval's Hendrycks is_equiv (MetaMath's too, when an answer is not a number)
    math_answers = isinstance(protocol, Boxed) or (
        isinstance(protocol, MetaMath) and not all(_is_number(protocol.gold(r)) for r in records))
    missing = lm_eval_available() if math_answers else None
    if missing:
        return f"{label}: its answers are judged by lm-eval's MATH equivalence, but {missing}"
    tasks.append(Task(name, Path(path), records[:limit] if limit else records, protocol))
    return None


def _runs(req: EvalRequest, problems: List[str]):
    """(base recorded by the runs or None, [(label, name, adapter)], notes, sweep k) of --run_dir / --sweep_dir;
    problems appended."""
    if req.run_dir is not None and req.sweep_dir is not None:
        problems.append("give --run_dir or --sweep_dir, not both")
        return None, [], [], None
    flag, root = ("--run_dir", req.run_dir) if req.run_dir is not None else ("--sweep_dir", req.sweep_dir)
    why = _path_problem(root, True, "a launch/train.py --output_dir" if flag == "--run_dir" else "a sweep's root")
    if why:
        problems.append(f"{flag} {why}")
        return None, [], [], None
    try:
        runs = [Path(root)] if flag == "--run_dir" else sweep_runs(root)
        base, adapters, notes = from_run_dirs(runs)
        sweep_k = {n: k for n, k in sweep_runs(root, with_k=True)} if flag == "--sweep_dir" else None
    except UserError as err:
        problems.append(f"{flag} {root}: {err}")
        return None, [], [], None
    label = (lambda n: f"{flag} {root}") if flag == "--run_dir" else (lambda n: f"--sweep_dir run {n}")
    why = recorded_base_problem(base, adapters[0][1].parent) if not req.base_model else None
    if why:
        problems.append(f"{flag} {adapters[0][1].parent}: {why}")
        base = None
    return base, [(label(n), n, path) for n, path in adapters], notes, sweep_k


def check_request(req: EvalRequest) -> EvalPlan:
    """Every check an evaluation needs (arguments, the base model, every adapter, every record of every task, the
    lm-eval task names, the output directory), before any model loads or anything is written; RunProblems listing
    every problem, or the plan."""
    from ..model import inspect_model, linear_shapes

    problems = [f"--{flag} must be >= 1, got {getattr(req, flag)}" for flag in POSITIVE
                if getattr(req, flag) is not None and getattr(req, flag) < 1]
    adapter_paths = [(f"--adapter {n}", n, Path(p)) for n, p in req.adapters]
    base, base_label, notes, sweep_k = req.base_model, "--base_model", [], None
    root = req.run_dir if req.run_dir is not None else req.sweep_dir
    if root is not None:
        run_base, run_adapters, notes, sweep_k = _runs(req, problems)
        adapter_paths += run_adapters
        if not base and run_base:
            base, base_label = run_base, f"{'--run_dir' if req.run_dir is not None else '--sweep_dir'} {root}: base model"
    output_dir = Path(req.output_dir) if req.output_dir is not None else None
    if output_dir is None and root is not None:
        output_dir = Path(root) / "eval"
    why = _output_problem(output_dir, req.overwrite) if output_dir is not None else (
        "--output_dir EVAL_DIR is required (--run_dir / --sweep_dir default it to DIR/eval)")
    if why:
        problems.append(why)
    config = tokenizer = None
    if not base:
        if root is None:  # with a run or sweep, _runs has said why it names no base model
            problems.append("--base_model is required (or --run_dir / --sweep_dir, which name it)")
    else:
        config, tokenizer, model_problems = inspect_model(base)
        problems += [p.replace("--model_name_or_path", base_label) for p in model_problems]
    adapters: Dict[str, AdapterFactors] = {}
    shapes = None
    for label, name, path in adapter_paths:
        try:
            adapters[name] = read_adapter(path)
        except UserError as err:
            problems.append(f"{label}: {err}")
            continue
        if config is not None and shapes is None:
            shapes = linear_shapes(config)
        if shapes is not None:
            problems += _adapter_problems(label, adapters[name], shapes, base)
    merged, found, merge_notes = _base_adapters(req, adapter_paths, root is not None, shapes, config)
    problems += found
    notes += merge_notes
    task_paths = [(f"--task_file {n}", n, Path(p)) for n, p in req.tasks]
    if req.task_dir is not None:
        why = _path_problem(req.task_dir, True, "a folder laid out like LLM-Adapters' dataset/ (NAME/test.json)")
        found = [] if why else [(f"--task_dir {d.name}", d.name, d / "test.json")
                                for d in sorted(Path(req.task_dir).iterdir()) if (d / "test.json").is_file()]
        if why:
            problems.append(f"--task_dir {why}")
        elif not found:
            problems.append(f"--task_dir {req.task_dir} holds no NAME/test.json; expected LLM-Adapters' dataset/ "
                            "layout (one folder per task, each with its test.json)")
        task_paths += found
    tasks: List[Task] = []
    problems += [p for p in (_task_problem(*task, req.limit, tasks) for task in task_paths) if p]
    names = [n for _, n, _ in adapter_paths] + [n for _, n, _ in task_paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or "base" in [n for _, n, _ in adapter_paths]:
        problems.append(f"names must be unique and not 'base': {', '.join(dupes) or 'base'}; give NAME=PATH")
    if not task_paths and not req.lm_eval_tasks and not req.loss_files and not (req.weights and adapter_paths):
        problems.append("nothing to evaluate: give --task_file, --lm_eval_tasks, --loss_file, or an --adapter (weight "
                        "metrics)")
    for name, path in req.loss_files:
        why = _path_problem(path, False, "a file of records (.json, .jsonl or .parquet)")
        try:
            if why is None and not loss_texts(path):
                why = f"{path} has no texts"
        except UserError as err:
            why = str(err)
        if why:
            problems.append(f"--loss_file {name}: {why}")
    if req.lm_eval_data_dir is not None:
        why = _path_problem(req.lm_eval_data_dir, True, "a directory holding bbh/ and mmlu_pro/")
        if why:
            problems.append(f"--lm_eval_data_dir {why}")
    commonsense = {t.name: t.path for t in tasks if isinstance(t.protocol, Commonsense)}
    lm_names, lm_problems = plan_tasks(req.lm_eval_tasks, commonsense, req.lm_eval_data_dir)
    problems += lm_problems
    if req.f_file is not None:
        why = _path_problem(req.f_file, False, "a file of records (.json, .jsonl or .parquet)")
        if why:
            problems.append(f"--f_file {why}")
        else:
            try:
                loss_texts(req.f_file)
            except UserError as err:
                problems.append(f"--f_file: {err}")
    if req.clora_config is not None:
        from ..config import CLoRAConfig

        if not Path(req.clora_config).exists():
            problems.append(f"--clora_config {req.clora_config} does not exist")
        else:
            try:
                CLoRAConfig.load(req.clora_config)
            except UserError as err:
                problems.append(f"--clora_config: {err}")
    needed = [("evaluate", "in-domain accuracy (--task_file, --task_dir)", bool(task_paths)),
              ("matplotlib", "the sweep's plot (--sweep_dir)", bool(sweep_k))]
    problems += [f"{what} needs the {package} package, which is not installed: pip install 'clora_ds[eval]'"
                 for package, what, wanted in needed if wanted and importlib.util.find_spec(package) is None]
    if problems:
        raise RunProblems(problems, "cannot evaluate")
    return EvalPlan(base, adapters, tasks, lm_names, output_dir, tokenizer, sweep_k, notes, merged)


def _base_adapters(req: EvalRequest, adapter_paths, from_runs: bool, shapes, config):
    """(the adapters to merge into the base, problems, notes). --base_adapters, else what the runs of --run_dir /
    --sweep_dir recorded; every adapter whose run recorded its base adapters must get exactly those (fingerprints)."""
    from ..base_adapters import read_adapters, recorded_base_adapters, same_adapter_files
    from ..model import linear_shapes

    problems, notes = [], []
    # an adapter's run is the directory holding it (a run's OUT/adapter); None: no run record beside it
    records = {label: recorded_base_adapters(Path(path).parent) for label, _, path in adapter_paths}
    spec = req.base_adapters
    if spec is None:
        recorded = {tuple(a["path"] for a in r) for r in records.values() if r}
        if recorded and from_runs and len(recorded) == 1:
            spec = ",".join(recorded.pop())
            notes.append(f"--base_adapters {spec}: as the run recorded (merged into the base before training)")
        elif recorded:
            trained = next(label for label, r in records.items() if r)
            paths = ",".join(a["path"] for a in records[trained])
            return [], [f"{trained} was trained on the base with earlier adapters merged into it ({paths}); pass "
                        f"--base_adapters {paths}" + (" (the runs recorded different ones: evaluate them separately)"
                                                       if len(recorded) > 1 else "")], notes
        else:
            return [], [], notes
    if shapes is None:  # the base model or every adapter has a problem already named
        if config is None:
            return [], [], notes
        shapes = linear_shapes(config)
    merged, found = read_adapters(spec, "--base_adapters", shapes)
    if found and req.base_adapters is None:  # paths the run recorded, which may be relative to where it trained
        found = [f"{p} (as the run recorded it: pass --base_adapters with those adapters' paths from here)" for p in found]
    if found:
        return [], found, notes
    for label, record in records.items():
        if record is None:
            notes.append(f"{label} has no training record beside it: evaluated on the base with --base_adapters merged, "
                         "as given")
        elif not same_adapter_files(record, merged):
            was = ",".join(a["path"] for a in record) or "none (the plain base)"
            problems.append(f"{label} was trained with base adapters {was}, not the ones --base_adapters {spec} merges "
                            "(their files differ, or their order); evaluate it with its own, or separately")
    return merged, problems, notes


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


def run_evaluation(req: EvalRequest) -> dict:
    """Evaluate the base model and every adapter; returns the results (rank 0 also writes them). Everything is
    checked first (``check_request``, rank 0 first): a problem is one RunProblems before any model loads."""
    plan = rank0_first(lambda: check_request(req))
    for note in plan.notes:
        log(note)
    from peft import PeftModel  # after the checks: importing it alone takes seconds
    from transformers import AutoModelForCausalLM

    tasks, lm_names, tokenizer, adapters, out = plan.tasks, plan.lm_names, plan.tokenizer, plan.adapters, plan.output_dir
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    started = time.time()
    base = AutoModelForCausalLM.from_pretrained(plan.base_model, dtype=_dtype(req.dtype)).to(device).eval()
    if plan.base_adapters:
        from ..base_adapters import merge_base_adapters

        changed = merge_base_adapters(base, plan.base_adapters)
        log(f"base: {plan.base_model} with {', '.join(str(a.path) for a in plan.base_adapters)} merged into {changed} "
            "weights ('base' below is that merged model)")
    results: Dict[str, dict] = {"models": {}}
    if plan.base_adapters:
        results["base_adapters"] = [a.record() for a in plan.base_adapters]
    weights = _weights(base, tokenizer, tasks, adapters, req) if req.weights and adapters and rank() == 0 else {}
    include_dir = out / "lm_eval_tasks"
    if lm_names and rank() == 0:
        render_tasks(lm_names, {t.name: t.path for t in tasks}, req.lm_eval_data_dir, include_dir)
    for name, path in [("base", None)] + [(n, a.path) for n, a in adapters.items()]:
        model = base if path is None else PeftModel.from_pretrained(base, str(path)).eval()
        log(f"evaluating {name}" + (f" ({path})" if path else f" ({plan.base_model})"))
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

        write_results(out, results, plan.sweep_k)
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
    """(base model as recorded, [(run name, adapter)], notes) of finished training runs; ConfigError when none or
    mixed bases."""
    bases, adapters, notes = set(), [], []
    for d in run_dirs:
        settings = read_train_config(d) or {}
        base = (settings.get("arguments") or {}).get("model_name_or_path")
        adapter = run_adapter(d)
        missing = [what for what, absent in ((f"{TRAIN_CONFIG_FILE} naming its model_name_or_path", not base),
                                             (f"a final {ADAPTER_DIRS[1]}/ (adapter_config.json)", adapter is None)) if absent]
        if missing and len(run_dirs) == 1:
            raise ConfigError(f"not a finished training run: it has no {' and no '.join(missing)} (unfinished?)")
        if missing:
            notes.append(f"skipped {d.name}: no {' and no '.join(missing)} (unfinished?)")
            continue
        bases.add(base)
        adapters.append((d.name, adapter))
    if not adapters:
        raise ConfigError(f"no finished training run ({TRAIN_CONFIG_FILE} and adapter/) in "
                          f"{', '.join(map(str, run_dirs))}")
    if len(bases) > 1:
        raise ConfigError(f"the runs were trained on different base models ({', '.join(sorted(bases))}); evaluate them "
                          "separately")
    return bases.pop(), adapters, notes


def _training_dir(run_dir: Path) -> Optional[Path]:
    """The directory training ran from, when the run recorded a relative --output_dir (the run dir then ends in it)."""
    recorded = Path(str(((read_train_config(run_dir) or {}).get("arguments") or {}).get("output_dir") or "/"))
    here = Path(run_dir).resolve()
    n = len(recorded.parts)
    if recorded.is_absolute() or ".." in recorded.parts or here.parts[-n:] != recorded.parts:
        return None
    return Path(*here.parts[:-n])


def recorded_base_problem(base: str, run_dir: Path) -> Optional[str]:
    """Why the base model a run recorded cannot be used from here: a relative path that does not resolve from the
    current directory (training ran elsewhere); None when it resolves, is absolute, or names a hub model."""
    from ..model import _offline

    path = Path(base)
    if path.is_absolute() or path.exists():
        return None
    candidates = [_training_dir(run_dir)] + list(Path(run_dir).resolve().parents)
    there = next((d for d in candidates if d is not None and (d / path).exists()), None)
    if there is not None:
        return (f"its base model {base} ({TRAIN_CONFIG_FILE}) was recorded relative to {there}; run from there or pass "
                f"--base_model {there / path}")
    hub_like = not base.startswith(".") and base.count("/") == 1  # as model.inspect_model tells a hub name
    if hub_like and not _offline():
        return None
    trained_in = _training_dir(run_dir)
    return (f"its base model {base} ({TRAIN_CONFIG_FILE}) was recorded relative to "
            f"{trained_in or 'the directory training ran from'}, and it does not resolve from here ({Path.cwd()})"
            + (" nor is it reachable on the hub (HF_HUB_OFFLINE is set)" if hub_like else "")
            + "; run from there or pass --base_model")


def sweep_runs(root: Path, with_k: bool = False):
    """The run directories of a sweep (those holding train_config.json), or with ``with_k`` (name, k) pairs, k None
    for the λ = 0 baseline."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--sweep_dir {root} " + ("is a file; expected a sweep's root" if root.exists() else "does not exist"))
    runs = sorted(p for p in root.iterdir() if (p / TRAIN_CONFIG_FILE).is_file())
    if not with_k:
        return runs
    out = []
    for d in runs:
        args = (read_train_config(d) or {}).get("arguments", {})
        out.append((d.name, None if float(args.get("clora_lambda", 1)) == 0 else int(args.get("clora_k", 0))))
    return out
