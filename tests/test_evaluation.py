"""Evaluation: answer extraction by the paper's protocols, weight metrics against fp64 references, log-likelihood
multiple choice against lm-eval, and launch/evaluate.py end to end (1 and 2 processes) on a tiny model."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, run_checked

from clora_ds.errors import DataError
from clora_ds.evaluation.protocols import (Boxed, Choice, Commonsense, MetaMath, Number, candidate_answers,
                                           protocol_for)

BOOLQ = {"instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
                        "Answer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}
ARC = {"instruction": "Please choose the correct answer to the question: Which is a planet?\n\nAnswer1: Moon Answer2: "
                      "Mars Answer3: Sun Answer4: Comet\n\nAnswer format: answer1/answer2/answer3/answer4",
       "input": "", "output": "the correct answer is answer2", "answer": "answer2"}


@pytest.mark.parametrize("records, kind", [
    ([BOOLQ], "commonsense"), ([ARC], "commonsense"), ([{"instruction": "x", "output": "y", "answer": "option2"}], "commonsense"),
    ([{"instruction": "x", "output": "y", "answer": "C"}], "choice"), ([{"instruction": "x", "output": "y", "answer": "12.5"}], "number"),
    ([{"query": "2+2?", "response": "4. The answer is: 4"}], "metamath"), ([{"problem": "p", "solution": "\\boxed{4}"}], "boxed"),
])
def test_protocol_is_detected_from_the_records(records, kind):
    assert protocol_for(records, "t").name == kind


@pytest.mark.parametrize("pattern, text, extracted", [
    # LLM-Adapters: the FIRST match, case-sensitive, as a substring
    ("true|false", "the correct answer is true", "true"),
    ("true|false", "false. Well, true is also possible", "false"),
    ("true|false", "The correct answer is True", None),                   # case-sensitive: no match
    ("true|false", "it is untrue", "true"),                               # a substring counts, as in the protocol
    ("solution1|solution2", "the correct answer is solution2", "solution2"),
    ("answer1|answer2|answer3|answer4|answer5", "answer3 or answer1", "answer3"),
    ("answer1|answer2|answer3|answer4|answer5", "the answer is 3", None),
    ("ending1|ending2|ending3|ending4", "the correct answer is ending4", "ending4"),
    ("option1|option2", "the correct answer is option1 and option2", "option1"),
    ("option1|option2", "", None),
])
def test_commonsense_extraction(pattern, text, extracted):
    judged = Commonsense(pattern).judge(text, "true")
    assert judged.extracted == extracted


@pytest.mark.parametrize("text, gold, extracted, correct", [
    ("Natalia sold 48 + 24 = 72 clips. The answer is 72", "72", "72", True),
    ("He has 1,234 apples in all.", "1234", "1234", True),               # commas removed
    ("The temperature fell to -5 degrees, then 3 more", "3", "3", True),  # the LAST number
    ("It went from 3 to -7.5", "-7.5", "-7.5", True),                     # negatives and decimals
    ("about 0.3333", "0.333", "0.3333", True),                            # |pred - gold| <= 0.001
    ("about 0.335", "0.333", "0.335", False),
    ("1/2 of them", "0.5", "2", False),                                   # no fractions in this protocol
    ("no number here", "4", None, False),
])
def test_llm_adapters_number_extraction(text, gold, extracted, correct):
    judged = Number().judge(text, gold)
    assert (judged.extracted, judged.correct) == (extracted, correct)


@pytest.mark.parametrize("text, extracted", [
    ("The answer is C because", "C"),     # T, h, e ... are not A-E: the first capital A-E is the C
    ("Both B and D", "B"),
    ("none", None),
])
def test_aqua_letter_is_the_first_capital_a_to_e(text, extracted):
    assert Choice().judge(text, "C").extracted == extracted


@pytest.mark.parametrize("text, gold, extracted, correct", [
    ("So 3 + 4 = 7.\nThe answer is: 7", "7", "7", True),
    ("The answer is: 1,000", "1000", "1000", True),
    ("The answer is: -3", "-3", "-3", True),
    ("The answer is: 3/4", "1", "1", True),                               # fractions evaluated and rounded
    ("The answer is: 2.5", "2", "2", True),                               # rounded (half to even), as MetaMath
    ("I think it is 7", "7", None, False),                                # no "The answer is: "
])
def test_metamath_number_extraction(text, gold, extracted, correct):
    judged = MetaMath().judge(text, gold)
    assert (judged.extracted, judged.correct) == (extracted, correct)


@pytest.mark.parametrize("text, gold, extracted, correct", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "\\frac{1}{2}", True),
    ("first \\boxed{3} then \\boxed{4}", "4", "4", True),                 # the LAST box
    ("\\boxed{\\frac12}", "\\frac{1}{2}", "\\frac12", True),              # Hendrycks' normalisation
    ("\\boxed{0.5}", "\\frac{1}{2}", "0.5", True),
    ("The answer is: 10.\nDone", "10", "10", True),                       # MetaMath's MATH form
    ("no box", "4", None, False),
])
def test_boxed_extraction_and_equivalence(text, gold, extracted, correct):
    judged = Boxed().judge(text, gold)
    assert (judged.extracted, judged.correct) == (extracted, correct)


def test_math_gold_comes_from_the_solution_box():
    assert Boxed().gold({"problem": "p", "solution": "We get $\\boxed{\\dfrac{3}{4}}$."}) == "\\dfrac{3}{4}"
    assert MetaMath().gold({"query": "q", "response": "... The answer is: 18"}) == "18"


def test_candidate_answers_come_from_the_answer_format_line():
    protocol = protocol_for([ARC], "t")
    assert candidate_answers(ARC, protocol) == ["answer1", "answer2", "answer3", "answer4"]
    assert candidate_answers(BOOLQ, protocol_for([BOOLQ], "t")) == ["true", "false"]


def test_records_without_an_answer_or_of_unknown_layout_are_one_clear_error():
    with pytest.raises(DataError, match="record 2 has no 'answer'"):
        protocol_for([BOOLQ, {"instruction": "x", "output": "y"}], "t.json")
    with pytest.raises(DataError, match="cannot tell the task's layout"):
        protocol_for([{"text": "x"}], "t.json")
    with pytest.raises(DataError, match="cannot tell the protocol from the answers"):
        protocol_for([{"instruction": "x", "output": "y", "answer": "maybe"}], "t.json")


# ---------------------------------------------------------------------------------------------------
# weight-space metrics against references that form ΔW explicitly
# ---------------------------------------------------------------------------------------------------
def random_adapter(model_dir, out, lam_like_zero=True, seed=0, targets="q_proj,v_proj,up_proj,down_proj"):
    """A PEFT adapter of random factors (B nonzero) with its clora_config.json, written by the package's writer."""
    from transformers import AutoModelForCausalLM

    from clora_ds import CLoRAConfig, attach_clora, save_clora_adapter

    torch.manual_seed(seed)
    model = attach_clora(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                         CLoRAConfig(r=4, alpha=12, k=5, dropout=0.0, target_modules=targets, seed=seed))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    save_clora_adapter(model, out)
    return out


