"""The learning-vs-forgetting Pareto benchmark on a real pretrained LLaMA, SmolLM2-135M-Instruct (bench_forgetting.py
--real, and --smoke for CI). Offline: the model and BIG-bench come from `launch/prepare_assets.py smollm2 bbh`.

The new domain: BIG-bench's modified_arithmetic/three_digit_addition_plus_one, zero-shot ("a + b ->" answered by
a + b + 1, an operation the base does not know: it adds, or does not answer). Every run is a trajectory: the launcher
evaluates its named eval sets every --eval_every steps (metrics.jsonl), and the base is the same evaluation of a run
whose adapter has not moved (1 step at lr 1e-30). At each point:

- gain: the base's held-out answer NLL (120 problems never trained) minus the adapter's, nats per answer token;
- forgetting, (a): the change from the base of the mean token NLL on held-out general text, from the calibration's
  source (text_a: BBH-source inputs, other items than the calibration's) and from another (text_b: inputs of other
  BIG-bench tasks, none in the calibration), so that activations P is not judged only where it was fitted;
- forgetting, (b): the base's accuracy minus the adapter's on a pooled multiple-choice probe (BIG-bench tasks where
  the base is above chance, scored by log-likelihood, the options of a record in one row).

Forgetting at matched gain is interpolated on each trajectory at 50/75/90% of LoRA's best gain, and CLoRA minus LoRA
is given with a paired (by seed) bootstrap 95% interval. Finished runs are reused, so an interrupted run continues.
"""
from __future__ import annotations

import json
import random
import statistics
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
VERSION = 2  # of the benchmark's data and runs: a change makes an older --out refuse to be reused

DOMAIN_TASK = "modified_arithmetic/three_digit_addition_plus_one"
# The probe: BIG-bench multiple-choice tasks with short items where SmolLM2-135M-Instruct is well above chance, and how
# many items of each. Screened on 100-200 items of 25 short tasks (2026-12-02); at chance or within 5 points of it,
# hence not used: misconceptions, anachronisms, entailed_polarity, emojis_emotion_prediction, fact_checker/fever,
# social_iqa, implicatures, strategyqa, winowhy, epistemic_reasoning, logical_fallacy_detection, sports_understanding,
# hyperbaton, navigate, cs_algorithms/valid_parentheses, multiemo/reviews|medicine_sentence_en, hindu_knowledge.
# The base's accuracy on each is reported by every run (pareto.md). None is a BBH source task.
PROBE_TASKS = {"metaphor_boolean": 480, "multiemo/hotels_sentence_en": 240, "multiemo/products_sentence_en": 180,
               "phrase_relatedness": 100}
# Held-out general text from another source than the calibration's: inputs of other BIG-bench tasks.
TEXT_B_TASKS = ["known_unknowns", "riddle_sense", "timedial", "physical_intuition", "epistemic_reasoning",
                "winowhy", "analytic_entailment", "general_knowledge", "english_proverbs", "crass_ai",
                "logical_fallacy_detection", "strategyqa", "cause_and_effect/one_sentence", "implicatures",
                "hindu_knowledge"]
TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"
MAX_TEXT_CHARS = 600  # general-text items longer than this are skipped (tokens cost the same in every evaluation)


@dataclass
class Sizes:
    """How much of everything: the real benchmark's defaults (about 2 hours on 2 CPU cores) or --smoke's."""
    train: int = 512         # domain training problems (one epoch at steps x batch)
    gain: int = 120          # held-out domain problems
    text_per_task: int = 2   # general-text items per task, each of text_a (up to 24 tasks) and text_b (15)
    calibration_per_task: int = 16
    calibration_tokens: int = 8192
    probe: int = 1000        # pooled probe items
    steps: int = 32
    eval_every: int = 8
    batch: int = 16
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


SMOKE = Sizes(train=16, gain=8, text_per_task=1, calibration_per_task=2, calibration_tokens=256, probe=12, steps=4,
              eval_every=2, batch=4, seeds=[0])


