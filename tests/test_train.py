"""launch/train.py end to end: real deepspeed launcher, two CPU ranks, tiny LLaMA, nothing mocked."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA, ROOT, child_env, deepspeed_cmd, run_checked

TRAIN = str(ROOT / "launch" / "train.py")
COMMONSENSE = DATA / "commonsense_tiny.jsonl"  # eval file: eval loss and multiple-choice accuracy
CFG = ROOT / "ds_configs"


def train_args(model_dir, out, config="zero2.json", **over):
    args = {"deepspeed": str(CFG / config), "model_name_or_path": str(model_dir), "train_file": str(DATA / "alpaca_tiny.jsonl"),
            "output_dir": str(out), "max_steps": 5, "learning_rate": 1e-2, "lora_dropout": 0.0, "clora_k": 5, "lora_r": 4,
            "lora_alpha": 8, "max_seq_length": 256, "logging_steps": 1, "save_steps": 0, "seed": 3, "max_grad_norm": 0.0,
            "target_modules": "q_proj,k_proj,v_proj,up_proj,down_proj", **over}
    return [f"--{k}={v}" for k, v in args.items()]


def losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["task_loss"] for r in rows if "task_loss" in r}  # a resumed run re-logs steps: last wins
    return [by_step[s] for s in sorted(by_step)]


def launch(model_dir, out, ranks=2, env=None, check=True, **over):
    per_rank = over.pop("per_device_train_batch_size", 4 // ranks)
    cmd = (deepspeed_cmd(ranks) if ranks > 1 else [sys.executable]) + [TRAIN] + train_args(
        model_dir, out, per_device_train_batch_size=per_rank, **over)
    if check:
        return run_checked(cmd, timeout=900)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**child_env(), **(env or {})})


def silu_calls(out):
    """aten::silu calls in the profiled step (rank 0): the MLP activation runs once per decoder layer's forward, so
    this counts decoder-layer forwards, recomputations under activation checkpointing included."""
    trace = json.loads((Path(out) / "profile" / "trace.json").read_text())
    return sum(1 for e in trace["traceEvents"] if e.get("name") == "aten::silu" and e.get("ph") == "X")


LAYERS = 2  # the tiny LLaMA's decoder layers; one micro-batch per step in these runs


@pytest.fixture(scope="module")
def single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    launch(tiny_model_dir, out, ranks=1, profile_steps="2", eval_file=COMMONSENSE)
    return out


def evaluations(out):
    """{step: eval row} of a run's metrics.jsonl."""
    from clora_ds.run_dir import read_metrics

    return {step: row for (step, kind), row in read_metrics(Path(out) / "metrics.jsonl").items() if kind == "eval"}


@pytest.mark.slow
@pytest.mark.parametrize("config, checkpointing", [("zero2.json", "nonreentrant"), ("zero3.json", "reentrant"),
                                                   ("zero3_offload.json", "off")])
