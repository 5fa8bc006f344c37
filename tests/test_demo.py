"""The CPU demo's figure (`bash launch/quickstart.sh demo`) is one that rounding cannot change.

The demo is trained once, as quickstart.sh trains it (its own flags, read from the script, the real launcher on two
CPU ranks), and evaluated by the real launch/evaluate.py. Then the same adapter is evaluated again (the library's
evaluate_task, evaluate.py's own settings) under what another machine changes: the thread count, float32 matmul
precision, a bf16 autocast, the batch size and the order of the items (which items share a batch, so the padding and
summation order). Every perturbation must give the same answers, hence the accuracy that README and
bench/RESULTS.md quote. The margins say why: at every generated token up to the answer, the log-prob gap between the
chosen token and the runner-up is far above what rounding moves (fp32 ~1e-5 relative, bf16 ~1e-2).
"""
from __future__ import annotations

import json
import random
import re
import shlex
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from conftest import ROOT, deepspeed_cmd, run_checked

# The figure README and bench/RESULTS.md quote for the demo's adapter on its held-out split (80 questions), trained on the
# launcher's default path (fused LoRA projection, chunked loss); PEFT's unfused path gave 0.85 (see bench/RESULTS.md).
DEMO_ACCURACY = 0.9375
# The smallest log-prob gap (nats) between the chosen token and the runner-up, over every held-out item and every
# token up to its answer, that the test accepts: a bf16 autocast moved the margins of the demo's earlier adapter by up
# to 0.24 nats (measured 2026-12-02), fp32 kernels move them by ~1e-5; today's adapter's smallest is 0.33 (one item;
# the next is 1.00). The perturbations below are the real check; this bound says how close the closest item is.
MIN_MARGIN = 0.3


def demo_train_args(demo_dir: Path) -> list:
    """launch/train.py's arguments exactly as launch/quickstart.sh's demo passes them, with out/demo -> demo_dir."""
    script = (ROOT / "launch" / "quickstart.sh").read_text()
    found = re.search(r'launch/train\.py (--deepspeed .*?) "\$@"', script, re.S)
    assert found, "launch/quickstart.sh: the demo's launch/train.py command was not found"
    return [a.replace("out/demo", str(demo_dir)) for a in shlex.split(found.group(1).replace("\\\n", " "))]


def answer_margins(model, tokenizer, prompts, pattern: str, max_new_tokens: int = 32) -> list:
    """(margin, extracted answer) for each prompt, decoding greedily token by token as generation frames it: the
    margin is the smallest gap log p(top-1) - log p(top-2) over the tokens generated up to and with the one that
    completes the answer the protocol extracts (None if none does within ``max_new_tokens``)."""
    from clora_ds.evaluation.generation import frame_prompt
    from clora_ds.evaluation.protocols import extract_commonsense

    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids, new, gaps, answer = frame_prompt(tokenizer, prompt), [], [], None
            while answer is None and len(new) < max_new_tokens:
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids + new])).logits[0, -1].double(), dim=-1)
                top = logp.topk(2)
                gaps.append((top.values[0] - top.values[1]).item())
                new.append(top.indices[0].item())
                answer = extract_commonsense(tokenizer.decode(new, skip_special_tokens=True), pattern)
            out.append((min(gaps), answer))
    return out


@contextmanager
def machine(threads=None, matmul=None, bf16=False):
    """What another machine would change, for the duration of one evaluation."""
    old_threads, old_matmul = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:
        if threads:
            torch.set_num_threads(threads)
        if matmul:
            torch.set_float32_matmul_precision(matmul)
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            yield
    finally:
        torch.set_num_threads(old_threads)
        torch.set_float32_matmul_precision(old_matmul)


