"""Same 3 training steps, same numbers: single process vs DeepSpeed ZeRO-2 / ZeRO-3 with 2 CPU ranks.

Every layout sees the same global batches (4 sequences of 24 tokens per step), fp32, AdamW, no clipping.
Runs through the real `deepspeed` launcher (CPU accelerator, gloo); nothing is mocked.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SCRIPTS, deepspeed_cmd, run_checked

STEPS = 3
LAYOUTS = [  # (name, micro batch per rank, accumulation) with 2 ranks: 2·micro·accum = 4
    ("none-mb2", 2, 1, "none"),
    ("none-ga2", 1, 2, "none"),
    ("reentrant-mb2", 2, 1, "reentrant"),
    ("reentrant-ga2", 1, 2, "reentrant"),
    ("nonreentrant-mb2", 2, 1, "nonreentrant"),
    ("nonreentrant-ga2", 1, 2, "nonreentrant"),
]
TOL = 1e-5
SHARDED = [LAYOUTS[0], LAYOUTS[3], LAYOUTS[5]]  # no checkpointing / reentrant + accumulation / non-reentrant + accumulation


def _runs(layouts, **extra):
    return [{"name": n, "micro_batch": mb, "grad_accum": ga, "checkpointing": ck, "steps": STEPS, **extra} for n, mb, ga, ck in layouts]


def _results(out: Path, name: str):
    return json.loads((out / f"{name}.json").read_text()), load_file(str(out / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    runs = _runs([("ref", 4, 1, "none"), ("ref-ga2", 2, 2, "none")]) + [
        {"name": "ref-lam0", "micro_batch": 4, "grad_accum": 1, "checkpointing": "none", "steps": STEPS, "lam": 0.0}
    ]
    (out / "runs.json").write_text(json.dumps(runs))
    run_checked(["python", str(SCRIPTS / "clora_steps.py"), "--backend", "torch", "--model", str(tiny_model_dir),
                 "--out", str(out), "--runs", str(out / "runs.json")])
    return out


def _assert_same(got, ref, what, tol=TOL):
    (g_log, g_w), (r_log, r_w) = got, ref
    assert len(g_log["losses"]) == STEPS
    for a, b in zip(g_log["losses"], r_log["losses"]):
        assert abs(a - b) <= tol, f"{what}: losses {g_log['losses']} vs {r_log['losses']}"
    for a, b in zip(g_log["penalties"], r_log["penalties"]):
        assert abs(a - b) <= tol * max(1.0, abs(b)), f"{what}: penalties {g_log['penalties']} vs {r_log['penalties']}"
    assert g_w.keys() == r_w.keys() and len(g_w) == 2 * 7 * 2
    for k in r_w:
        assert g_w[k].shape == r_w[k].shape and g_w[k].numel() > 0, f"{what}: {k} has shape {tuple(g_w[k].shape)}"
        diff = (g_w[k] - r_w[k]).abs().max().item()
        assert diff <= tol, f"{what}: {k} differs by {diff}"


def test_reference_is_sensitive_to_the_penalty(single_process):
    ref, ga2, lam0 = (_results(single_process, n) for n in ("ref", "ref-ga2", "ref-lam0"))
    _assert_same(ga2, ref, "single process, accumulation 2 vs doubled micro-batch")
    assert ref[0]["penalties"][-1] < 0.8 * lam0[0]["penalties"][-1], "λ=1 must shrink R compared with λ=0"
    assert max((ref[1][k] - lam0[1][k]).abs().max().item() for k in ref[1]) > 100 * TOL


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_matches_single_process(stage, single_process, tiny_model_dir, tmp_path):
    runs = _runs(LAYOUTS)
    runs[0]["save_adapter"] = True
    # P sharded over the 2 ranks (each keeps 3 of k=6 columns; 3 and 2 of k=5; 1 and 0 of k=1): same losses, R, weights
    runs += [{**r, "name": r["name"] + "-shard", "p_shard": True} for r in _runs(SHARDED)]
    runs += [{"name": "k5", "micro_batch": 1, "grad_accum": 2, "checkpointing": "nonreentrant", "steps": STEPS, "k": 5},
             {"name": "k5-shard", "micro_batch": 1, "grad_accum": 2, "checkpointing": "nonreentrant", "steps": STEPS,
              "k": 5, "p_shard": True},
             # k = 1 < W: rank 1 holds no column of P at all
             {"name": "k1", "micro_batch": 2, "grad_accum": 1, "checkpointing": "none", "steps": STEPS, "k": 1},
             {"name": "k1-shard", "micro_batch": 2, "grad_accum": 1, "checkpointing": "none", "steps": STEPS, "k": 1,
              "p_shard": True}]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    proc = run_checked(deepspeed_cmd(2) + [str(SCRIPTS / "clora_steps.py"), "--backend", "deepspeed", "--zero_stage", str(stage),
                                           "--model", str(tiny_model_dir), "--out", str(tmp_path), "--runs", str(tmp_path / "runs.json")],
                       timeout=1200)
    assert proc.stdout.count(f"deepspeed zero={stage} none-mb2:") == 2, "both ranks must report"
    ref = _results(single_process, "ref")
    for name, *_ in LAYOUTS:
        _assert_same(_results(tmp_path, name), ref, f"ZeRO-{stage} {name}")
    for name, *_ in SHARDED:
        _assert_same(_results(tmp_path, name + "-shard"), _results(tmp_path, name), f"ZeRO-{stage} {name}, sharded P",
                     tol=1e-6)
    _assert_same(_results(tmp_path, "k5-shard"), _results(tmp_path, "k5"), f"ZeRO-{stage} k=5 (uneven), sharded P", tol=1e-6)
    _assert_same(_results(tmp_path, "k1-shard"), _results(tmp_path, "k1"), f"ZeRO-{stage} k=1 < W, sharded P", tol=1e-6)
    # the adapter gathered and saved under ZeRO holds the same, full-shape weights
    adapter = load_file(str(tmp_path / "none-mb2-adapter" / "adapter_model.safetensors"))
    weights = _results(tmp_path, "none-mb2")[1]
    assert len(adapter) == len(weights)
    for key, value in adapter.items():
        full_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(value, weights[full_key]), key
    # plain PEFT in a fresh process (no clora_ds) reproduces the trained engine's logits
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
probe = torch.load({str(tmp_path / 'none-mb2-probe.pt')!r}, weights_only=True)
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(tmp_path / 'none-mb2-adapter')!r}).eval()
with torch.no_grad():
    diff = (model(input_ids=probe["input_ids"]).logits - probe["logits"]).abs().max().item()
assert not any(m.startswith("clora_ds") for m in sys.modules)
print("MAXDIFF", diff)
"""
    proc = run_checked([sys.executable, "-c", code], timeout=600)
    diff = float(proc.stdout.split("MAXDIFF")[1])
    assert diff < 1e-4, diff