def test_weight_metrics_equal_explicit_fp64_references(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clora_ds import CLoRAConfig
    from clora_ds.evaluation.weights import activation_ratios, read_adapter, subspace_leakage, weight_metrics
    from clora_ds.subspace import build_module_subspaces

    adapter = read_adapter(random_adapter(tiny_model_dir, tmp_path / "a"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = ["What is 3 plus 4? 7", "Reverse the word. apple elppa", "Sort these words. stone river"]
    clora = CLoRAConfig.load(tmp_path / "a")
    got = weight_metrics(adapter, activation_ratios(base, tok, texts, {"a": adapter})["a"],
                         subspace_leakage(adapter, clora))
    modules = dict(base.named_modules())
    # reference: ΔW formed, inputs captured by hooks on the plain base model, one token at a time
    captured = {m: [] for m in adapter.factors}
    hooks = [modules[m].register_forward_hook(lambda mod, i, o, m=m: captured[m].append(i[0][0])) for m in adapter.factors]
    with torch.no_grad():
        for t in texts:
            base(input_ids=torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]]))
    for h in hooks:
        h.remove()
    fro2, spec, ratios, ap, aa, bp, bb = 0.0, 0.0, [], 0.0, 0.0, 0.0, 0.0
    for m, (a, b) in adapter.factors.items():
        dw = (12 / 4) * b @ a  # α/r · B A, [out, in]
        assert math.isclose(got["modules"][m]["delta_w_fro"], torch.linalg.matrix_norm(dw).item(), rel_tol=1e-9)
        assert math.isclose(got["modules"][m]["delta_w_spec"], torch.linalg.matrix_norm(dw, ord=2).item(), rel_tol=1e-9)
        x = torch.cat(captured[m])  # [tokens, in]
        ratio = ((x @ dw.T).norm(dim=-1) / x.norm(dim=-1)).mean().item()
        assert math.isclose(got["modules"][m]["F"], ratio, rel_tol=1e-9), m
        p_in, p_out = (p.double() for p in build_module_subspaces(m, tuple(dw.shape), clora))
        fro2 += torch.linalg.matrix_norm(dw).item() ** 2
        spec = max(spec, torch.linalg.matrix_norm(dw, ord=2).item())
        ratios.append(ratio)
        ap, aa = ap + (a @ p_in).pow(2).sum().item(), aa + a.pow(2).sum().item()
        bp, bb = bp + (b.T @ p_out).pow(2).sum().item(), bb + b.pow(2).sum().item()
    assert math.isclose(got["delta_w_fro"], math.sqrt(fro2), rel_tol=1e-9)
    assert math.isclose(got["delta_w_spec"], spec, rel_tol=1e-9)
    assert math.isclose(got["F"], sum(ratios) / len(ratios), rel_tol=1e-9)
    assert math.isclose(got["leakage_in"], math.sqrt(ap / aa), rel_tol=1e-9)
    assert math.isclose(got["leakage_out"], math.sqrt(bp / bb), rel_tol=1e-9)
    assert 0.2 < got["leakage_in"] < 0.8  # random A: about sqrt(k / in) of it lies in span(P_in)