def load_adapter(run_dir: Path):
    """The run's base and adapter, loaded as launch/evaluate.py loads them on a CPU (fp32, eval mode)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clora_ds.evaluation.run import from_run_dirs

    base, adapters, _ = from_run_dirs([run_dir])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapters[0][1])).eval(), AutoTokenizer.from_pretrained(base)


def evaluate_as_evaluate_py(model, tokenizer, records, batch_size=32):
    """(accuracy, {record's instruction: extracted answer}) with launch/evaluate.py's own task function."""
    from clora_ds.evaluation.protocols import protocol_for
    from clora_ds.evaluation.run import Task, evaluate_task

    task = Task(name="facts", path=Path("test.jsonl"), records=records, protocol=protocol_for(records, "facts"))
    result, predictions = evaluate_task(model, tokenizer, task, None, batch_size)
    return result["accuracy"], {records[p["index"]]["instruction"]: p["extracted"] for p in predictions}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo, trained as quickstart.sh trains it, and evaluated by launch/evaluate.py as quickstart.sh does."""
    demo = tmp_path_factory.mktemp("demo")
    run_checked([sys.executable, str(ROOT / "launch" / "make_demo_assets.py"), str(demo / "assets")])
    run_checked(deepspeed_cmd(2) + [str(ROOT / "launch" / "train.py")] + demo_train_args(demo), cwd=ROOT)
    test_file = demo / "assets" / "data" / "test.jsonl"
    run_checked([sys.executable, str(ROOT / "launch" / "evaluate.py"), "--run_dir", str(demo / "run"), "--task_file",
                 f"facts={test_file}", "--output_dir", str(demo / "eval"), "--overwrite"], cwd=ROOT)
    return demo


@pytest.mark.slow
def test_demo_figure_is_the_same_under_what_a_machine_changes(demo_run):
    from clora_ds.data import read_records
    from clora_ds.evaluation.protocols import protocol_for

    results = json.loads((demo_run / "eval" / "eval_results.json").read_text())["models"]
    records = read_records(str(demo_run / "assets" / "data" / "test.jsonl"))
    assert len(records) >= 50
    assert results["base"]["tasks"]["facts"]["accuracy"] == 0.0  # a random base never answers in the format
    assert results["run"]["tasks"]["facts"]["accuracy"] == pytest.approx(DEMO_ACCURACY, abs=1e-9)
    figure = f"{100 * DEMO_ACCURACY:.2f}%"
    for quoted_in in ("bench/RESULTS.md", "README.md"):
        assert figure in (ROOT / quoted_in).read_text(), f"{quoted_in} does not quote {figure}"

    model, tokenizer = load_adapter(demo_run / "run")
    accuracy, answers = evaluate_as_evaluate_py(model, tokenizer, records)
    assert accuracy == pytest.approx(DEMO_ACCURACY, abs=1e-9)

    protocol = protocol_for(records, "facts")
    measured = answer_margins(model, tokenizer, [protocol.prompt(r) for r in records], protocol.pattern)
    assert [answer for _, answer in measured] == [answers[r["instruction"]] for r in records]
    margins = [m for m, _ in measured]
    print(f"\ndemo margins (nats): smallest {min(margins):.3f}, 5 smallest {sorted(round(m, 3) for m in margins)[:5]}")
    assert min(margins) > MIN_MARGIN

    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    perturbations = {
        "1 thread": (dict(threads=1), records, 32),
        "2 threads": (dict(threads=2), records, 32),
        "matmul precision high": (dict(matmul="high"), records, 32),
        "matmul precision medium": (dict(matmul="medium"), records, 32),
        "bf16 autocast": (dict(bf16=True), records, 32),
        "items shuffled, batch 7": (dict(), shuffled, 7),
    }
    for name, (setting, items, batch_size) in perturbations.items():
        with machine(**setting):
            got_accuracy, got_answers = evaluate_as_evaluate_py(model, tokenizer, items, batch_size)
        assert got_answers == answers, f"{name}: the answers changed"
        assert got_accuracy == pytest.approx(DEMO_ACCURACY, abs=1e-9), name


if __name__ == "__main__":  # measure an existing demo run: python tests/test_demo.py out/demo
    from clora_ds.data import read_records
    from clora_ds.evaluation.protocols import protocol_for

    demo = Path(sys.argv[1])
    model, tokenizer = load_adapter(demo / "run")
    records = read_records(str(demo / "assets" / "data" / "test.jsonl"))
    accuracy, answers = evaluate_as_evaluate_py(model, tokenizer, records)
    protocol = protocol_for(records, "facts")
    measured = answer_margins(model, tokenizer, [protocol.prompt(r) for r in records], protocol.pattern)
    margins = sorted(m for m, _ in measured)
    print(f"accuracy {accuracy:.4f}; same answers as evaluate_task: "
          f"{[a for _, a in measured] == [answers[r['instruction']] for r in records]}; margins: smallest "
          f"{margins[0]:.3f}, 5 smallest {[round(m, 3) for m in margins[:5]]}, median {margins[len(margins) // 2]:.2f}")
    with machine(bf16=True):
        print("bf16 autocast accuracy", evaluate_as_evaluate_py(model, tokenizer, records)[0])