@dataclass(frozen=True)
class Config:
    name: str
    lr: float
    k: int = 0            # 0: plain LoRA (λ = 0)
    lam: float = 0.0
    p_init: str = "orthogonal"
    replay: float = 0.0   # share of general text in the training mixture

    @property
    def kind(self) -> str:
        return "lora" if self.lam == 0 and not self.replay else "replay" if self.lam == 0 else \
            "random P" if self.p_init == "orthogonal" else "activations P"


def configs(smoke: bool, lr: float = 3e-4) -> List[Config]:
    """LoRA at three lrs (the reference frontier), LoRA with 10% replay, CLoRA with random and activations P at
    (k, λ) = (64, 1) (the pilot's) and (16, 10): two k and two λ in two runs, not the 2 x 2 grid (on 2 CPU cores a
    run costs about 7 minutes; the grid and its seeds would have taken the benchmark past 2 hours); --smoke: LoRA and
    CLoRA with activations P."""
    if smoke:
        return [Config("lora", lr), Config("act_k16_l1", lr, 16, 1.0, "activations")]
    out = [Config(f"lora_lr{x:g}", x) for x in (lr / 3, lr, lr * 3)] + [Config("lora_replay10", lr, replay=0.1)]
    for p_init, tag in (("orthogonal", "rand"), ("activations", "act")):  # two k and two λ, not all four pairs
        out += [Config(f"{tag}_k{k}_l{lam:g}", lr, k, lam, p_init) for k, lam in ((64, 1.0), (16, 10.0))]
    return out


# ---------------------------------------------------------------------------------------------------
# data, from BIG-bench's source distribution and prepare_assets' bbh files
# ---------------------------------------------------------------------------------------------------
def read_bigbench(sdist: Path, names) -> Dict[str, list]:
    """{task: bbh_records(task.json)} for the BIG-bench tasks ``names`` (paths under benchmark_tasks/)."""
    from clora_ds.assets import bbh_records

    wanted = {f"/bigbench/benchmark_tasks/{n}/task.json": n for n in names}
    found = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            key = next((k for k in wanted if member.name.endswith(k)), None)
            if key and member.isfile():
                found[wanted[key]] = json.load(tar.extractfile(member))
    missing = sorted(set(names) - set(found))
    if missing:
        sys.exit(f"error: {sdist} lacks the BIG-bench tasks {', '.join(missing)}")
    return {n: (bbh_records(t) if n != DOMAIN_TASK else t["examples"]) for n, t in found.items()}


def addition_problems(examples) -> List[tuple]:
    """Every distinct 'a + b -> a+b+1' line of the task, its shots included: (a, b)."""
    seen = {}  # insertion-ordered
    for ex in examples:
        for line in str(ex["input"]).splitlines() + [f"{ex['input'].splitlines()[-1]} {ex['target']}"]:
            parts = line.replace("->", " -> ").split()
            if len(parts) == 5 and parts[1] == "+" and parts[3] == "->" and parts[4].lstrip("-").isdigit():
                a, b, c = int(parts[0]), int(parts[2]), int(parts[4])
                if c == a + b + 1:
                    seen.setdefault((a, b), None)
    return list(seen)


def addition_record(a: int, b: int, rng: random.Random) -> dict:
    """A choice record: 'Q: a + b ->\\nA:' answered ' a+b+1'; the other options are a+b (what the base adds), a+b+2
    and a+b+10, so eval_gain_accuracy says whether the 'plus one' was learned."""
    options = [a + b + 1, a + b, a + b + 2, a + b + 10]
    rng.shuffle(options)
    return {"input": f"{a} + {b} ->", "choices": [str(o) for o in options], "label": options.index(a + b + 1)}


def texts(records, per_task: int, skip: int, rng_seed: int, taken: set) -> List[str]:
    """``per_task`` distinct short inputs of a task after the first ``skip`` (in a seeded order), none in ``taken``
    (BIG-bench repeats inputs within and across tasks), which they join."""
    short = list(dict.fromkeys(r["input"] for r in records if len(r["input"]) <= MAX_TEXT_CHARS))
    random.Random(rng_seed).shuffle(short)
    chosen = [t for t in short[skip:] if t not in taken][:per_task]
    taken.update(chosen)
    return chosen