def train_fact_adapter(model_dir, tok, records, out, lam, steps=40, seed=0):
    """A CLoRA adapter trained in this process (AdamW on the package's own regularized loss), saved by the package."""
    import random

    from clora_ds import CLoRAConfig, attach_clora, save_clora_adapter
    from clora_ds.batches import pad_batch
    from clora_ds.data import alpaca_prompt, tokenize_example
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = attach_clora(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                         CLoRAConfig(r=8, alpha=16, k=5, lam=lam, dropout=0.0, target_modules="all-linear", seed=seed)).train()
    examples = [tokenize_example(tok, alpaca_prompt(r), r["output"], 256) for r in records]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model.clora.penalty_term(model(**pad_batch(rng.sample(examples, 16), 0)).loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_clora_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def fact_world(tmp_path_factory):
    """The demo's small task (clora_ds.tiny.fact_splits): a base whose output layer can express answers, its
    tokenizer, train/test files, and adapters trained with λ = 0 and with a large λ."""
    from clora_ds.tiny import fact_splits, make_demo_assets

    root = tmp_path_factory.mktemp("facts")
    paths = make_demo_assets(root)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(paths["model"]))
    train, _ = fact_splits()
    lora = train_fact_adapter(paths["model"], tok, train, root / "lora", lam=0.0, steps=300)
    strong = train_fact_adapter(paths["model"], tok, train, root / "clora", lam=1000.0, steps=60)
    return {**paths, "tokenizer": tok, "lora": lora, "clora": strong, "root": root}


