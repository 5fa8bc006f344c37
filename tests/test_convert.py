"""Checkpoint -> PEFT adapter / merged model, on real checkpoints written by launch/train.py (two CPU ranks).

Nothing is mocked: runs use the real `deepspeed` launcher, conversion uses DeepSpeed's own reader, results load
with plain PEFT / transformers. One training run serves several tests (module-scoped fixtures).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clora_ds.export import convert_checkpoint, load_checkpoint_file
from clora_ds.export.convert import main as convert_main
from conftest import ROOT, SCRIPTS, child_env, deepspeed_cmd, run_checked, tree_hash
from test_train import CFG, launch

CONVERT = str(ROOT / "launch" / "convert_to_peft.py")
TARGETS = "q_proj,k_proj,v_proj,o_proj"  # the same adapter shapes on the tiny base and on the wide-MLP base
RUN = dict(max_steps=3, save_steps=2, target_modules=TARGETS)
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "clora_config.json"]


def _run(tmp_path_factory, name):
    return tmp_path_factory.mktemp(name) / "run"


@pytest.fixture(scope="module")
def zero2_run(tiny_model_dir, tmp_path_factory):
    out = _run(tmp_path_factory, "zero2")
    launch(tiny_model_dir, out, config="zero2.json", **RUN)
    return out


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dir, tmp_path_factory):
    out = _run(tmp_path_factory, "zero3")
    launch(tiny_model_dir, out, config="zero3.json", **RUN)
    return out


@pytest.fixture(scope="module")
def single_rank_run(tiny_model_dir, tmp_path_factory):
    """The same training on one rank, under ZeRO-1 (so stage 1 is read too): its two micro-batches of 2 per step
    are the two ranks' micro-batches of the 2-rank runs, so only where gradients are summed differs."""
    out = _run(tmp_path_factory, "single")
    zero1 = json.loads((CFG / "zero2.json").read_text())
    zero1["zero_optimization"]["stage"] = 1
    config = out.parent / "zero1.json"
    config.write_text(json.dumps(zero1))
    launch(tiny_model_dir, out, ranks=1, config=config, per_device_train_batch_size=2, gradient_accumulation_steps=2, **RUN)
    return out


def convert(ckpt, out, **kw):
    return convert_checkpoint(ckpt, out, log=lambda _: None, **kw)


def load_base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def peft_logits(model_dir, adapter_dir, input_ids):
    """Logits of plain PEFT on the converted adapter, and of the bare base (to show the adapter matters)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        with_adapter = model(input_ids=input_ids).logits
        with model.disable_adapter():
            without = model(input_ids=input_ids).logits
    return with_adapter, without


def cli(capsys, *args):
    """clora-ds-convert in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # drop what the test itself printed before
    code = convert_main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, out, *args, expect):
    """Exit 2, one 'error:' line that says `expect`, no traceback, nothing (not even a temp dir) left behind."""
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    code, stdout, stderr = cli(capsys, *args)
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("error: ") and stderr.count("error:") == 1 and "Traceback" not in stderr, stderr
    assert expect in stderr, stderr
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert after == before, f"left behind: {set(after) ^ set(before)}"
    return stderr


# ---------------------------------------------------------------------------------------------------
# the adapter reproduces the engine
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_logits(zero2_run, zero3_run, tmp_path_factory):
    """{stage: {"input_ids", "logits"}}: the training engine at step 2, restored from the checkpoint by DeepSpeed."""
    out = tmp_path_factory.mktemp("engine_logits")
    ckpts = {"zero2": zero2_run / "checkpoint-2", "zero3": zero3_run / "checkpoint-2"}
    run_checked(deepspeed_cmd(2) + [str(SCRIPTS / "engine_logits.py"), "--out", str(out)] + [str(c) for c in ckpts.values()])
    return {stage: torch.load(out / f"{i}.pt", weights_only=True) for i, stage in enumerate(ckpts)}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_adapter_reproduces_the_engine_logits(stage, request, engine_logits, tiny_model_dir, tmp_path):
    run = request.getfixturevalue(f"{stage}_run")
    result = convert(run / "checkpoint-2", tmp_path / "adapter")
    assert result.layout.zero_stage == int(stage[-1]) and result.layout.world_size == 2 and result.dtype == "fp32"
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ADAPTER_FILES
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 4 * 2 and all(t.numel() > 0 and t.dtype == torch.float32 for t in tensors.values())
    engine = engine_logits[stage]
    got, base_only = peft_logits(tiny_model_dir, tmp_path / "adapter", engine["input_ids"])
    assert (got - engine["logits"]).abs().max().item() < 1e-5
    assert (base_only - engine["logits"]).abs().max().item() > 1e-3, "the trained adapter must change the logits"


