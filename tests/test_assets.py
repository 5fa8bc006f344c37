"""Offline assets from the package registry: BIG-Bench Hard's source tasks and SmolLM2-135M-Instruct (a real
pretrained LLaMA) — converted, checked against the GGUF, trained under ZeRO-3 and answering a factual question."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, ROOT, child_env, deepspeed_cmd, run_checked

CACHE = Path(os.environ.get("CLORA_DS_TEST_ASSETS", Path.home() / ".cache" / "clora_ds" / "test_assets"))


def test_bbh_records_keep_the_options_and_the_best_target():
    from clora_ds.assets import bbh_records

    task = {"task_prefix": "Is the statement plausible?", "example_input_prefix": "\nStatement: ",
            "examples": [{"input": "He scored a goal", "target_scores": {"plausible": 1, "implausible": 0}},
                         {"input": "He scored a touchdown in tennis", "target_scores": {"plausible": 0, "implausible": 1}},
                         {"input": "A tie", "target_scores": {"a": 1, "b": 1}}]}
    records = bbh_records(task)
    assert records[0] == {"input": "Is the statement plausible?\nStatement: He scored a goal", "target": "plausible",
                          "choices": ["plausible", "implausible"], "label": 0}
    assert records[1]["label"] == 1 and records[1]["target"] == "implausible"
    assert records[2]["label"] == 0  # a tie: the first of the best
    generative = bbh_records({"examples": [{"input": "How many? a b c", "target": ["three", "3"]}]})
    assert generative == [{"input": "How many? a b c", "target": "three"}]


def _registry(spec, source=False):
    """The downloaded file of SPEC in the test cache, or a skip naming why the registry could not give it."""
    from clora_ds.assets import AssetError, registry_download

    try:
        return registry_download(spec, CACHE / "_downloads", source=source)
    except AssetError as err:
        if os.environ.get("CI") == "true":  # CI reaches the package registries: there, this is a failure
            pytest.fail(f"the package registry must be reachable in CI: {err}")
        pytest.skip(f"the package registry is unreachable here: {err}")


@pytest.mark.slow
def test_bbh_source_tasks_from_big_bench_and_their_lm_eval_tasks_offline(tiny_model_dir, tmp_path, monkeypatch):
    import tarfile

    from clora_ds.assets import BBH_SOURCES, BIGBENCH_SPEC, prepare_bbh
    from clora_ds.evaluation.harness import plan_tasks, render_tasks, run_lm_eval

    sdist = _registry(BIGBENCH_SPEC, source=True)
    bbh = prepare_bbh(CACHE)
    assert sorted(p.stem for p in bbh.glob("*.jsonl")) == sorted(BBH_SOURCES)
    with tarfile.open(sdist) as tar:  # the written records are the task's examples, options and best targets
        member = next(m for m in tar if m.name.endswith("benchmark_tasks/navigate/task.json"))
        source = json.load(tar.extractfile(member))
    written = [json.loads(line) for line in (bbh / "navigate.jsonl").read_text().splitlines()]
    assert len(written) == len(source["examples"]) > 100
    for ex, rec in zip(source["examples"], written):
        assert rec["input"].endswith(ex["input"].strip()) and rec["input"].startswith(source["task_prefix"])
        assert rec["choices"] == list(ex["target_scores"]) and ex["target_scores"][rec["choices"][rec["label"]]] == 1
    counting = json.loads((bbh / "object_counting.jsonl").read_text().splitlines()[0])
    assert "choices" not in counting and counting["target"]  # a generative task: its first target
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names, problems = plan_tasks(["clora_bbh_mc"], {}, CACHE)
    assert problems == [] and "clora_bbh_mc_navigate" in names and "clora_bbh_mc_object_counting" not in names
    chosen = ["clora_bbh_mc_navigate", "clora_bbh_mc_sports_understanding"]
    include = render_tasks(chosen, {}, CACHE, tmp_path / "tasks")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    results = run_lm_eval(model, AutoTokenizer.from_pretrained(str(tiny_model_dir)), chosen, include, limit=6)
    assert set(results) == set(chosen) and all(0 <= r["acc"] <= 1 for r in results.values())


@pytest.fixture(scope="module")
def smollm2():
    from clora_ds.assets import SMOLLM2_SPEC, prepare_smollm2

    _registry(SMOLLM2_SPEC)
    return prepare_smollm2(CACHE, "float32")


@pytest.mark.slow
def test_smollm2_chat_records_are_its_templates_ids_and_learn_only_the_assistant_turns(smollm2):
    """SmolLM2-Instruct's ChatML with its real tokenizer: multi-turn records (with a system prompt, and without one,
    where the template writes its own) are exactly apply_chat_template's ids; the loss is on each assistant turn and
    its <|im_end|>, not on the newline after it."""
    from transformers import AutoTokenizer

    from clora_ds.data import tokenize_records
    from test_chat_data import assert_token_exact, chat_records

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    records = chat_records()[:12] + [{"messages": r["messages"][1:]} for r in chat_records()[12:18]]
    assert_token_exact(tok, records, lambda content: content + "<|im_end|>")
    hello = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    ex = tokenize_records([{"messages": hello}], "hello.jsonl", tok, "auto", 1024).examples[0]
    text = tok.decode(ex["input_ids"])  # the example: no second <|im_start|> in front, no <|im_end|> after
    assert text == tok.apply_chat_template(hello, tokenize=False) and text.startswith("<|im_start|>system\n")
    assert text.count("<|im_start|>") == 3 and text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")


@pytest.mark.slow
def test_converted_smollm2_reproduces_the_gguf_models_logits(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clora_ds.assets import SMOLLM2_GGUF, load_gguf_model

    gguf_model, gguf_tok = load_gguf_model(CACHE / "_downloads" / "smollm2" / SMOLLM2_GGUF, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and len(tok) == len(gguf_tok)
    for prompt in ("The capital of France is", "def fibonacci(n):", "Water boils at"):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        assert ids.tolist() == gguf_tok(prompt, return_tensors="pt")["input_ids"].tolist()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, gguf_model(input_ids=ids).logits), prompt


@pytest.mark.slow
def test_smollm2_trains_clora_under_zero3_and_its_adapter_loads_in_plain_peft(smollm2, tmp_path):
    out = tmp_path / "run"
    train = deepspeed_cmd(2) + [
        str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"),
        "--model_name_or_path", str(smollm2), "--train_file", str(DATA / "commonsense_tiny.jsonl"), "--output_dir",
        str(out), "--max_steps", "2", "--per_device_train_batch_size", "1", "--max_seq_length", "128", "--lora_r", "4",
        "--lora_alpha", "8", "--clora_k", "16", "--learning_rate", "1e-4", "--save_steps", "1", "--logging_steps", "1"]
    proc = run_checked(train, timeout=1200)
    assert "world size 2; ZeRO stage 3" in proc.stdout
    converted = tmp_path / "adapter-2"
    run_checked([sys.executable, str(ROOT / "launch" / "convert_to_peft.py"), str(out / "checkpoint-2"), str(converted),
                 "--verify"], timeout=600)
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({str(smollm2)!r})
base = AutoModelForCausalLM.from_pretrained({str(smollm2)!r}, dtype=torch.float32).eval()
ids = tok.apply_chat_template([{{"role": "user", "content": "What is the capital of France?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    answer = tok.decode(base.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True)
model = PeftModel.from_pretrained(base, {str(converted)!r}).eval()
assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
assert not any(m.startswith("clora_ds") for m in sys.modules)
print("ANSWER:", answer)
"""
    proc = run_checked([sys.executable, "-c", code], timeout=600)
    assert "Paris" in proc.stdout.split("ANSWER:")[1], proc.stdout[-2000:]