@pytest.mark.slow
def test_leakage_is_near_zero_with_a_large_lambda_and_not_without(fact_world):
    from clora_ds import CLoRAConfig
    from clora_ds.evaluation.weights import read_adapter, subspace_leakage, weight_metrics

    clora = CLoRAConfig.load(fact_world["clora"])
    results = {name: weight_metrics(read_adapter(fact_world[name]), None,
                                    subspace_leakage(read_adapter(fact_world[name]), clora))
               for name in ("lora", "clora")}
    assert results["clora"]["leakage_in"] < 0.05 and results["clora"]["leakage_out"] < 0.05, results["clora"]
    assert results["lora"]["leakage_in"] > 0.2 and results["lora"]["leakage_out"] > 0.1, results["lora"]


# ---------------------------------------------------------------------------------------------------
# lm-eval, offline, on a shipped local-file task: the same log-likelihoods as our scorer
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_eval_local_task_scores_equal_our_multiple_choice_scorer(fact_world, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clora_ds.data import read_records
    from clora_ds.evaluation.choice import choice_request, multiple_choice_accuracy
    from clora_ds.evaluation.generation import continuation_logprobs
    from clora_ds.evaluation.harness import plan_tasks, render_tasks
    from clora_ds.evaluation.protocols import protocol_for

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in read_records(str(fact_world["train"]))[:40]))
    files = {"facts": fact_world["test"], "seen": train}
    names, problems = plan_tasks(["clora_mc"], files, None)
    assert problems == [] and names == ["clora_mc_facts", "clora_mc_seen"]
    include = render_tasks(names, files, None, tmp_path / "tasks")
    tok = fact_world["tokenizer"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(fact_world["model"])), str(fact_world["lora"])).eval()
    from clora_ds.evaluation.harness import framing_tokenizer

    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=framing_tokenizer(tok), batch_size=8, add_bos_token=True), tasks=names,
                          task_manager=TaskManager(include_path=str(include)), log_samples=True, bootstrap_iters=0)
    for name, path in files.items():
        records = read_records(str(path))
        protocol = protocol_for(records, name)
        samples = sorted(out["samples"][f"clora_mc_{name}"], key=lambda s: s["doc_id"])
        assert len(samples) == len(records)
        for sample, record in zip(samples, records):
            context, continuations, gold = choice_request(record, protocol)
            ours = continuation_logprobs(model, tok, [(context, c) for c in continuations])
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            assert sample["target"] == gold and max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-4, (ours, theirs)
        acc = multiple_choice_accuracy(model, tok, records, protocol).accuracy
        assert acc == pytest.approx(out["results"][f"clora_mc_{name}"]["acc,none"], abs=1e-12)
    assert out["results"]["clora_mc_seen"]["acc,none"] > 0.6  # above chance (0.5): the adapter learned what it was taught


# ---------------------------------------------------------------------------------------------------
# launch/evaluate.py end to end: 1 process and 2 CPU ranks give the same numbers
# ---------------------------------------------------------------------------------------------------
EVALUATE = str(ROOT / "launch" / "evaluate.py")


def evaluate_cmd(ranks, *args):
    head = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(ranks), "--master_port", str(29600 + os.getpid() % 2000)]
    return head + [EVALUATE] + [str(a) for a in args]