def build_data(assets: Path, work: Path, sizes: Sizes, write_jsonl) -> Dict[str, Path]:
    """The benchmark's files in work/data (rebuilt only when missing): train, gain, text_a, text_b, probe,
    calibration, replay; and data/summary.json (what each holds)."""
    data = work / "data"
    names = ["train", "gain", "text_a", "text_b", "probe", "calibration", "replay"]
    paths = {n: data / f"{n}.jsonl" for n in names}
    if all(p.is_file() for p in paths.values()) and all((data / f).is_file() for f in ("summary.json", "probe_tasks.json")):
        return paths
    from clora_ds.assets import BBH_SOURCES

    sdist = assets / "_downloads" / "bigbench-1.0.0.tar.gz"
    if not sdist.is_file():
        sys.exit(f"error: {sdist} does not exist; run `python launch/prepare_assets.py smollm2 bbh --assets_dir {assets}`")
    tasks = read_bigbench(sdist, [DOMAIN_TASK] + list(PROBE_TASKS) + TEXT_B_TASKS)
    rng = random.Random(0)
    problems = addition_problems(tasks[DOMAIN_TASK])
    rng.shuffle(problems)
    need = sizes.gain + sizes.train
    if len(problems) < need:
        sys.exit(f"error: {DOMAIN_TASK} has {len(problems)} distinct problems, fewer than {need}")
    gain = [addition_record(a, b, rng) for a, b in problems[:sizes.gain]]
    train = [addition_record(a, b, rng) for a, b in problems[sizes.gain:need]]
    bbh = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted((assets / "bbh").glob("*.jsonl"))}
    if sorted(bbh) != sorted(BBH_SOURCES):
        sys.exit(f"error: {assets / 'bbh'} is not prepare_assets' bbh (run `python launch/prepare_assets.py bbh`)")
    calibration, text_a, text_b, taken = [], [], [], set()
    kept = [(i, records) for i, (name, records) in enumerate(sorted(bbh.items())) if name not in PROBE_TASKS]
    for i, records in kept:  # the calibration first: no held-out text may be one of its items
        calibration += texts(records, sizes.calibration_per_task, 0, i, taken)
    for i, records in kept:
        text_a += texts(records, sizes.text_per_task, sizes.calibration_per_task, i, taken)
    for i, name in enumerate(TEXT_B_TASKS):
        text_b += texts(tasks[name], sizes.text_per_task, 0, 100 + i, taken)
    probe = []
    for i, (name, share) in enumerate(PROBE_TASKS.items()):
        usable = [{"input": r["input"], "choices": r["choices"], "label": r["label"], "task": name}
                  for r in tasks[name] if "choices" in r and len(set(r["choices"])) == len(r["choices"])]
        random.Random(200 + i).shuffle(usable)
        probe += usable[:max(1, round(share * sizes.probe / sum(PROBE_TASKS.values())))]
    write_jsonl(paths["train"], train)
    write_jsonl(paths["gain"], gain)
    write_jsonl(paths["text_a"], [{"text": t} for t in text_a])
    write_jsonl(paths["text_b"], [{"text": t} for t in text_b])
    write_jsonl(paths["probe"], [{k: r[k] for k in ("input", "choices", "label")} for r in probe])
    (data / "probe_tasks.json").write_text(json.dumps([r["task"] for r in probe]) + "\n")
    write_jsonl(paths["calibration"], [{"text": t} for t in calibration])
    write_jsonl(paths["replay"], [{"text": t} for t in calibration])  # replay: the calibration's text, never evaluated
    summary = {"domain": DOMAIN_TASK, "train": len(train), "gain": len(gain), "text_a": len(text_a),
               "text_a_source": "BBH source tasks (BIG-bench), other items than the calibration's",
               "text_b": len(text_b), "text_b_source": TEXT_B_TASKS, "calibration": len(calibration),
               "probe": len(probe), "probe_tasks": {n: sum(r["task"] == n for r in probe) for n in PROBE_TASKS},
               "probe_chance": statistics.mean(1 / len(r["choices"]) for r in probe)}
    (data / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------------
def metrics_rows(run_dir: Path) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if "eval_gain_loss" in r]


