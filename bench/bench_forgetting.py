"""Does CLoRA forget less than LoRA? A reproduction on a tiny model in minutes (--quick, CPU) and on a real pretrained
LLaMA, SmolLM2-135M-Instruct, offline (--real: the Pareto benchmark, about 2 hours on 2 CPU cores).

    python bench/bench_forgetting.py --quick                  # 2-core CPU, ~15 minutes: table, verdicts, plot in --out
    python bench/bench_forgetting.py --real --assets_dir assets/ --out out/pareto   # after prepare_assets smollm2 bbh
    python bench/bench_forgetting.py --smoke --assets_dir assets/ --out out/pareto_smoke  # the same at toy sizes

quick: a small LLaMA (hidden 64, 4 layers) is pretrained from scratch (full fine-tuning, in this script) on domain A
(which of 80 words are fruits, asked as boolq and winogrande ask: 160 questions) until it answers A; it also meets B's
40 words, in A's true/false question ("is red a fruit?" false), so it knows them as words (their embeddings are
trained) but not B's fact. Without that, B's words keep random embeddings no adapter touches, and no adapter learned B
(LoRA at lr 1e-2 and 3e-3 over 120 steps, 1e-3 over 80, 1e-2 over 400). Then adapters are fine-tuned on domain B
(which of 40 words are colours, same two formats: 80 questions) by launch/train.py with the same steps and lr: LoRA
(λ = 0) and CLoRA over a k-sweep (λ = 1, and a larger λ at the largest k). Every number comes from
launch/evaluate.py: B accuracy (gain over the base), A accuracy (its drop from the base is the forgetting), and the
weight metrics (‖ΔW‖_F, F on A's inputs, subspace leakage). Several seeds (adapter init and data order): mean ± the
half-width of the 95% t-interval over seeds (t_{0.975, n-1}·s/√n). Each CLoRA run is compared with LoRA in words
("CLoRA forgets less / more", "no difference within the interval"): a difference is called only when the two
intervals do not overlap. Finished seeds and adapters in --out are reused; --fresh retrains everything.

real: the learning-vs-forgetting Pareto benchmark on SmolLM2-135M-Instruct (bench/pareto.py): a new domain from
BIG-bench (three-digit addition 'plus one'), every run a trajectory of (gain, forgetting) points, forgetting at
matched gain with a paired bootstrap interval; --smoke runs it at toy sizes in minutes (CI).
"""
import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # pareto.py, --real's benchmark

from clora_ds.tiny import ANIMALS, COLOURS, FRUITS, TOOLS, fact_record  # noqa: E402

# The quick study's world, larger than the demo's (clora_ds.tiny's 10 words a class) so that the evaluation has
# hundreds of items: A asks which of 80 words are fruits (160 questions), B which of 40 are colours (80 questions).
# No word is in two classes ("orange", "lime", "peach" and "olive" are fruits or colours, never both here).
A_MEMBERS = FRUITS + ["banana", "kiwi", "lime", "fig", "papaya", "guava", "apricot", "coconut", "quince", "date",
                      "berry", "pineapple", "nectarine", "raisin", "tangerine", "avocado", "durian", "lychee",
                      "persimmon", "pomegranate", "currant", "damson", "mulberry", "kumquat", "loquat", "plantain",
                      "gooseberry", "cranberry", "blueberry", "grapefruit"]
A_OTHERS = ANIMALS + ["lion", "bear", "wolf", "rabbit", "donkey", "monkey", "shark", "frog", "owl", "deer", "moose",
                      "badger", "beaver", "turtle", "parrot", "llama", "koala", "panda", "hippo", "rhino", "ferret",
                      "hyena", "jackal", "lizard", "falcon", "pigeon", "salmon", "walrus", "bison", "gorilla"]
B_MEMBERS = COLOURS + ["grey", "violet", "indigo", "cyan", "magenta", "beige", "maroon", "navy", "teal", "crimson"]
B_OTHERS = TOOLS + ["axe", "spanner", "trowel", "hoe", "mallet", "clamp", "scissors", "screwdriver", "crowbar", "sander"]
FORMATS = ("bool", "option")