@pytest.mark.slow
def test_evaluate_gives_the_adapter_above_its_base_and_the_same_numbers_on_two_ranks(fact_world, tmp_path):
    dataset = tmp_path / "dataset" / "facts"  # LLM-Adapters' dataset/ layout: NAME/test.json (a JSON list)
    dataset.mkdir(parents=True)
    dataset.joinpath("test.json").write_text(json.dumps([json.loads(l) for l in fact_world["test"].read_text().splitlines()]))
    math_file = tmp_path / "math.jsonl"  # MATH layout: the base never writes \boxed{}, so nothing can match
    math_file.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "solution": f"It is $\\boxed{{{i + 1}}}$."}) + "\n"
                                 for i in range(3)))
    args = ["--base_model", fact_world["model"], "--adapter", f"lora={fact_world['lora']}", "--adapter",
            f"clora={fact_world['clora']}", "--task_dir", tmp_path / "dataset", "--task_file",
            f"seen={fact_world['train']}", "--task_file", f"math={math_file}", "--limit", "40", "--batch_size", "7",
            "--f_records", "20", "--max_new_tokens", "12"]
    proc = run_checked(evaluate_cmd(1, *args, "--output_dir", tmp_path / "one"), timeout=600)
    assert "warning: no generation on math matched boxed" in proc.stdout, proc.stdout[-3000:]
    run_checked(evaluate_cmd(2, *args, "--output_dir", tmp_path / "two"), timeout=600)
    one = json.loads((tmp_path / "one" / "eval_results.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    for doc in (one, two):
        doc.pop("seconds")
    assert one == two, "1 process and 2 ranks must give the same results"
    models = one["models"]
    assert list(models) == ["base", "lora", "clora"] and models["base"]["adapter"] is None
    assert models["base"]["tasks"]["facts"]["accuracy"] == 0.0  # a random base never answers in the format
    assert models["lora"]["tasks"]["seen"]["accuracy"] > 0.6 and models["lora"]["tasks"]["facts"]["accuracy"] > 0
    assert models["lora"]["tasks"]["seen"]["n"] == 40
    weights = models["lora"]["weights"]
    assert set(weights) == {"delta_w_fro", "delta_w_spec", "F", "leakage_in", "leakage_out", "modules"}
    assert weights["F"] > 0 and len(weights["modules"]) == 14  # all-linear: 7 per layer, 2 layers
    assert models["clora"]["weights"]["leakage_in"] < 0.05 < weights["leakage_in"]
    lines = [json.loads(l) for l in (tmp_path / "one" / "predictions" / "lora" / "facts.jsonl").read_text().splitlines()]
    assert set(lines[0]) == {"index", "input", "generated", "extracted", "gold", "correct"} and len(lines) == 12
    table = (tmp_path / "one" / "eval_results.md").read_text()
    assert "| lora " in table and "(+" in table  # every number beside the base's, as a change


def run_evaluates(cases, tmp_path, timeout=600):
    """name -> (exit status, output) of launch/evaluate.py for each (args, env) case, two at a time."""
    procs, results = {}, {}
    items = list(cases.items())
    for start in range(0, len(items), 2):
        for name, (args, env) in items[start:start + 2]:
            log = tmp_path / f"{name}.log"
            procs[name] = (subprocess.Popen(evaluate_cmd(1, *args), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                            env={**child_env(), **env}), log)
        for name, (proc, log) in list(procs.items()):
            proc.wait(timeout=timeout)
            results[name] = (proc.returncode, log.read_text())
            del procs[name]
    return results


@pytest.mark.slow
def test_evaluate_bad_input_is_one_clear_error_before_any_model_loads(fact_world, tmp_path):
    base = ["--base_model", fact_world["model"], "--output_dir", tmp_path / "out"]
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"instruction": "is x a fruit?", "output": "the correct answer is true"}) + "\n")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "eval_results.json").write_text("{}")
    # lm-eval missing: this interpreter with the package made unimportable (nothing of it is replaced)
    no_lm_eval = tmp_path / "no_lm_eval"
    no_lm_eval.mkdir()
    (no_lm_eval / "sitecustomize.py").write_text("import sys\nsys.modules['lm_eval'] = None\n")
    from clora_ds.tiny import build_tiny_llama

    other = tmp_path / "other-base"  # same vocabulary, wider layers: the adapter does not fit it
    build_tiny_llama(len(fact_world["tokenizer"]), hidden_size=48).save_pretrained(str(other))
    fact_world["tokenizer"].save_pretrained(str(other))
    cases = {
        "no_answer": (base + ["--task_file", no_answer], {}),
        "other_base": (["--base_model", other, "--output_dir", tmp_path / "out", "--adapter", fact_world["lora"],
                        "--task_file", fact_world["test"]], {}),
        "lm_eval_missing": (base + ["--task_file", fact_world["test"], "--lm_eval_tasks", "clora_mc"],
                            {"PYTHONPATH": f"{no_lm_eval}{os.pathsep}{child_env()['PYTHONPATH']}"}),
        "hub_task_offline": (base + ["--task_file", fact_world["test"], "--lm_eval_tasks", "hellaswag"],
                             {"HF_DATASETS_OFFLINE": "1"}),
        "results_exist": (["--base_model", fact_world["model"], "--task_file", fact_world["test"], "--output_dir",
                           tmp_path / "done"], {}),
    }
    results = run_evaluates(cases, tmp_path)
    expect = {
        "no_answer": f"--task_file no_answer: {no_answer}: record 1 has no 'answer'",
        "other_base": "--adapter lora: model.layers.0.mlp.down_proj is [out=40, in=72] in the adapter but [out=48, in=72]",
        "lm_eval_missing": "lm-evaluation-harness is not installed",
        "hub_task_offline": "--lm_eval_tasks hellaswag: lm-eval's own tasks read their data from the hub, which is off",
        "results_exist": "already holds eval_results.json; pass --overwrite",
    }
    for name, needle in expect.items():
        code, text = results[name]
        errors = [l for l in text.splitlines() if l.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in text, (name, text[-2000:])
        assert needle in text[text.index("error:"):], (name, text[-2000:])
        assert "Loading weights" not in text, f"{name}: a model was loaded before the error"
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "done" / "eval_results.json").read_text() == "{}"


