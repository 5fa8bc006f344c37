"""Mixtures of training sources (--train_file a,b --train_weights) and several named eval sets (--eval_file SET=SOURCE):
the batch stream follows the weights, resume is exact and refuses a changed mixture, each eval set is logged under its
own keys and can pick the best checkpoint. Library tests on synthetic examples; launcher runs on the tiny LLaMA."""
import csv
import json
import math
import shutil
import subprocess
from collections import Counter

import pytest

from conftest import DATA, child_env, deepspeed_cmd, tree_hash
from test_run_safety import assert_one_error
from test_train import COMMONSENSE, TRAIN, evaluations, launch, losses, train_args

ALPACA = DATA / "alpaca_tiny.jsonl"
GENERAL = DATA / "general_tiny.txt"  # plain text (format text): 12 documents


def synthetic_source(tag: int, n: int) -> list:
    """n examples whose first token is ``tag`` (so a batch tells its sources apart), lengths 4..9."""
    return [{"input_ids": [tag] + [7] * (3 + i % 6), "labels": [-100] + [tag] + [7] * (2 + i % 6)} for i in range(n)]


def source_counts(batches, steps, ranks) -> Counter:
    """Examples per source tag in the micro-batches every rank gets over ``steps`` (packed rows: each example's tag)."""
    counts = Counter()
    for step in steps:
        for rank in range(ranks):
            for batch in batches.micro_batches(step, rank):
                ids, starts = batch["input_ids"], (batch["position_ids"] == 0) if "position_ids" in batch else None
                if starts is None:
                    counts.update(ids[:, 0].tolist())
                else:
                    counts.update(ids[starts].tolist())
    return counts


@pytest.mark.parametrize("pack_len", [None, 24])
def test_mixture_stream_follows_the_weights(pack_len):
    """Over 120 steps (parts of several epochs), each source's share of the examples the ranks train on is its weight
    within a binomial 4-sigma bound, although the sources' sizes are far from the weights (40, 300, 25 examples: in
    proportion to size source 2 would be 82%, not 30%). Steps are a pure function of (seed, step)."""
    from clora_ds.batches import GlobalBatches, Mixture

    sources = [synthetic_source(1, 40), synthetic_source(2, 300), synthetic_source(3, 25)]
    weights = {1: 0.6, 2: 0.3, 3: 0.1}
    mixture = Mixture(sources, list(weights.values()), seed=5, pack_len=pack_len)
    assert mixture.counts == [219, 110, 36] and sum(mixture.counts) == 365  # round(w·N), N = 365, largest remainder
    packed = pack_len is not None
    batches = GlobalBatches(mixture, 2, 2, 2 if not packed else 1, 5, packed, 0)
    steps = range(120)
    assert batches.locate(119)[0] >= 2, "the window spans several epochs"
    counts = source_counts(batches, steps, ranks=2)
    total = sum(counts.values())
    for tag, w in weights.items():
        assert abs(counts[tag] - total * w) <= 4 * math.sqrt(total * w * (1 - w)), (tag, counts, total)

    # each epoch: every example of an upsampled source ⌊n/size⌋ or ⌈n/size⌉ times, a downsampled one at most once
    draw = Counter(mixture.draw(1))
    assert {draw[(0, j)] for j in range(40)} == {5, 6} and sum(draw[(0, j)] for j in range(40)) == 219
    assert max(draw[(1, j)] for j in range(300)) == 1 and sum(draw[(1, j)] for j in range(300)) == 110
    assert mixture.draw(1) == Mixture(sources, [6, 3, 1], seed=5, pack_len=pack_len).draw(1)  # weights are relative
    assert mixture.draw(1) != mixture.draw(2) and mixture.draw(1) != Mixture(sources, [6, 3, 1], seed=6).draw(1)
    # a fresh instance (a resumed run) gives step 97 the same units, without having stepped through the ones before
    fresh = GlobalBatches(Mixture(sources, [0.6, 0.3, 0.1], seed=5, pack_len=pack_len), 2, 2, 2 if not packed else 1, 5,
                          packed, 0)
    assert fresh.step_units(97) == batches.step_units(97)
    assert fresh.label_tokens(97) == batches.label_tokens(97)
    if packed:
        assert all(sum(len(ex["input_ids"]) for ex in row) <= pack_len for row in batches.step_units(97))