def test_zero_stages_match_single_process(config, checkpointing, single, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    extra = {"eval_file": COMMONSENSE}
    if config == "zero3.json":  # and the best checkpoint by eval loss kept besides the newest
        extra.update(save_steps=2, eval_steps=2, save_total_limit=2, save_best_metric="eval_loss")
    if checkpointing != "off":
        extra.update(gradient_checkpointing="true", gradient_checkpointing_reentrant=str(checkpointing == "reentrant"))
    proc = launch(tiny_model_dir, out, config=config, profile_steps="2", **extra)
    assert "world size 2" in proc.stdout
    # P is sharded by default with 2 ranks: rank 0 holds half of the unsharded P (± one column per module)
    from transformers import AutoModelForCausalLM

    from clora_ds import CLoRAConfig, attach_clora

    cfg = CLoRAConfig.load(out / "adapter")
    full = attach_clora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), cfg).clora
    held = int(re.search(r"P: [\d.,]+ MiB \(([\d,]+) bytes\) on this rank \(sharded: 2 ranks", proc.stdout)[1].replace(",", ""))
    assert abs(held - full.p_nbytes / 2) <= full.p_nbytes / cfg.k, (held, full.p_nbytes)
    # activation checkpointing really engages: every decoder layer's forward runs again in backward
    assert silu_calls(single) == LAYERS
    assert silu_calls(out) == (2 * LAYERS if checkpointing != "off" else LAYERS), checkpointing
    got, ref = losses(out), losses(single)
    assert len(got) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)
    # the in-training multiple-choice accuracy (log-likelihood, ZeRO-3-safe) is the single process's, exactly
    final, reference = evaluations(out)[5], evaluations(single)[5]
    assert final["eval_accuracy"] == reference["eval_accuracy"] and 0 <= final["eval_accuracy"] <= 1
    assert abs(final["eval_loss"] - reference["eval_loss"]) < 1e-4
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "clora_config.json").is_file()
    from safetensors.torch import load_file

    mine, theirs = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(single / "adapter" / "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].numel() > 0 and mine[k].shape == theirs[k].shape
        assert (mine[k] - theirs[k]).abs().max() < 1e-4, k
    if config == "zero3.json":
        evals = evaluations(out)
        assert sorted(evals) == [2, 4, 5]
        best = min([2, 4, 5], key=lambda s: (evals[s]["eval_loss"], -s))
        kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        assert kept == sorted({best, 5} | ({4} if best == 5 else set())), (kept, evals)
        check_adapter_in_fresh_process(tiny_model_dir, out, tmp_path)


def check_adapter_in_fresh_process(model_dir, out, tmp_path):
    """The ZeRO-3 engine's own eval loss at the end == plain PEFT's, in a process without clora_ds."""
    from transformers import LlamaTokenizer

    from clora_ds.data import alpaca_prompt, tokenize_example

    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    engine_loss = [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    tok = LlamaTokenizer.from_pretrained(str(model_dir))
    records = [json.loads(l) for l in COMMONSENSE.read_text().splitlines()]
    examples = [tokenize_example(tok, alpaca_prompt(r), r["output"], 256) for r in records]
    torch.save([torch.tensor(e["input_ids"]) for e in examples], tmp_path / "ids.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(out / 'adapter')!r}).eval()
with torch.no_grad():
    logits = [model(input_ids=ids[None]).logits[0] for ids in torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)]
torch.save(logits, {str(tmp_path / 'logits.pt')!r})
assert not any(m.startswith('clora_ds') for m in sys.modules)
"""
    run_checked([sys.executable, "-c", code], timeout=600)
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    total, count = 0.0, 0
    for lg, ex in zip(logits, examples):
        labels = torch.tensor(ex["labels"][1:])
        keep = labels != -100
        total += torch.nn.functional.cross_entropy(lg[:-1][keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    assert abs(total / count - engine_loss) < 1e-4, (total / count, engine_loss)


@pytest.mark.slow
def test_loss_falls(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    launch(tiny_model_dir, out, ranks=1, max_steps=24, learning_rate=2e-2, per_device_train_batch_size=8, lora_r=8,
           report_to="csv")
    curve = losses(out)
    assert any((out / "monitor").rglob("*.csv")), "--report_to csv must feed DeepSpeed's CSV monitor"
    # a random tiny model starts near uniform (ln 200 ≈ 5.3 nats); 24 steps take it down ~0.3 nats
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.15, curve
    assert (out / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_packed_training_per_sequence_sdpa_matches_dense_mask(tiny_model_dir, tmp_path):
    """--packing through the launcher: 2 ranks with per-sequence SDPA == 1 rank with eager's dense block mask."""
    packed = {"packing": "true", "max_seq_length": 256}  # the tiny model has 256 positions
    launch(tiny_model_dir, tmp_path / "eager", ranks=1, attn_implementation="eager", **packed)
    proc = launch(tiny_model_dir, tmp_path / "sdpa", ranks=2, **packed)
    assert "attention: clora_packed_sdpa" in proc.stdout and "packed 96 examples into" in proc.stdout
    got, ref = losses(tmp_path / "sdpa"), losses(tmp_path / "eager")
    assert len(got) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)


@pytest.mark.parametrize("attn", ["sdpa", "clora_packed_sdpa"])
def test_packed_batch_has_the_same_per_example_loss(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM, LlamaTokenizer

    from clora_ds.batches import collate_packed, pad_batch
    from clora_ds.data import alpaca_prompt, tokenize_example

    tok = LlamaTokenizer.from_pretrained(str(tiny_model_dir))
    import clora_ds.attention  # noqa: F401  (registers clora_packed_sdpa)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation=attn).eval()
    records = [json.loads(l) for l in (DATA / "alpaca_tiny.jsonl").read_text().splitlines()[:4]]
    examples = [tokenize_example(tok, alpaca_prompt(r), r["output"], 512) for r in records]

    def per_example(logits, labels, segments):
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], reduction="none", ignore_index=-100)
        return [ce[s:e - 1][labels[0, s + 1:e] != -100].mean().item() for s, e in segments]

    with torch.no_grad():
        alone = []
        for ex in examples:
            b = pad_batch([ex], 0)
            n = len(ex["input_ids"])
            alone += per_example(model(input_ids=b["input_ids"], use_cache=False).logits, b["labels"], [(0, n)])
        packed = collate_packed([examples], 0)
        bounds, t = [], 0
        for ex in examples:
            bounds.append((t, t + len(ex["input_ids"])))
            t += len(ex["input_ids"])
        together = per_example(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits,
                               packed["labels"], bounds)
        crosstalk = per_example(model(input_ids=packed["input_ids"], use_cache=False).logits, packed["labels"], bounds)
    assert max(abs(a - b) for a, b in zip(alone, together)) < 1e-5, (alone, together)
    assert max(abs(a - b) for a, b in zip(alone, crosstalk)) > 1e-3, "without restarting positions examples must interact"


def _bad_run(model_dir, out, ranks=1, **over):
    proc = launch(model_dir, out, ranks=ranks, check=False, **over)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    errors = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, text[-3000:]  # one message, from rank 0 only
    assert "Traceback" not in text, text[-3000:]
    return text[text.index("error:"):]