@pytest.mark.slow
def test_shipped_bbh_and_mmlu_pro_templates_run_offline_on_local_copies(fact_world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from clora_ds.evaluation.harness import plan_tasks, render_tasks, run_lm_eval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "assets"
    (data / "bbh").mkdir(parents=True)
    (data / "mmlu_pro").mkdir()
    # BIG-bench's own layout ({"examples": [...]}) and a plain JSON-lines copy
    (data / "bbh" / "boolean_expressions.json").write_text(json.dumps({"examples": [
        {"input": "not ( True ) and ( True ) is", "target": "False"}, {"input": "True and not False is", "target": "True"}]}))
    (data / "bbh" / "navigate.jsonl").write_text("".join(json.dumps({"input": f"Take {i} steps. Are you back?",
                                                                   "target": "No"}) + "\n" for i in range(3)))
    (data / "mmlu_pro" / "test.jsonl").write_text("".join(json.dumps({
        "question": f"Which number is {i}?", "options": [str(i), str(i + 1), str(i + 2)], "answer_index": 0,
        "answer": "A", "category": "math"}) + "\n" for i in range(4)))
    names, problems = plan_tasks(["clora_bbh", "clora_mmlu_pro"], {}, data)
    assert problems == [] and names == ["clora_bbh_boolean_expressions", "clora_bbh_navigate", "clora_mmlu_pro"]
    include = render_tasks(names, {}, data, tmp_path / "tasks")
    model = AutoModelForCausalLM.from_pretrained(str(fact_world["model"])).eval()
    results = run_lm_eval(model, fact_world["tokenizer"], names, include, batch_size=4)
    assert set(results) == set(names)
    assert set(results["clora_mmlu_pro"]) == {"acc"} and 0 <= results["clora_mmlu_pro"]["acc"] <= 1
    assert all(0 <= v <= 1 for name in names[:2] for v in results[name].values()) and results["clora_bbh_navigate"]
    # a missing local copy is named before any model loads
    _, problems = plan_tasks(["clora_bbh"], {}, tmp_path / "nowhere")
    assert problems and "--lm_eval_data_dir DIR with DIR/bbh/" in problems[0]


# ---------------------------------------------------------------------------------------------------
# multiple choice with the options of a record in one row (shared context), and choice-format records
# ---------------------------------------------------------------------------------------------------
CHOICE_FILE = ROOT / "tests" / "data" / "choice_tiny.jsonl"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_context_scores_equal_one_row_per_option_in_float64(tiny_model_dir, attention):
    """The options of a record scored in one row (context once, a mask hiding the other options) give the same
    log-likelihoods as one row per option, with options of different token lengths, padding and several records
    per batch; the shared rows hold far fewer tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clora_ds.data import read_records
    from clora_ds.evaluation.choice import CHOICE, choice_request
    from clora_ds.evaluation.generation import (attention_implementation, context_groups, continuation_logprobs,
                                                encode_pair, shared_context_row)

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=attention).double().eval()
    assert attention_implementation(model) == attention
    requests = [choice_request(r, CHOICE) for r in read_records(str(CHOICE_FILE))]
    pairs = [(ctx, c) for ctx, conts, _ in requests for c in conts]
    lengths = {len(encode_pair(tok, ctx, c)[1]) for ctx, c in pairs}
    assert len(lengths) >= 3, lengths  # options of several token lengths
    # eager attention takes its softmax in float32 whatever the model's dtype (rows of other lengths round
    # otherwise): relative 1e-7 there, 1e-10 under sdpa
    close = (lambda a, b: abs(a - b) < 1e-10) if attention == "sdpa" else (lambda a, b: abs(a - b) < 1e-7 * abs(b))
    for batch_size in (1, 3, 16):
        shared = continuation_logprobs(model, tok, pairs, batch_size, share_context=True)
        alone = continuation_logprobs(model, tok, pairs, batch_size, share_context=False)
        assert all(close(a, b) for a, b in zip(shared, alone)), (batch_size, shared, alone)
        assert all(s < 0 for s in shared)
    # and both equal a plain forward of each pair by itself (the scorer takes the log-softmax in float32, as lm-eval)
    for (ctx, cont), score in zip(pairs, shared):
        c, x = encode_pair(tok, ctx, cont)
        logp = model(input_ids=torch.tensor([c + x])).logits.float().log_softmax(-1)[0].double()
        assert close(score, sum(logp[len(c) - 1 + t, x[t]].item() for t in range(len(x))))
    encoded = [encode_pair(tok, ctx, c) for ctx, c in pairs]
    groups = context_groups(encoded)
    assert [len(g) for g in groups] == [len(conts) for _, conts, _ in requests]
    one_row = sum(len(shared_context_row(encoded[g[0]][0], [encoded[i][1] for i in g])[0]) for g in groups)
    assert one_row < 0.6 * sum(len(c) + len(x) for c, x in encoded)


def test_choice_records_are_a_format_with_accuracy_by_log_likelihood(tiny_model_dir):
    """{input, choices, label} records: detected, checked (bad options or label refused with the record named),
    tokenized as "Q: input\\nA:" + " " + the gold option (loss on the option and eos), and scored: accuracy picks
    the option of highest summed log-probability."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clora_ds.data import check_records, read_records, record_encoder
    from clora_ds.evaluation.choice import CHOICE, choice_request, multiple_choice_accuracy
    from clora_ds.evaluation.generation import continuation_logprobs
    from clora_ds.plan import choice_task

    records = read_records(str(CHOICE_FILE))
    assert check_records(records, "choices", None) == "choice"
    for bad, needle in (({"choices": ["a"]}, "two or more"), ({"choices": ["a", "a"]}, "repeats an option"),
                        ({"label": 2}, "index of the gold option (0-1)"), ({"label": True}, "index of the gold")):
        with pytest.raises(DataError, match=f"choices: record 2: .*{re.escape(needle)}"):
            check_records([records[0], {**records[1], **bad}], "choices", None)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    example = record_encoder(tok, "choice", 256)(records[0])
    gold = [t for t in example["labels"] if t != -100]
    whole = tok("Q: Which word names a colour?\nA: red", add_special_tokens=False)["input_ids"]
    prompt = tok("Q: Which word names a colour?\nA:", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == [tok.bos_token_id] + whole + [tok.eos_token_id]
    assert gold == whole[len(prompt):] + [tok.eos_token_id]
    assert choice_task(records, "choices")[1] == CHOICE
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).double().eval()
    result = multiple_choice_accuracy(model, tok, records, CHOICE, batch_size=2)
    expected = []
    for r in records:
        ctx, conts, g = choice_request(r, CHOICE)
        scores = continuation_logprobs(model, tok, [(ctx, c) for c in conts], share_context=False)
        expected.append(max(range(len(conts)), key=lambda j: (scores[j], -j)))
    assert result.predicted == expected and result.gold == [r["label"] for r in records]
    assert result.accuracy == sum(p == g for p, g in zip(expected, result.gold)) / len(records)