def test_mixture_and_eval_set_arguments_are_checked(tmp_path):
    from clora_ds.arguments import DataSource, argument_problems, eval_sources, parse_train_arguments, train_sources

    def problems(**over):
        groups = parse_train_arguments(train_args("model", tmp_path / "out", **over))
        return argument_problems(*groups)

    two = f"{ALPACA},{GENERAL}"
    assert problems(train_file=two, train_weights="0.7,0.3") == []
    assert any("gives 1 weights for 2 --train_file sources" in p for p in problems(train_file=two, train_weights="1"))
    assert any("weight 2 is 0; each must be a finite number > 0" in p for p in problems(train_file=two, train_weights="1,0"))
    assert any("'x' is not a number" in p for p in problems(train_file=two, train_weights="1,x"))
    assert any("--train_file has one" in p for p in problems(train_weights="1"))
    assert any("an empty source" in p for p in problems(train_file=f"{ALPACA},"))
    assert any("several eval sets are named each" in p for p in problems(eval_file=two))
    assert any("names task more than once" in p for p in problems(eval_file=f"task={ALPACA},task={GENERAL}"))
    assert any("--save_best_metric 'loss'" in p for p in problems(eval_file=str(ALPACA), save_best_metric="loss",
                                                                   eval_steps=1, save_steps=1))
    assert problems(eval_file=f"task={ALPACA}", save_best_metric="eval_task_accuracy", eval_steps=1, save_steps=1) == []

    class Data:  # only the two fields the parsers read
        train_file, eval_file = "org/data,local@v2.jsonl,org/other@validation", "task=org/tasks,general=g.txt"

    assert train_sources(Data) == [DataSource("org/data", "train"), DataSource("local@v2.jsonl"),
                                   DataSource("org/other", "validation")]
    assert eval_sources(Data) == [DataSource("org/tasks", "test", "task"), DataSource("g.txt", None, "general")]
    Data.eval_file = str(ALPACA)
    assert eval_sources(Data) == [DataSource(str(ALPACA))]


def test_plan_reads_each_source_in_its_format_and_names_what_a_resume_would_change(tiny_model_dir, tmp_path):
    """plan_run (nothing trained): one note per source and eval set; a --save_best_metric the eval sets cannot produce
    is refused naming those they do; the run's identity changes, by name, with a weight or one source's content."""
    from clora_ds.arguments import parse_train_arguments
    from clora_ds.errors import RunProblems
    from clora_ds.plan import plan_run
    from clora_ds.resume import identity_differences

    def plan(**over):
        args = train_args(tiny_model_dir, tmp_path / "out", **{"cache_dir": tmp_path / "cache", "per_device_train_batch_size": 2,
                                                               "train_file": f"{ALPACA},{GENERAL}", **over})
        return plan_run(*parse_train_arguments(args), world=1)

    evals = dict(eval_file=f"task={COMMONSENSE},general={GENERAL}", eval_steps=2, save_steps=2)
    base = plan(train_weights="0.7,0.3", **evals)
    assert [t.dataset_format for t in base.train_sets] == ["alpaca", "text"]
    assert [(ev.name, ev.metrics) for ev in base.eval_sets] == [
        ("task", ["eval_task_loss", "eval_task_accuracy"]), ("general", ["eval_general_loss"])]
    assert any(n.startswith(f"mixture, each epoch: 76 examples from {ALPACA} (weight 0.7") for n in base.notes), base.notes
    with pytest.raises(RunProblems) as refused:
        plan(save_best_metric="eval_general_accuracy", **evals)
    assert ("--save_best_metric eval_general_accuracy: the eval sets of --eval_file log eval_task_loss, "
            "eval_task_accuracy, eval_general_loss") in str(refused.value)
    with pytest.raises(RunProblems, match="--save_best_metric eval_loss: the eval sets"):
        plan(save_best_metric="eval_loss", **evals)

    reweighted = plan(train_weights="0.6,0.4")
    assert identity_differences(base.identity, reweighted.identity) == [
        "--train_weights: 0.7,0.3 in the checkpoint, 0.6,0.4 now"]
    changed = tmp_path / "general.txt"
    changed.write_text(GENERAL.read_text().replace("The river runs", "The river ran"))
    other = plan(train_weights="0.7,0.3", train_file=f"{ALPACA},{changed}")
    assert [d.split(" (")[0] for d in identity_differences(base.identity, other.identity)] == [
        "--train_file source 2: its tokenized data differ"]


def start_two_ranks(model_dir, out, log, port_offset, **over):
    """`deepspeed` with two CPU ranks in the background, output to ``log`` (a full pipe would block it); runs at the
    same time need their own ports."""
    cmd = deepspeed_cmd(2)
    port = cmd.index("--master_port") + 1
    cmd[port] = str(int(cmd[port]) + 2000 + port_offset)
    cmd += [TRAIN] + train_args(model_dir, out, per_device_train_batch_size=2, **over)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env())


MIXTURE = dict(train_file=f"{ALPACA},{GENERAL}", train_weights="0.5,0.5", packing="true", max_steps=12, save_steps=6)