@pytest.mark.slow
def test_launcher_final_adapter_is_the_converted_final_checkpoint(zero3_run, tmp_path):
    result = convert(zero3_run / "checkpoint-3", tmp_path / "adapter", verify=True)
    assert result.verification.max_abs_diff < 1e-6
    mine, launcher = tmp_path / "adapter", zero3_run / "adapter"
    assert sorted(p.name for p in launcher.iterdir()) == ADAPTER_FILES
    a, b = load_file(str(mine / "adapter_model.safetensors")), load_file(str(launcher / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in a)  # PEFT's file keys: no adapter name
    cfg, launcher_cfg = (json.loads((d / "adapter_config.json").read_text()) for d in (mine, launcher))
    for c in (cfg, launcher_cfg):
        c["target_modules"] = sorted(c["target_modules"])  # PEFT stores a set: its JSON order varies
    assert cfg == launcher_cfg
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["inference_mode"] is True
    assert (mine / "clora_config.json").read_text() == (launcher / "clora_config.json").read_text()
    card = (mine / "README.md").read_text()
    settings = json.loads((zero3_run / "train_config.json").read_text())["arguments"]
    last = [json.loads(l) for l in (zero3_run / "metrics.jsonl").read_text().splitlines()][-1]
    for expected in (f"base_model: {settings['model_name_or_path']}", settings["train_file"], "| LoRA r / α | 4 / 8 ",
                     "| CLoRA k / λ | 5 / 1 ", "| steps | 3 ", f"{last['task_loss']:.4f}", "2 rank(s), ZeRO-3, fp32"):
        assert expected in card, expected


@pytest.mark.slow
def test_one_and_two_ranks_convert_to_equal_adapters(single_rank_run, zero2_run, zero3_run, tmp_path):
    adapters = {}
    for name, run in (("1 rank ZeRO-1", single_rank_run), ("2 ranks ZeRO-2", zero2_run), ("2 ranks ZeRO-3", zero3_run)):
        convert(run / "checkpoint-3", tmp_path / name)
        adapters[name] = load_file(str(tmp_path / name / "adapter_model.safetensors"))
    ref = adapters["1 rank ZeRO-1"]
    assert max(t.abs().max().item() for k, t in ref.items() if "lora_B" in k) > 1e-3  # trained, not the zero init
    diffs = {}
    for name in ("2 ranks ZeRO-2", "2 ranks ZeRO-3"):
        assert adapters[name].keys() == ref.keys()
        diffs[name] = torch.cat([(adapters[name][k] - ref[k]).abs().flatten() for k in ref])
    assert diffs["2 ranks ZeRO-2"].max().item() <= 1e-6
    # ZeRO-3 sums gradients in another order (its step-1 grad norm differs in the 8th digit); Adam turns that
    # into up to ~6e-6 on the few weights whose gradient nearly cancels. Conversion adds nothing (see the
    # logits test); all but a handful of the 3,392 numbers agree to 1e-6.
    z3 = diffs["2 ranks ZeRO-3"]
    assert (z3 <= 1e-6).float().mean().item() >= 0.99 and z3.max().item() <= 1e-4, z3.max().item()


# ---------------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_merge_equals_peft_merge_and_unload(zero2_run, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoTokenizer

    sharded = tmp_path / "base-sharded"  # the same base, in several safetensors shards
    load_base(tiny_model_dir).save_pretrained(str(sharded), max_shard_size="20KB")
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy2(f, sharded / f.name)
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    convert(zero2_run / "checkpoint-3", adapter)
    code, stdout, stderr = cli(capsys, zero2_run / "checkpoint-3", merged, "--merge", "--base_model", sharded, "--verify")
    assert code == 0, stderr
    assert "verify: max |Δlogit| = " in stdout and ": ok" in stdout, stdout
    assert sorted(p.name for p in merged.glob("*.safetensors")) == shards
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    AutoTokenizer.from_pretrained(str(merged))  # tokenizer files came along

    expected = PeftModel.from_pretrained(load_base(tiny_model_dir), str(adapter)).merge_and_unload().state_dict()
    got = {}
    for shard in shards:
        got.update(load_file(str(merged / shard)))
    assert got.keys() == expected.keys()
    assert max((got[k] - expected[k]).abs().max().item() for k in got) < 1e-5
    base = load_base(tiny_model_dir).state_dict()
    changed = sorted(k for k in got if not torch.equal(got[k], base[k]))
    assert len(changed) == 2 * 4 and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in changed)