def train_run(base: Path, data: Dict[str, Path], out: Path, cfg: Config, seed: int, sizes: Sizes, run,
              steps: Optional[int] = None) -> Path:
    """One launch/train.py run (one process; its evaluations every sizes.eval_every steps), reused when finished."""
    steps = steps or sizes.steps
    if (out / "adapter" / "adapter_config.json").is_file() and metrics_rows(out):
        return out
    evals = ",".join(f"{n}={data[n]}" for n in ("gain", "text_a", "text_b"))
    cmd = [sys.executable, ROOT / "launch" / "train.py", "--deepspeed", ROOT / "ds_configs" / "zero2.json",
           "--model_name_or_path", base, "--train_file", data["train"], "--eval_file", evals,
           "--output_dir", out, "--overwrite_output_dir", "--max_steps", steps, "--eval_steps", sizes.eval_every,
           "--per_device_train_batch_size", sizes.batch, "--per_device_eval_batch_size", 32,
           "--learning_rate", cfg.lr, "--lora_r", 8, "--lora_alpha", 16, "--lora_dropout", 0,
           "--target_modules", TARGETS, "--clora_k", cfg.k or 8, "--clora_lambda", cfg.lam, "--seed", seed,
           "--save_steps", 0, "--logging_steps", max(1, sizes.eval_every // 4), "--max_seq_length", 256]
    if cfg.replay:
        cmd[cmd.index("--train_file") + 1] = f"{data['train']},{data['replay']}"
        cmd += ["--train_weights", f"{1 - cfg.replay:g},{cfg.replay:g}"]
    if cfg.p_init == "activations":
        cmd += ["--clora_p_init", "activations", "--clora_p_data", data["calibration"],
                "--clora_p_tokens", sizes.calibration_tokens]
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    run(cmd, out.parent / f"{out.name}.train.log", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    (out / "bench_seconds.txt").write_text(f"{time.time() - started:.1f}\n")
    return out


def trajectory(rows: List[dict], base: dict, probe: Optional[float] = None) -> List[dict]:
    """[{step, gain, text_a, text_b, probe, gain_accuracy}] from the base (step 0: all zero) through every evaluation:
    gain in nats per answer token, text NLL change in nats per token; probe forgetting (base − adapter accuracy, in
    points) at the end only, where ``probe`` is given (None elsewhere: the 1,000-item probe is scored once per
    configuration, at the end of its first seed; see Prober)."""
    out = [{"step": 0, "gain": 0.0, "text_a": 0.0, "text_b": 0.0, "probe": 0.0, "gain_accuracy": base["eval_gain_accuracy"]}]
    for r in sorted(rows, key=lambda r: r["step"]):
        out.append({"step": r["step"], "gain": base["eval_gain_loss"] - r["eval_gain_loss"],
                    "text_a": r["eval_text_a_loss"] - base["eval_text_a_loss"],
                    "text_b": r["eval_text_b_loss"] - base["eval_text_b_loss"], "probe": None,
                    "gain_accuracy": r["eval_gain_accuracy"]})
    if probe is not None:
        out[-1]["probe"] = 100 * (base["probe_accuracy"] - probe)
    return out


class Prober:
    """The pooled probe's accuracy by log-likelihood (clora_ds.evaluation.choice, the launcher's own scorer: the
    options of a record in one row), for the base and for each finished run's adapter, on one loaded base model;
    cached in the run's probe.json (with the probe file's sha256), so a finished run is never scored again."""

    def __init__(self, base_model: Path, probe_file: Path):
        import hashlib

        self.base_model, self.probe_file = base_model, probe_file
        self.sha = hashlib.sha256(probe_file.read_bytes()).hexdigest()
        self.model = None

    def _load(self):
        if self.model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(str(self.base_model))
            self.model = AutoModelForCausalLM.from_pretrained(str(self.base_model), dtype=torch.float32).eval()
            self.records = [json.loads(line) for line in self.probe_file.read_text().splitlines()]

    def accuracy(self, run_dir: Path, adapter: Optional[Path]) -> float:
        cache = run_dir / "probe.json"
        if cache.is_file():
            got = json.loads(cache.read_text())
            if got.get("probe_sha256") == self.sha:
                return got["accuracy"]
        import torch

        from clora_ds.evaluation.choice import CHOICE, multiple_choice_accuracy

        self._load()
        model = self.model
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.model, str(adapter)).eval()
        try:
            with torch.no_grad():
                result = multiple_choice_accuracy(model, self.tok, self.records, CHOICE, batch_size=32)
        finally:
            if adapter is not None:
                self.model = model.unload()  # the base's own modules back, for the next adapter
        tasks = json.loads((self.probe_file.parent / "probe_tasks.json").read_text())
        per_task = {}
        for t, p, g in zip(tasks, result.predicted, result.gold):
            per_task.setdefault(t, []).append(p == g)
        cache.write_text(json.dumps({"accuracy": result.accuracy, "n": result.n, "probe_sha256": self.sha,
                                     "per_task": {t: sum(v) / len(v) for t, v in per_task.items()}}) + "\n")
        return result.accuracy


def forgetting_points(traj: List[dict], metric: str) -> List[tuple]:
    return [(p["gain"], p[metric]) for p in traj]


def at_gain(traj: List[dict], metric: str, gain: float, forgetting_at_gain) -> Optional[float]:
    return forgetting_at_gain(forgetting_points(traj, metric), gain)


FORGETTING = (("text_a", "text NLL change, calibration's source (nats/token)"),
              ("text_b", "text NLL change, other source (nats/token)"))
PROBE_LABEL = "probe accuracy drop at the end (points)"


def select_best(cfgs: List[Config], trajs: Dict[str, List[dict]], gain: float, forgetting_at_gain) -> Config:
    """The config of a kind whose seed-0 trajectory forgets least general text (text_a + text_b NLL change) where it
    reaches ``gain`` (75% of the reference LoRA's best gain); the highest gain when none reaches it."""
    def forgot(c):
        a, b = (at_gain(trajs[c.name], m, gain, forgetting_at_gain) for m in ("text_a", "text_b"))
        return None if a is None or b is None else a + b
    reached = [c for c in cfgs if forgot(c) is not None]
    if reached:
        return min(reached, key=forgot)
    return max(cfgs, key=lambda c: max(p["gain"] for p in trajs[c.name]))


def weight_metrics(base_model: Path, adapters: Dict[str, Path], f_file: Path, out: Path, run) -> Dict[str, dict]:
    """‖ΔW‖_F, F (on the held-out other-source text) and leakage of each adapter (launch/evaluate.py), reused."""
    results = out / "eval_results.json"
    if results.is_file():
        models = json.loads(results.read_text())["models"]
        if all(n in models for n in adapters):
            return {n: models[n]["weights"] for n in adapters}
    cmd = [sys.executable, ROOT / "launch" / "evaluate.py", "--base_model", base_model, "--f_file", f_file,
           "--output_dir", out, "--overwrite"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path / 'adapter'}"]
    run(cmd, out.parent / "weights.log", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    models = json.loads(results.read_text())["models"]
    return {n: models[n]["weights"] for n in adapters}


def pareto(args, run, stats) -> str:
    """Train (or reuse) every run, then the table, the verdicts and the plot; returns the table (markdown)."""
    from clora_ds.assets import SMOLLM2_DIR

    smoke = args.smoke
    sizes = SMOKE if smoke else Sizes(seeds=args.seeds)
    assets, work = Path(args.assets_dir), Path(args.out)
    base_model = assets / SMOLLM2_DIR
    if not (base_model / "config.json").is_file() or not (assets / "bbh").is_dir():
        sys.exit(f"error: run `python launch/prepare_assets.py smollm2 bbh --assets_dir {assets}` first")
    data = build_data(assets, work, sizes, stats.write_jsonl)
    summary = json.loads((work / "data" / "summary.json").read_text())
    started = time.time()

    def log(msg):
        print(f"[pareto {time.time() - started:6.0f}s] {msg}", file=sys.stderr, flush=True)

    prober = Prober(base_model, data["probe"])
    one_step = Sizes(**{**sizes.__dict__, "eval_every": 1})
    base_dir = train_run(base_model, data, work / "base", Config("base", 1e-30), 0, one_step, run, steps=1)
    base = {**metrics_rows(base_dir)[-1], "probe_accuracy": prober.accuracy(base_dir, None)}
    base_tasks = json.loads((base_dir / "probe.json").read_text())["per_task"]
    chance = {}
    for t, r in zip(json.loads((work / "data" / "probe_tasks.json").read_text()),
                    (json.loads(line) for line in data["probe"].read_text().splitlines())):
        chance.setdefault(t, []).append(1 / len(r["choices"]))
    log(f"base: gain-set answer NLL {base['eval_gain_loss']:.3f}, accuracy {base['eval_gain_accuracy']:.3f}; text_a NLL "
        f"{base['eval_text_a_loss']:.3f}, text_b {base['eval_text_b_loss']:.3f}; probe accuracy "
        f"{base['probe_accuracy']:.3f} (chance {summary['probe_chance']:.3f})")
    cfgs = configs(smoke, args.lr)
    runs: Dict[str, Dict[int, Path]] = {c.name: {} for c in cfgs}
    probes: Dict[str, Dict[int, float]] = {c.name: {} for c in cfgs}

    def do(cfg, seed):
        probed = seed == sizes.seeds[0]  # the probe costs as much as a run: scored on every first seed only
        d = work / f"s{seed}" / cfg.name
        if args.report_only:  # what has finished, nothing more
            if (d / "adapter" / "adapter_config.json").is_file() and metrics_rows(d) and (
                    not probed or (d / "probe.json").is_file()):
                runs[cfg.name][seed] = d
                if probed:
                    probes[cfg.name][seed] = prober.accuracy(d, d / "adapter")
            return
        t = time.time()
        runs[cfg.name][seed] = train_run(base_model, data, d, cfg, seed, sizes, run)
        if probed:
            probes[cfg.name][seed] = prober.accuracy(d, d / "adapter")
        log(f"{cfg.name} seed {seed}: {time.time() - t:.0f} s"
            + (f" (probe {probes[cfg.name][seed]:.3f})" if probed else ""))

    for cfg in cfgs:
        do(cfg, sizes.seeds[0])
    cfgs = [c for c in cfgs if runs[c.name]]  # --report_only: the configurations whose first seed has finished

    def traj(c, s):
        return trajectory(metrics_rows(runs[c.name][s]), base, probes[c.name].get(s))

    trajs0 = {c.name: traj(c, sizes.seeds[0]) for c in cfgs}
    reference = next(c for c in cfgs if c.kind == "lora" and c.lr == args.lr)
    ref_gain = max(p["gain"] for p in trajs0[reference.name])
    best = {kind: select_best([c for c in cfgs if c.kind == kind], trajs0, 0.75 * ref_gain, stats.forgetting_at_gain)
            for kind in ("random P", "activations P") if any(c.kind == kind for c in cfgs)}
    seeded = [reference] + [c for c in best.values() if c is not reference]
    order = ([reference] + [best[k] for k in ("activations P", "random P") if k in best])  # if time runs out: LoRA first
    for cfg in order:
        for seed in sizes.seeds[1:]:
            do(cfg, seed)
    trajs = {c.name: {s: traj(c, s) for s in runs[c.name]} for c in cfgs}
    weights = weight_metrics(base_model, {f"{c.name}_s{sizes.seeds[0]}": runs[c.name][sizes.seeds[0]] for c in cfgs},
                             data["text_b"], work / "weights", run)
    seconds = {f"{c.name}_s{s}": float((d / "bench_seconds.txt").read_text()) for c in cfgs for s, d in runs[c.name].items()
               if (d / "bench_seconds.txt").is_file()}
    compared = [c for c in seeded if c is not reference] + [c for c in cfgs if c.kind == "replay"]

    # the headline: forgetting at matched gain, each compared config minus the reference LoRA, paired by seed
    headline = []
    for cfg in compared:
        for metric, _ in FORGETTING:
            for m in stats.matched_gain_differences(
                    {s: forgetting_points(t, metric) for s, t in trajs[cfg.name].items()},
                    {s: forgetting_points(t, metric) for s, t in trajs[reference.name].items()}):
                headline.append({"run": cfg.name, "kind": cfg.kind, "metric": metric, "fraction": m.fraction,
                                 "gain": m.gain, "difference": m.difference, "low": m.low, "high": m.high,
                                 "pairs": m.pairs, "verdict": stats.matched_gain_verdict(m)})
    ends = []  # the probe, scored at the end of each run: end-of-training differences, paired by seed, with the gains
    for cfg in compared:
        pairs = sorted(s for s in set(trajs[cfg.name]) & set(trajs[reference.name])
                       if trajs[cfg.name][s][-1]["probe"] is not None and trajs[reference.name][s][-1]["probe"] is not None)
        d_probe = [trajs[cfg.name][s][-1]["probe"] - trajs[reference.name][s][-1]["probe"] for s in pairs]
        d_gain = [trajs[cfg.name][s][-1]["gain"] - trajs[reference.name][s][-1]["gain"] for s in pairs]
        row = {"run": cfg.name, "pairs": len(pairs), "probe": stats.paired_bootstrap(d_probe, random.Random(0)),
               "gain": stats.paired_bootstrap(d_gain, random.Random(0))}
        lo, hi = row["probe"][1:]
        row["verdict"] = ("one pair: no interval" if len(pairs) < 2 else "forgets less on the probe" if hi < 0
                          else "forgets more on the probe" if lo > 0 else stats.NO_DIFFERENCE)
        ends.append(row)

    def interval(v, pairs, f="{:+.3g}"):
        m, lo, hi = v
        return f.format(m) + ("" if pairs < 2 else f" [{f.format(lo)}, {f.format(hi)}]")

    lines = [f"| run (minus {reference.name}) | forgetting measure | at 50% of LoRA's best gain | at 75% | at 90% |",
             "|---|---|---|---|---|"]
    for cfg in compared:
        for metric, label in FORGETTING:
            cells = []
            for h in [h for h in headline if h["run"] == cfg.name and h["metric"] == metric]:
                if h["difference"] is None:
                    cells.append("not reached")
                elif h["pairs"] < 2:
                    cells.append(f"{h['difference']:+.4f} (1 seed)")
                else:
                    cells.append(f"{h['difference']:+.4f} [{h['low']:+.4f}, {h['high']:+.4f}]: {h['verdict']}")
            lines.append(f"| {cfg.name} ({len(trajs[cfg.name])} seeds) | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"| run (minus {reference.name}), end of training | {PROBE_LABEL} | gain at the end (nats) | verdict |",
              "|---|---:|---:|---|"]
    for row in ends:
        lines.append(f"| {row['run']} ({row['pairs']} seeds) | {interval(row['probe'], row['pairs'], '{:+.1f}')} | "
                     f"{interval(row['gain'], row['pairs'])} | {row['verdict']} |")
    matched = "\n".join(lines)

    # every config: the end of its seed-0 trajectory, its forgetting at 75% of LoRA's best gain, weights
    g_best = statistics.mean(max(p["gain"] for p in t) for t in trajs[reference.name].values())
    rows = ["| run | kind | lr | k | λ | gain at the end (nats) | gain accuracy | text_a Δ | text_b Δ | probe Δ (pts) | "
            "text_a Δ @75% | text_b Δ @75% | ‖ΔW‖_F | F | seconds |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cfgs:
        t = trajs[c.name][sizes.seeds[0]]
        end = t[-1]
        w = weights[f"{c.name}_s{sizes.seeds[0]}"]
        at = [at_gain(t, m, 0.75 * g_best, stats.forgetting_at_gain) for m, _ in FORGETTING]
        rows.append(f"| {c.name} | {c.kind} | {c.lr:g} | {c.k or '-'} | {c.lam:g} | {end['gain']:.3f} | "
                    f"{end['gain_accuracy']:.3f} | {end['text_a']:+.4f} | {end['text_b']:+.4f} | {end['probe']:+.1f} | "
                    + " | ".join("-" if v is None else f"{v:+.4f}" for v in at)
                    + f" | {w['delta_w_fro']:.3g} | {w['F']:.3g} | {seconds.get(f'{c.name}_s{sizes.seeds[0]}', 0):.0f} |")
    per_config = "\n".join(rows)
    probe_tasks = ", ".join(f"{n} {k} items, base {100 * base_tasks[n]:.1f}% (chance {100 * statistics.mean(chance[n]):.0f}%)"
                            for n, k in summary["probe_tasks"].items() if k)
    notes = (f"base (SmolLM2-135M-Instruct): answer NLL {base['eval_gain_loss']:.3f} nats/token on {summary['gain']} "
             f"held-out problems (4-option accuracy {base['eval_gain_accuracy']:.3f}); text_a NLL "
             f"{base['eval_text_a_loss']:.3f} ({summary['text_a']} items), text_b {base['eval_text_b_loss']:.3f} "
             f"({summary['text_b']} items); probe accuracy {100 * base['probe_accuracy']:.1f}% over "
             f"{summary['probe']} items (chance {100 * summary['probe_chance']:.1f}%; {probe_tasks}). "
             f"LoRA's best gain (reference {reference.name}, mean over its seeds): {g_best:.3f} nats. Best of each "
             f"kind (least text_a + text_b change at 75% of it, seed {sizes.seeds[0]}): "
             + ", ".join(f"{k} {c.name}" for k, c in best.items()) + ".")
    table = ("## Forgetting at matched gain (minus LoRA; paired-by-seed bootstrap 95% interval)\n\n" + matched
             + f"\n\n## Every run (seed {sizes.seeds[0]}): end of training and at 75% of LoRA's best gain (Δ: adapter − "
             "base NLL; probe Δ: base − adapter accuracy)\n\n" + per_config + "\n\n" + notes + "\n")
    (work / "pareto.md").write_text(table)
    (work / "pareto.json").write_text(json.dumps({
        "base": base, "summary": summary, "sizes": sizes.__dict__, "reference": reference.name,
        "best": {k: c.name for k, c in best.items()}, "headline": headline, "ends": ends, "weights": weights,
        "seconds": seconds, "trajectories": {n: {str(s): t for s, t in v.items()} for n, v in trajs.items()}},
        indent=1) + "\n")
    plot_pareto(cfgs, trajs, weights, sizes.seeds[0], work / "pareto.png")
    log(f"done: {work / 'pareto.md'}")
    return table


def plot_pareto(cfgs, trajs, weights, seed0, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(FORGETTING) + [("probe", PROBE_LABEL)]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(20, 4.2))
    colours = {"lora": "black", "replay": "tab:green", "random P": "tab:blue", "activations P": "tab:red"}
    styles = ["-", "--", ":", "-."]
    seen: Dict[str, int] = {}
    for c in cfgs:
        style = styles[seen.setdefault(c.kind, 0) % len(styles)]
        seen[c.kind] += 1
        seeds = trajs[c.name]
        n = min(len(t) for t in seeds.values())
        label = f"{c.name}" + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")
        for ax, (metric, title) in zip(axes, panels):
            over = [seeds[seed0]] if metric == "probe" else list(seeds.values())  # the probe: first seeds only
            points = [i for i in range(n) if all(t[i][metric] is not None for t in over)]
            g = [statistics.mean(t[i]["gain"] for t in over) for i in points]
            f = [statistics.mean(t[i][metric] for t in over) for i in points]
            ax.plot(g, f, style, marker="o", ms=3, color=colours[c.kind], label=label)
            ax.set_xlabel("gain: held-out answer NLL drop (nats)")
            ax.set_title(title + (" (base → end)" if metric == "probe" else ""), fontsize=9)
        w = weights[f"{c.name}_s{seed0}"]
        axes[-1].scatter([w["delta_w_fro"]], [w["F"]], color=colours[c.kind], marker="o")
        axes[-1].annotate(c.name, (w["delta_w_fro"], w["F"]), fontsize=6)
    axes[-1].set_xlabel("‖ΔW‖_F (end of training, seed 0)")
    axes[-1].set_ylabel("F = mean ‖ΔW·x‖/‖x‖ (text_b)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