@pytest.mark.slow
def test_mixture_resume_is_exact_and_a_changed_mixture_is_refused(tiny_model_dir, tmp_path):
    """Two ranks, a packed 50/50 mixture of alpaca and plain text (54 examples of each per epoch: the text cycled 4.5
    times, alpaca downsampled), 12 steps over more than one epoch (epoch 0 packs into 10 steps). Resumed from the
    checkpoint at step 6, a new process trains steps 7-12, across the epoch boundary, with the uninterrupted run's
    losses. Resuming with another weight or another source is one error naming it, and the run's files stay as they
    were."""
    ref = tmp_path / "ref"
    proc = launch(tiny_model_dir, ref, **MIXTURE)
    assert (f"mixture, each epoch: 54 examples from {ALPACA} (weight 0.5, 0.56 of its 96); 54 examples from {GENERAL} "
            "(weight 0.5, 4.50 of its 12)") in proc.stdout
    assert f"train data {GENERAL}: 12 records, format text" in proc.stdout
    epochs = {r["step"]: r["epoch"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    assert epochs[10] == 1 and epochs[12] > 1, epochs

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(ref / "checkpoint-6", out / "checkpoint-6")
    shutil.copy(ref / "train_config.json", out)
    changed = tmp_path / "general_changed.txt"
    changed.write_text(GENERAL.read_text().replace("The river runs", "The river ran"))
    before = tree_hash(ref)
    refusals = {"weight": ({"train_weights": "0.6,0.4"}, "--train_weights: 0.5,0.5 in the checkpoint, 0.6,0.4 now"),
                "source": ({"train_file": f"{ALPACA},{changed}"}, "--train_file source 2: its tokenized data differ")}
    procs = {"resume": start_two_ranks(tiny_model_dir, out, tmp_path / "resume.log", 0, **MIXTURE,
                                       resume_from_checkpoint="auto")}
    for i, (name, (over, _)) in enumerate(refusals.items(), 1):  # at once: the launcher's start-up is most of the time
        procs[name] = start_two_ranks(tiny_model_dir, ref, tmp_path / f"{name}.log", i,
                                      **{**MIXTURE, "resume_from_checkpoint": "auto", **over})
    codes = {name: p.wait(timeout=600) for name, p in procs.items()}
    text = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
    assert codes["resume"] == 0, text["resume"][-3000:]
    assert f"resumed from {out / 'checkpoint-6'} at step 6" in text["resume"]
    got, want = losses(out), losses(ref)
    assert len(got) == 6 and len(want) == 12
    assert max(abs(a - b) for a, b in zip(got, want[6:])) <= 1e-6, (got, want)
    for name, (_, needle) in refusals.items():
        assert_one_error((codes[name], text[name]), "cannot resume", needle)
    assert tree_hash(ref) == before


@pytest.mark.slow
def test_named_eval_sets_are_logged_apart_and_pick_the_best_checkpoint(tiny_model_dir, tmp_path):
    """--eval_file commonsense=...,alpaca=... every 2 steps: each set's own keys in metrics.jsonl, the log and the CSV
    monitor. Training answers every alpaca question "yes": alpaca's short real answers get likelier (end token), the
    commonsense set's long answers less likely, so --save_best_metric eval_commonsense_loss must keep the earliest
    checkpoint (besides the newest), which neither the other set nor the newest-first rule would keep."""
    yes = tmp_path / "yes.jsonl"
    yes.write_text("".join(json.dumps({**json.loads(line), "output": "yes"}) + "\n" for line in ALPACA.read_text().splitlines()))
    out = tmp_path / "run"
    proc = launch(tiny_model_dir, out, ranks=1, max_steps=6, train_file=yes, eval_file=f"commonsense={COMMONSENSE},alpaca={ALPACA}",
                  eval_steps=2, save_steps=2, save_total_limit=2, save_best_metric="eval_commonsense_loss", report_to="csv")
    evals = evaluations(out)
    assert sorted(evals) == [2, 4, 6]
    keys = ["eval_commonsense_loss", "eval_commonsense_accuracy", "eval_alpaca_loss"]
    for step, row in evals.items():
        assert sorted(row) == sorted(keys + ["step"]), row
        assert (f"step {step}: eval commonsense loss {row['eval_commonsense_loss']:.4f}, eval commonsense accuracy "
                f"{row['eval_commonsense_accuracy']:.4f}, eval alpaca loss {row['eval_alpaca_loss']:.4f}") in proc.stdout
    commonsense = [evals[s]["eval_commonsense_loss"] for s in (2, 4, 6)]
    alpaca = [evals[s]["eval_alpaca_loss"] for s in (2, 4, 6)]
    assert commonsense == sorted(commonsense) and alpaca == sorted(alpaca, reverse=True), evals  # apart: opposite ways
    monitor = {p.stem: p for p in (out / "monitor").rglob("*.csv")}
    for key in keys:
        rows = list(csv.reader(monitor[f"Eval_{key[len('eval_'):]}"].open()))
        assert [int(r[0]) for r in rows[1:]] == [2, 4, 6] and float(rows[-1][1]) == pytest.approx(evals[6][key])
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept == [2, 6], (kept, evals)  # the best by eval_commonsense_loss, and the newest
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["metrics"]["eval_commonsense_loss"] == min(commonsense)