# ---------------------------------------------------------------------------------------------------
# memory does not follow the base model
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_base_run(tiny_model_dir, tmp_path_factory):
    """A base with >1000x the frozen numbers of the tiny one (a 300,000-wide MLP, not adapted) and the same
    adapted modules: the adapter has the same tensors and shapes."""
    from clora_ds.tiny import build_tiny_llama

    root = tmp_path_factory.mktemp("wide")
    model = build_tiny_llama(load_base(tiny_model_dir).config.vocab_size, seed=0, intermediate_size=300_000)
    model.save_pretrained(str(root / "model"))
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy2(f, root / "model" / f.name)
    del model
    out = root / "run"
    launch(root / "model", out, config="zero3.json", max_steps=1, per_device_train_batch_size=1, max_seq_length=128,
           target_modules=TARGETS)
    return root / "model", out


def peak_rss_of_conversion(ckpt, out):
    """Peak RSS (bytes) of `python launch/convert_to_peft.py CKPT OUT`, as the kernel accounts it."""
    proc = run_checked([sys.executable, str(SCRIPTS / "peak_rss.py"), sys.executable, CONVERT, str(ckpt), str(out)], timeout=600)
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_the_base_model(zero3_run, tiny_model_dir, wide_base_run, tmp_path):
    wide_model, wide_run = wide_base_run
    frozen = {}
    for name, model_dir in (("tiny", tiny_model_dir), ("wide", wide_model)):
        frozen[name] = sum(p.numel() for p in load_base(model_dir).parameters())
    assert frozen["wide"] >= 10 * frozen["tiny"]
    small = load_file(str(zero3_run / "adapter" / "adapter_model.safetensors"))
    large = load_file(str(wide_run / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in small.items()} == {k: v.shape for k, v in large.items()}  # identical adapters
    rss_tiny = peak_rss_of_conversion(zero3_run / "checkpoint-3", tmp_path / "tiny")
    rss_wide = peak_rss_of_conversion(wide_run / "checkpoint-1", tmp_path / "wide")
    base_bytes = 4 * frozen["wide"]
    # reading the wide base even once would add its ~290 MB of fp32 weights to a ~0.44 GB process
    assert base_bytes > 0.4 * rss_tiny
    assert abs(rss_wide - rss_tiny) <= 0.2 * rss_tiny, (rss_tiny, rss_wide, base_bytes)


# ---------------------------------------------------------------------------------------------------
# checkpoint forms, dtype, bad input
# ---------------------------------------------------------------------------------------------------
def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_checkpoint_forms_and_dtype(zero3_run, tmp_path, capsys):
    ref = load_file(str(zero3_run / "adapter" / "adapter_model.safetensors"))

    # a plain DeepSpeed layout: a parent whose `latest` names global_step3, DeepSpeed's files only
    parent = tmp_path / "ds"
    (parent / "global_step3").mkdir(parents=True)
    for f in (zero3_run / "checkpoint-3").glob("*_states.pt"):
        shutil.copy2(f, parent / "global_step3" / f.name)
    (parent / "latest").write_text("global_step3")
    assert_refused(capsys, tmp_path / "a", parent, tmp_path / "a", expect="Pass --clora_config FILE")
    code, stdout, stderr = cli(capsys, parent, tmp_path / "a", "--clora_config", zero3_run / "adapter" / "clora_config.json")
    assert code == 0, stderr
    assert "step 3, ZeRO-3, 2 rank(s)" in stdout  # the step is DeepSpeed's own global_steps
    got = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert "not recorded" in (tmp_path / "a" / "README.md").read_text()

    # default dtype = the training precision (train_config.json in the checkpoint); --dtype overrides it
    bf16 = copy_checkpoint(zero3_run / "checkpoint-3", tmp_path / "bf16" / "checkpoint-3")
    settings = json.loads((bf16 / "train_config.json").read_text())
    settings["arguments"]["bf16"] = True
    (bf16 / "train_config.json").write_text(json.dumps(settings))
    assert convert(bf16, tmp_path / "b").dtype == "bf16"
    got = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k].bfloat16()) for k in ref)
    convert(bf16, tmp_path / "c", dtype="fp16")
    assert all(t.dtype == torch.float16 for t in load_file(str(tmp_path / "c" / "adapter_model.safetensors")).values())

    # an incomplete checkpoint (no COMPLETE marker) is refused, unless asked for
    partial = copy_checkpoint(zero3_run / "checkpoint-2", tmp_path / "partial" / "checkpoint-2")
    (partial / "COMPLETE").unlink()
    msg = assert_refused(capsys, tmp_path / "d", partial, tmp_path / "d", expect=f"{partial} is incomplete")
    assert "--allow_incomplete" in msg
    code, stdout, stderr = cli(capsys, partial, tmp_path / "d", "--allow_incomplete")
    assert code == 0 and "warning:" in stdout, stderr