def a_record(word: str, kind: str) -> dict:
    """Domain A: is ``word`` a fruit (fruits vs animals), asked as boolq or winogrande ask (clora_ds.tiny.fact_record)."""
    return fact_record(word, kind, A_MEMBERS, "fruit", "animal")


def b_record(word: str, kind: str) -> dict:
    """Domain B: is ``word`` a colour (colours vs tools), in the two formats of domain A."""
    return fact_record(word, kind, B_MEMBERS, "colour", "tool")


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(cmd, log: Path, env=None):
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-4000:]}")


# ---------------------------------------------------------------------------------------------------
# quick: a tiny LLaMA pretrained on A, adapters fine-tuned on B
# ---------------------------------------------------------------------------------------------------
def pretrain_base(work: Path, a_train, steps: int, seed: int = 0, reuse: bool = True) -> Path:
    """A small LLaMA trained from scratch (all weights) on domain A: the 'pretrained model' whose knowledge the
    adapters may erase. Saved as an HF model directory with its tokenizer."""
    import torch

    from clora_ds.batches import pad_batch
    from clora_ds.data import alpaca_prompt, tokenize_example
    from clora_ds.tiny import build_tiny_llama, train_tokenizer

    out = work / "base"
    if reuse and (out / "config.json").is_file():
        return out
    texts = [f"{r['instruction']} {r['output']}" for r in a_train + [b_record(w, k) for w in B_MEMBERS + B_OTHERS
                                                                      for k in FORMATS]]
    tok = train_tokenizer(texts, out, vocab_size=400)
    torch.manual_seed(seed)
    model = build_tiny_llama(len(tok), seed, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
    examples = [tokenize_example(tok, alpaca_prompt(r), r["output"], 256) for r in a_train]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        loss = model(**pad_batch(rng.sample(examples, 16), 0)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    print(f"pretrained the base on domain A: {steps} steps, last loss {loss.item():.4f}", file=sys.stderr, flush=True)
    return out


def train_adapter(base: Path, train_file: Path, out: Path, k: int, lam: float, seed: int, steps: int, lr: float,
                  batch: int = 16, reuse: bool = True):
    cmd = [sys.executable, ROOT / "launch" / "train.py", "--deepspeed", ROOT / "ds_configs" / "zero2.json",
           "--model_name_or_path", base, "--train_file", train_file, "--output_dir", out, "--overwrite_output_dir",
           "--max_steps", steps, "--per_device_train_batch_size", batch, "--learning_rate", lr, "--lora_r", 8,
           "--lora_alpha", 16, "--lora_dropout", 0, "--target_modules", "q_proj,k_proj,v_proj,up_proj,down_proj",
           "--clora_k", k, "--clora_lambda", lam, "--seed", seed, "--save_steps", 0, "--logging_steps", 25,
           "--max_seq_length", 256]
    if reuse and (out / "adapter" / "adapter_config.json").is_file():  # trained by an earlier, interrupted run
        return out / "adapter"
    out.parent.mkdir(parents=True, exist_ok=True)
    run(cmd, out.parent / f"{out.name}.train.log")
    return out / "adapter"


def quick(args):
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    a_all = [a_record(w, k) for w in A_MEMBERS + A_OTHERS for k in FORMATS]
    b_all = [b_record(w, k) for w in B_MEMBERS + B_OTHERS for k in FORMATS]
    a_test, b_test = write_jsonl(work / "A.jsonl", a_all), write_jsonl(work / "B.jsonl", b_all)
    b_train = write_jsonl(work / "B_train.jsonl", b_all * 8)
    # the base also meets B's words, in A's true/false question ("is red a fruit?" false): it knows the words, as a
    # pretrained model would, and nothing of B's fact (which of them are colours)
    known = [a_record(w, "bool") for w in B_MEMBERS + B_OTHERS]
    base = pretrain_base(work, a_all + known, args.pretrain_steps, reuse=not args.fresh)
    variants = [("lora", max(args.k), 0.0)] + [(f"k{k}", k, 1.0) for k in args.k] + \
               [(f"k{max(args.k)}_lam{args.big_lambda:g}", max(args.k), args.big_lambda)]
    results = {}
    for seed in args.seeds:
        eval_dir = work / f"s{seed}" / "eval"
        if (eval_dir / "eval_results.json").is_file() and not args.fresh:  # this seed is done: reuse it
            results[seed] = json.loads((eval_dir / "eval_results.json").read_text())["models"]
            continue
        adapters = []
        for name, k, lam in variants:
            started = time.time()
            adapters.append((name, train_adapter(base, b_train, work / f"s{seed}" / name, k, lam, seed, args.steps, args.lr,
                                                 reuse=not args.fresh)))
            print(f"seed {seed} {name}: trained in {time.time() - started:.0f} s", file=sys.stderr, flush=True)
        cmd = [sys.executable, ROOT / "launch" / "evaluate.py", "--base_model", base, "--task_file", f"A={a_test}",
               "--task_file", f"B={b_test}", "--f_file", a_test, "--output_dir", eval_dir, "--overwrite",
               "--max_new_tokens", 12]
        for name, path in adapters:
            cmd += ["--adapter", f"{name}={path}"]
        run(cmd, work / f"s{seed}" / "eval.log")
        results[seed] = json.loads((eval_dir / "eval_results.json").read_text())["models"]
    return summarize(results, [n for n, _, _ in variants], {n: (k, lam) for n, k, lam in variants}, work, "B",
                     [("forgetting on A (base − adapter, %)", accuracy_drop("A"), True)])


# 97.5% quantiles of Student's t for 1-30 degrees of freedom (two-sided 95% interval); beyond, the Cornish-Fisher
# expansion around the normal quantile is within 1e-3 of the exact value
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


class Interval(NamedTuple):
    """A mean over seeds and the half-width of its 95% t-interval (mean ± t_{0.975, n-1}·s/√n); one seed gives an
    infinite half-width (no interval), no value gives (None, None)."""

    mean: Optional[float]
    half: Optional[float]

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def t_interval(values: Sequence[Optional[float]]) -> Interval:
    """The 95% t-interval of the mean of ``values`` (one per seed; None entries are skipped)."""
    values = [v for v in values if v is not None]
    if not values:
        return Interval(None, None)
    if len(values) == 1:
        return Interval(values[0], math.inf)
    return Interval(statistics.mean(values), t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def separation(a: Interval, b: Interval) -> int:
    """-1 when a's interval lies wholly below b's, +1 when wholly above, 0 when they overlap (or one is missing)."""
    if a.mean is None or b.mean is None:
        return 0
    return -1 if a.high < b.low else 1 if a.low > b.high else 0


NO_DIFFERENCE = "no difference within the interval"


def forgetting_verdict(clora: Interval, lora: Interval) -> str:
    """Words for CLoRA's forgetting against LoRA's: a difference is called only when the 95% intervals separate."""
    return {-1: "CLoRA forgets less", 1: "CLoRA forgets more", 0: NO_DIFFERENCE}[separation(clora, lora)]


def gain_verdict(clora: Interval, lora: Interval, task: str) -> str:
    return {-1: f"CLoRA learns {task} less", 1: f"CLoRA learns {task} more", 0: NO_DIFFERENCE}[separation(clora, lora)]


# ---------------------------------------------------------------------------------------------------
# forgetting at matched gain (the Pareto comparison): each run a trajectory of (gain, forgetting) points
# ---------------------------------------------------------------------------------------------------
def forgetting_at_gain(trajectory: Sequence[Tuple[float, float]], gain: float) -> Optional[float]:
    """Forgetting where a run first reaches ``gain``, linear between the evaluated points on either side;
    ``trajectory`` is [(gain, forgetting), ...] in training order, starting with the base (0, 0). None when the run
    never reaches that gain (no extrapolation)."""
    for (g0, f0), (g1, f1) in zip(trajectory, trajectory[1:]):
        if g0 <= gain <= g1 and g1 > g0:
            return f0 + (f1 - f0) * (gain - g0) / (g1 - g0)
        if g0 == gain:
            return f0
    if trajectory and trajectory[-1][0] == gain:
        return trajectory[-1][1]
    return None


class MatchedGain(NamedTuple):
    """CLoRA minus LoRA forgetting at one matched gain: the mean over paired seeds and its paired-bootstrap 95%
    interval (None where a run of the pair never reached the gain)."""

    fraction: float
    gain: float
    difference: Optional[float]
    low: Optional[float]
    high: Optional[float]
    pairs: int


def paired_bootstrap(diffs: Sequence[float], rng: random.Random, resamples: int = 10000) -> Tuple[float, float, float]:
    """(mean, 2.5%, 97.5%) of the mean of ``diffs`` (one per seed pair), resampled with replacement."""
    means = sorted(statistics.mean(rng.choice(diffs) for _ in diffs) for _ in range(resamples))
    return statistics.mean(diffs), means[int(0.025 * (resamples - 1))], means[int(0.975 * (resamples - 1))]


def matched_gain_differences(clora: Dict[int, list], lora: Dict[int, list], fractions=(0.5, 0.75, 0.9),
                             resamples: int = 10000, seed: int = 0) -> List[MatchedGain]:
    """Forgetting of CLoRA minus LoRA at ``fractions`` of LoRA's best gain (the mean over LoRA's seeds of each
    seed's highest gain), interpolated on each trajectory ({seed: [(gain, forgetting), ...]}). Runs are paired by
    seed (same data order and initialisation); the interval is the 2.5-97.5% percentile of the mean difference over
    seeds resampled with replacement (a paired bootstrap). A pair where either run never reaches the gain is left
    out; with no pair left the difference is None."""
    best = statistics.mean(max(g for g, _ in traj) for traj in lora.values())
    rng = random.Random(seed)
    out = []
    for fraction in fractions:
        gain = fraction * best
        diffs = []
        for s in sorted(set(clora) & set(lora)):
            c, l = forgetting_at_gain(clora[s], gain), forgetting_at_gain(lora[s], gain)
            if c is not None and l is not None:
                diffs.append(c - l)
        if not diffs:
            out.append(MatchedGain(fraction, gain, None, None, None, 0))
            continue
        out.append(MatchedGain(fraction, gain, *paired_bootstrap(diffs, rng, resamples), len(diffs)))
    return out


def matched_gain_verdict(m: MatchedGain) -> str:
    """Words for one matched-gain difference: called only when the bootstrap interval excludes 0."""
    if m.difference is None:
        return f"not reached at {100 * m.fraction:.0f}% of LoRA's best gain"
    if m.pairs < 2:
        return "one pair: no interval"
    return "CLoRA forgets less" if m.high < 0 else "CLoRA forgets more" if m.low > 0 else NO_DIFFERENCE


def accuracy_drop(task):
    """Forgetting as the base's accuracy on ``task`` minus the adapter's."""
    return lambda res, name: res["base"]["tasks"][task]["accuracy"] - res[name]["tasks"][task]["accuracy"]


def fmt(iv: Interval, pct: bool = True) -> str:
    if iv.mean is None:
        return "-"
    return f"{100 * iv.mean:.1f} ± {100 * iv.half:.1f}" if pct else f"{iv.mean:.3g} ± {iv.half:.2g}"


def summarize(results, names, settings, work, gain_task, keeps):
    """The table (mean ± 95% t-interval over seeds), the verdicts in words and the plot;
    ``keeps`` = [(label, fn(result, name) -> forgetting, in %?)]; the first of ``names`` is plain LoRA."""
    def over_seeds(fn):
        return t_interval([fn(res) for res in results.values()])

    rows = {}
    for name in names:
        rows[name] = {
            "gain": over_seeds(lambda r: r[name]["tasks"][gain_task]["accuracy"] - r["base"]["tasks"][gain_task]["accuracy"]),
            "forgetting": [over_seeds(lambda r: fn(r, name)) for _, fn, _ in keeps],
            "delta_w_fro": over_seeds(lambda r: r[name]["weights"]["delta_w_fro"]),
            "F": over_seeds(lambda r: r[name]["weights"]["F"]),
            "leakage_in": over_seeds(lambda r: r[name]["weights"]["leakage_in"]),
        }
    lines = [f"| run | k | λ | gain on {gain_task} (adapter − base) | " + " | ".join(label for label, _, _ in keeps)
             + " | ‖ΔW‖_F | F | leakage_in |", "|---|---:|---:|---:|" + "---:|" * len(keeps) + "---:|---:|---:|"]
    for name in names:
        k, lam = settings[name]
        r = rows[name]
        lines.append(f"| {name} | {'-' if lam == 0 else k} | {lam:g} | {fmt(r['gain'])} | "
                     + " | ".join(fmt(f, pct) for f, (_, _, pct) in zip(r["forgetting"], keeps))
                     + f" | {fmt(r['delta_w_fro'], False)} | {fmt(r['F'], False)} | {fmt(r['leakage_in'], False)} |")
    lora = names[0]
    verdicts = []
    for name in names[1:]:
        said = [f"{label.split(' (')[0]}: {forgetting_verdict(r, l)} ({fmt(r, pct)} vs LoRA {fmt(l, pct)})"
                for (label, _, pct), r, l in zip(keeps, rows[name]["forgetting"], rows[lora]["forgetting"])]
        said.append(f"gain on {gain_task}: {gain_verdict(rows[name]['gain'], rows[lora]['gain'], gain_task)} "
                    f"({fmt(rows[name]['gain'])} vs LoRA {fmt(rows[lora]['gain'])})")
        verdicts.append(f"- {name} vs {lora}: " + "; ".join(said))
    per_seed = {name: {seed: {"gain": res[name]["tasks"][gain_task]["accuracy"] - res["base"]["tasks"][gain_task]["accuracy"],
                              "forgetting": [fn(res, name) for _, fn, _ in keeps]} for seed, res in results.items()}
                for name in names}
    (work / "forgetting.json").write_text(json.dumps({"per_seed": per_seed, "verdicts": verdicts}, indent=1) + "\n")
    base = list(results.values())[0]["base"]
    notes = [f"{t} accuracy {100 * v['accuracy']:.1f}%" for t, v in base["tasks"].items()]
    notes += [f"{t} NLL {v['nll']:.3f}" for t, v in (base.get("loss") or {}).items()]
    items = {t: v["n"] for t, v in base["tasks"].items()}
    table = ("\n".join(lines) + f"\n\nmean ± half-width of the 95% t-interval over {len(results)} seed(s) "
             f"({', '.join(map(str, results))}); items per seed: {', '.join(f'{t} {n}' for t, n in items.items())}; "
             f"base model: {', '.join(notes)}\n\nverdict (a difference is called only when the 95% intervals separate):\n"
             + "\n".join(verdicts) + "\n")
    (work / "forgetting.md").write_text(table)
    plot(rows, names, settings, work / "forgetting_vs_k.png", gain_task, keeps[0][0])
    return table


def plot(rows, names, settings, out_png, gain_task, keep_label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finite(half):  # one seed has no interval: no error bar
        return half if math.isfinite(half) else 0.0

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    value = {"gain": lambda r: r["gain"], "forgetting": lambda r: r["forgetting"][0], "F": lambda r: r["F"]}
    for ax, key, title in zip(axes, ("gain", "forgetting", "F"), (f"gain on {gain_task}", keep_label, "F = mean ‖ΔW·x‖/‖x‖")):
        sweep = sorted((settings[n][0], value[key](rows[n])) for n in names
                       if settings[n][1] == 1.0 and value[key](rows[n])[0] is not None)
        if sweep:
            ax.errorbar([k for k, _ in sweep], [m for _, (m, _) in sweep], yerr=[finite(s) for _, (_, s) in sweep], fmt="o-",
                        label="CLoRA λ=1", capsize=3)
            ax.set_xscale("log", base=2)
        for n in names:
            k, lam = settings[n]
            m, s = value[key](rows[n])
            if m is None:
                continue
            if lam == 0:
                ax.axhline(m, ls="--", color="gray", label="LoRA")
            elif lam != 1.0:
                ax.errorbar([k], [m], yerr=[finite(s)], fmt="s", capsize=3, label=f"CLoRA λ={lam:g}")
        ax.set_title(title)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="the tiny model (CPU, minutes)")
    mode.add_argument("--real", action="store_true", help="the Pareto benchmark on SmolLM2-135M-Instruct (~2 h on 2 "
                      "CPU cores; bench/pareto.py)")
    mode.add_argument("--smoke", action="store_true", help="--real at toy sizes (2 runs of 4 steps; minutes; CI)")
    ap.add_argument("--out", default="out/forgetting", help="working directory: runs, evaluations, table, plot")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="adapter seeds (init and data order); the intervals are over them (quick: 0-4; real: 0 1 2, "
                    "the first for every configuration, all of them for the reference LoRA and the best CLoRA of each "
                    "kind)")
    ap.add_argument("--k", type=int, nargs="+", default=None, help="quick: CLoRA k values (default 4 16)")
    ap.add_argument("--big_lambda", type=float, default=10.0, help="quick: the extra CLoRA run's λ at the largest k")
    ap.add_argument("--steps", type=int, default=None, help="quick: fine-tuning steps (default 120)")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning lr (quick: 1e-2; real: 3e-4, the reference "
                    "LoRA's, with LoRA also at lr/3 and 3·lr)")
    ap.add_argument("--pretrain_steps", type=int, default=500, help="quick: full-training steps of the base on A")
    ap.add_argument("--assets_dir", default="assets", help="real: where prepare_assets.py put smollm2 and bbh")
    ap.add_argument("--report_only", action="store_true", help="real/smoke: train nothing; the tables and plot of the "
                    "runs that have finished (a configuration whose first seed has not is left out, and so is an "
                    "unfinished seed)")
    ap.add_argument("--fresh", action="store_true", help="retrain the base (quick) and every adapter and "
                    "re-evaluate (default: reuse what --out holds, so an interrupted run continues)")
    args = ap.parse_args()
    args.k = args.k or [4, 16]
    args.steps = args.steps or 120
    args.lr = args.lr or (1e-2 if args.quick else 3e-4)
    args.seeds = args.seeds or ([0, 1, 2, 3, 4] if args.quick else [0] if args.smoke else [0, 1, 2])
    mode = "quick" if args.quick else "real" if args.real else "smoke"
    started = time.time()
    if args.quick:
        settings = {"mode": mode, "steps": args.steps, "lr": args.lr, "k": args.k, "big_lambda": args.big_lambda,
                    "pretrain_steps": args.pretrain_steps,
                    "words": {"A": len(A_MEMBERS + A_OTHERS), "B": len(B_MEMBERS + B_OTHERS)}}  # an older, smaller world
    else:
        import pareto

        settings = {"mode": mode, "lr": args.lr, "seeds": args.seeds, "version": pareto.VERSION}
    stamp = Path(args.out) / "settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != settings and not args.fresh:
        sys.exit(f"error: {args.out} holds runs made with other settings ({stamp.read_text().strip()}); pass --fresh "
                 "or another --out")
    if args.fresh and Path(args.out).is_dir():
        import shutil

        shutil.rmtree(args.out)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings) + "\n")
    if args.quick:
        table = quick(args)
        print(f"# bench_forgetting --quick: steps {args.steps}, lr {args.lr:g}, k {args.k}, seeds {args.seeds}; "
              f"{time.time() - started:.0f} s in all\n")
        print(table)
        print(f"table: {Path(args.out) / 'forgetting.md'}; plot: {Path(args.out) / 'forgetting_vs_k.png'}")
        return
    table = pareto.pareto(args, run, sys.modules[__name__])
    print(f"# bench_forgetting --{mode}: lr {args.lr:g}, seeds {args.seeds}; {time.time() - started:.0f} s in all\n")
    print(table)
    print(f"table: {Path(args.out) / 'pareto.md'}; plot: {Path(args.out) / 'pareto.png'}; every number: "
          f"{Path(args.out) / 'pareto.json'}")


if __name__ == "__main__":
    main()