@pytest.mark.slow
def test_bad_input_is_one_clear_message(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (DATA / "alpaca_tiny.jsonl").read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"instruction": "x", "output": '] + lines[3:]) + "\n")
    assert f"{bad}:4: malformed JSON line" in _bad_run(tiny_model_dir, tmp_path / "a", ranks=2, train_file=bad)

    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join(lines[:5] + ['{"instruction": "x", "input": ""}']) + "\n")
    msg = _bad_run(tiny_model_dir, tmp_path / "b", train_file=missing)
    assert "record 6 lacks field 'output', required by format alpaca (detected from the keys)" in msg

    msg = _bad_run(tiny_model_dir, tmp_path / "c", max_seq_length=16)
    assert "all 96 examples were dropped: 96 are longer than max_seq_length=16" in msg

    contradict = tmp_path / "ds.json"
    cfg = json.loads((CFG / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 8
    contradict.write_text(json.dumps(cfg))
    msg = _bad_run(tiny_model_dir, tmp_path / "d", deepspeed=contradict)
    assert "train_micro_batch_size_per_gpu=8 in the DeepSpeed config contradicts --per_device_train_batch_size (= 4)" in msg

    assert "no such directory" in _bad_run(tmp_path / "nope", tmp_path / "e")

    taken = tmp_path / "taken"
    (taken / "checkpoint-2").mkdir(parents=True)
    (taken / "checkpoint-2" / "COMPLETE").write_text("2\n")
    before = sorted(p.name for p in taken.rglob("*"))
    msg = _bad_run(tiny_model_dir, taken)
    assert "holds another run (checkpoint-2)" in msg and "--overwrite_output_dir" in msg
    assert sorted(p.name for p in taken.rglob("*")) == before


def test_arch_specific_cuda_targets_are_made_readable_for_deepspeed(monkeypatch):
    """CUDA images set TORCH_CUDA_ARCH_LIST=9.0a (seen on a lent H100); DeepSpeed's real builder cannot parse it."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, importable without a GPU

    from clora_ds.ds_config import deepspeed_cuda_arch_list

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a;8.0 10.0a+PTX;9.0")
    with pytest.raises(ValueError, match="invalid literal"):
        FusedAdamBuilder().compute_capability_args()
    note = deepspeed_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0;8.0;10.0+PTX"
    assert "9.0a" in note and "'9.0;8.0;10.0+PTX'" in note
    flags = FusedAdamBuilder().compute_capability_args()
    assert "-gencode=arch=compute_90,code=sm_90" in flags and "-gencode=arch=compute_100,code=compute_100" in flags
    assert deepspeed_cuda_arch_list() is None  # already readable: left alone
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert deepspeed_cuda_arch_list() is None


def test_library_value_errors_keep_their_traceback(monkeypatch):
    """Settings we validate are one `error:` line (UserError); a ValueError from inside DeepSpeed is re-raised whole."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    from clora_ds.config import CLoRAConfig
    from clora_ds.errors import UserError

    with pytest.raises(ValueError) as ours:
        CLoRAConfig(r=4, k=-1)
    assert isinstance(ours.value, UserError)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    with pytest.raises(ValueError) as theirs:
        FusedAdamBuilder().compute_capability_args()
    assert not isinstance(theirs.value, UserError)
    assert "except UserError" in Path(TRAIN).read_text()  # launch/train.py turns exactly these into one line


def test_flash_attention_asked_where_it_cannot_run_is_one_clear_error():
    from clora_ds.errors import ConfigError
    from clora_ds.model import choose_attention, flash_attention_available

    ready, why = flash_attention_available()
    if ready:
        pytest.skip("flash-attn runs here")
    with pytest.raises(ConfigError, match="--attn_implementation flash_attention_2: .*Use --attn_implementation sdpa"):
        choose_attention("flash_attention_2", packing=True)
    assert why and choose_attention("auto", packing=False) == "sdpa"
    assert choose_attention("auto", packing=True) == "clora_packed_sdpa" and choose_attention("eager", True) == "eager"


@pytest.mark.slow
def test_profile_steps_write_a_trace_and_top_ops(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = launch(tiny_model_dir, out, ranks=1, max_steps=3, profile_steps="2-3")
    assert f"profiled steps 2-3: {out / 'profile' / 'trace.json'}" in proc.stdout
    trace = json.loads((out / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names) and any("SubspacePenalty" in n or "PenaltyTap" in n for n in names)
    top = (out / "profile" / "top_ops.txt").read_text()
    assert top.startswith("steps 2-3, sorted by self_cpu_time_total") and "aten::" in top
    assert len(losses(out)) == 3
    bad = launch(tiny_model_dir, tmp_path / "bad", ranks=1, check=False, profile_steps="3-2")
    assert bad.returncode == 2 and "--profile_steps '3-2': give A-B with 1 <= A <= B" in bad.stderr