@pytest.mark.slow
def test_bad_input_is_one_clear_message_and_nothing_written(zero3_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out" / "adapter"
    out.parent.mkdir()
    good = zero3_run / "checkpoint-3"

    msg = assert_refused(capsys, out, tiny_model_dir, out, expect=f"{tiny_model_dir} is not a DeepSpeed checkpoint: expected")
    assert "found config.json" in msg and "tokenizer.model" in msg
    msg = assert_refused(capsys, out, zero3_run, out, expect="looks like a training output directory")
    assert str(zero3_run / "checkpoint-3") in msg

    truncated = copy_checkpoint(good, tmp_path / "truncated" / "checkpoint-3")
    victim = truncated / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert_refused(capsys, out, truncated, out, expect=f"{victim} is truncated or corrupted")

    missing = copy_checkpoint(good, tmp_path / "missing" / "checkpoint-3")
    (missing / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert_refused(capsys, out, missing, out,
                   expect="written by 2 ranks, but the optimizer-state file of rank(s) 1 is missing: zero_pp_rank_1_mp_rank_00_optim_states.pt")

    # the same checkpoint with its trainable parameters not named as LoRA weights (e.g. a full fine-tune)
    no_lora = copy_checkpoint(good, tmp_path / "no_lora" / "checkpoint-3")
    for f in no_lora.glob("*_model_states.pt"):
        state = load_checkpoint_file(f)
        state["param_shapes"] = [{k.replace(".lora_", ".adapter_"): v for k, v in group.items()} for group in state["param_shapes"]]
        torch.save(state, f)
    assert_refused(capsys, out, no_lora, out, expect=f"{no_lora} holds no LoRA weights: its 16 trainable parameter(s)")

    # an adapter written inside the checkpoint it is read from is refused; the checkpoint stays as it was
    inside = copy_checkpoint(good, tmp_path / "inside" / "checkpoint-3")
    before = tree_hash(inside)
    assert_refused(capsys, inside / "adapter", inside, inside / "adapter",
                   expect=f"OUT_DIR {inside / 'adapter'} is inside the checkpoint {inside} it is converted from")
    assert tree_hash(inside) == before

    # an existing OUT_DIR is refused and left alone; --overwrite replaces it
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_refused(capsys, out, good, out, expect=f"{out} already exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"

    # a result that fails --verify is not published: the old OUT_DIR stays as it was
    assert_refused(capsys, out, good, out, "--overwrite", "--verify", "--dtype", "bf16", "--verify_tolerance", "0",
                   expect="verification failed: max |Δlogit| = ")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    # --merge onto a base whose shapes do not fit
    from clora_ds.tiny import build_tiny_llama

    other = tmp_path / "other-base"
    build_tiny_llama(200, hidden_size=48, num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(other))
    msg = assert_refused(capsys, out, good, out, "--overwrite", "--merge", "--base_model", other,
                         expect=f"--base_model {other} does not fit the adapter")
    assert "model.layers.0.self_attn.q_proj.weight is [48, 48] in the base, the adapter needs [40, 40]" in msg
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    code, stdout, stderr = cli(capsys, good, out, "--overwrite")
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ADAPTER_FILES, stderr
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no temporary directory left


def test_unpickling_is_restricted_to_deepspeed_classes(tmp_path):
    """A pickle naming anything else (here os.system, via a crafted object) is refused before it runs."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": Payload()}, bad)
    from clora_ds.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"refusing to unpickle .* it names (posix|os)\.system"):
        load_checkpoint_file(bad)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("entry", ["console script", "launch/convert_to_peft.py"])
def test_entry_points_report_errors_without_traceback(entry, tmp_path):
    script = shutil.which("clora-ds-convert")
    assert script or entry != "console script", "`pip install -e .` registers clora-ds-convert (setup.py entry_points)"
    cmd = [script] if entry == "console script" else [sys.executable, CONVERT]
    proc = subprocess.run(cmd + [str(tmp_path / "nope"), str(tmp_path / "out")], capture_output=True, text=True,
                          env=child_env(), timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'nope'}: no such directory", proc.stderr
    assert not (tmp_path / "out").exists()
