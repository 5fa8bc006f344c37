"""QLoRA: a 4-bit (NF4) base with bitsandbytes, CLoRA on top, 8-bit / paged optimizers as DeepSpeed client optimizers,
under one process, ZeRO-2 and ZeRO-3 with 2 CPU ranks; resume, export, merge. bitsandbytes runs on the CPU here."""
import json
import os
import sys

import pytest
import torch

from conftest import DATA, ROOT, run_checked
from test_run_safety import assert_one_error, run_launchers
from test_train import launch, losses

try:
    import bitsandbytes  # noqa: F401
except ImportError:  # CI installs it (the [dev] extra): there, a missing bitsandbytes is a failure, not a skip
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("bitsandbytes is not installed: pip install 'clora_ds[qlora]'", allow_module_level=True)
QLORA = dict(load_in_4bit="true", optim="paged_adamw_8bit", max_steps=4, save_steps=2)


@pytest.fixture(scope="module")
def qlora_single(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "single"
    proc = launch(tiny_model_dir, out, ranks=1, **QLORA)
    return out, proc


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_qlora_trains_the_same_on_one_process_zero2_and_zero3(config, qlora_single, tiny_model_dir, tmp_path):
    single, single_proc = qlora_single
    assert "base: 4-bit nf4" in single_proc.stdout and "PagedAdamW8bit" in single_proc.stdout
    out = tmp_path / "run"
    proc = launch(tiny_model_dir, out, config=config, **QLORA)
    assert f"world size 2; ZeRO stage {config[4]}" in proc.stdout
    got, ref = losses(out), losses(single)
    assert len(got) == len(ref) == 4
    # the same global batches and the same 8-bit optimizer; ranks sum gradients in another order (~1e-7), which the
    # 8-bit state's block quantization can round differently: a looser bound on the weights than on the losses
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)
    from safetensors.torch import load_file

    mine, theirs = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, single))
    assert mine.keys() == theirs.keys() and all(mine[k].numel() > 0 for k in mine)
    assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) < 1e-3


@pytest.mark.slow
def test_qlora_under_zero3_keeps_the_4bit_weights_intact(tiny_model_dir, tmp_path):
    """At a learning rate that cannot move the LoRA weights, the loss on one repeated batch stays exactly constant:
    the 4-bit base is not repacked or corrupted by bitsandbytes (eval mode) or ZeRO-3's partitioning."""
    data = tmp_path / "one.jsonl"
    data.write_text("".join([(DATA / "alpaca_tiny.jsonl").read_text().splitlines()[0].strip() + "\n"] * 16))
    out = tmp_path / "run"
    launch(tiny_model_dir, out, config="zero3.json", train_file=data, learning_rate=1e-30, load_in_4bit="true",
           optim="paged_adamw_8bit", max_steps=4)
    got = losses(out)
    assert len(got) == 4 and len(set(got)) == 1, got


@pytest.mark.slow
def test_qlora_resumes_after_sigkill_with_the_same_losses(qlora_single, tiny_model_dir, tmp_path):
    single, _ = qlora_single
    out = tmp_path / "run"
    crashed = launch(tiny_model_dir, out, ranks=1, check=False, env={"CLORA_DS_FAULT": "kill_after_save:2"}, **QLORA)
    assert crashed.returncode != 0 and (out / "checkpoint-2" / "COMPLETE").is_file()
    proc = launch(tiny_model_dir, out, ranks=1, resume_from_checkpoint="auto", **QLORA)
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in proc.stdout
    assert max(abs(a - b) for a, b in zip(losses(out), losses(single))) <= 1e-6


@pytest.mark.slow
def test_qlora_adapter_loads_in_plain_peft_on_4bit_and_full_bases_and_merges(qlora_single, tiny_model_dir, tmp_path):
    single, _ = qlora_single
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import PeftModel
ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
out = {{}}
for name, kw in (("4bit", dict(quantization_config=q)), ("full", {{}})):
    base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32, **kw).eval()
    for m in base.modules():  # what docs/training.md tells plain-PEFT users: the tiny model's shapes are ones that
        m.support_avx512bf16_for_cpu = False  # bitsandbytes' AVX512-BF16 repack cannot take (harmless elsewhere)
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, {str(single / 'adapter')!r}).eval()
        out[name] = (model(input_ids=ids).logits - plain).abs().max().item()
assert not any(m.startswith("clora_ds") for m in sys.modules)
print("DELTA", out["4bit"], out["full"])
"""
    proc = run_checked([sys.executable, "-c", code], timeout=600)
    delta_4bit, delta_full = map(float, proc.stdout.split("DELTA")[1].split())
    assert delta_4bit > 0 and delta_full > 0  # the adapter changes the outputs of both bases
    merged = tmp_path / "merged"
    proc = run_checked([sys.executable, str(ROOT / "launch" / "convert_to_peft.py"), str(single / "checkpoint-4"),
                        str(merged), "--merge", "--verify"], timeout=600)
    assert "verify: max |Δlogit|" in proc.stdout and ": ok" in proc.stdout
    assert "against the 4-bit (nf4) base the adapter was trained on: max |Δlogit|" in proc.stdout
    card = (merged / "README.md").read_text()
    assert "trained on a 4-bit (nf4) base" in card


def _4bit_logits(model_dir, ids, mode, as_trained):
    """(logits [2, 12, vocab], layers bitsandbytes repacked) of a forward without gradients of the 4-bit base."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from clora_ds.model import keep_4bit_cpu_forward_as_trained

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, quantization_config=q).train(mode == "train")
    if as_trained:
        assert keep_4bit_cpu_forward_as_trained(model) == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    return logits, sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)


def test_eval_mode_4bit_forward_on_cpu_is_the_training_forward_for_any_shape(tiny_model_dir, tmp_path):
    """bitsandbytes repacks 4-bit weights at an eval-mode CPU forward on AVX512-BF16 CPUs: only for shapes with
    out_features % 32 == 0 and in_features % 64 == 0, and then computing in bf16. clora_ds's eval-mode forwards keep the
    training forward instead: any shape, and exactly the training logits on every CPU."""
    from bitsandbytes.functional import has_avx512bf16
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    multiples = tmp_path / "multiples_of_64"  # the shape rule a 7B meets: 64, 128 and 32 (k/v: 1 head of 32)
    LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(multiples))
    for model_dir in (tiny_model_dir, multiples):  # the tiny model: 40, 72 and 20, none a multiple of 32
        trained, _ = _4bit_logits(model_dir, ids, "train", as_trained=False)
        evaluated, repacked = _4bit_logits(model_dir, ids, "eval", as_trained=True)
        assert repacked == 0 and torch.equal(evaluated, trained), model_dir
    if not has_avx512bf16():
        return  # what follows is bitsandbytes' own path on this CPU feature
    with pytest.raises(AssertionError, match="N must be divisible by block_n"):
        _4bit_logits(tiny_model_dir, ids, "eval", as_trained=False)
    packed, repacked = _4bit_logits(multiples, ids, "eval", as_trained=False)
    assert repacked == 14 and 0 < (packed - trained).abs().max() < 0.05 * trained.abs().max()  # bf16 rounding


def test_svd_major_on_a_4bit_base_spans_the_dequantized_weights_top_singular_vectors(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from clora_ds import CLoRAConfig, attach_clora
    from clora_ds.adapter import dequantized_weight

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, quantization_config=q)
    layer = base.model.layers[0].self_attn.q_proj
    w = dequantized_weight(layer).double()
    full = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).model.layers[0].self_attn.q_proj.weight
    assert 0 < (w - full.double()).abs().max() < 0.1  # really the 4-bit values, close to the originals
    model = attach_clora(base, CLoRAConfig(r=4, k=3, p_init="svd_major", target_modules="q_proj", dropout=0.0))
    sub = model.clora.subspaces["model.layers.0.self_attn.q_proj"]
    u, _, vh = torch.linalg.svd(w)
    # span(P_in) = span of the top-3 right singular vectors of the dequantized W (projectors equal)
    for p, basis in ((sub.p_in.double(), vh[:3].T), (sub.p_out.double(), u[:, :3])):
        assert torch.allclose(p @ p.T, basis @ basis.T, atol=1e-8)


@pytest.mark.slow
def test_qlora_bad_input_is_one_clear_error(tiny_model_dir, tmp_path):
    from conftest import child_env
    from test_train import train_args

    no_bnb = tmp_path / "no_bnb"
    no_bnb.mkdir()
    (no_bnb / "sitecustomize.py").write_text("import sys\nsys.modules['bitsandbytes'] = None\n")
    explicit = tmp_path / "explicit_optimizer.json"
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["optimizer"]["type"] = "AdamW"
    explicit.write_text(json.dumps(cfg))
    base = lambda out, **over: train_args(tiny_model_dir, out, **{"load_in_4bit": "true", **over})  # noqa: E731
    cases = {
        "no_bitsandbytes": (base(tmp_path / "no_bitsandbytes"), {"PYTHONPATH": f"{no_bnb}:{child_env()['PYTHONPATH']}"}),
        "zero3_offload": (base(tmp_path / "zero3_offload", deepspeed=ROOT / "ds_configs" / "zero3_offload.json"), {}),
        "optim_vs_config": (base(tmp_path / "optim_vs_config", deepspeed=explicit, optim="paged_adamw_8bit"), {}),
        "fp16": (base(tmp_path / "fp16", fp16="true"), {}),
        "both": (base(tmp_path / "both", load_in_8bit="true"), {}),
    }
    results = run_launchers(cases, tmp_path)
    expect = {"no_bitsandbytes": "--load_in_4bit needs bitsandbytes", "zero3_offload": "ZeRO-3 parameter offload",
              "optim_vs_config": "optimizer.type='AdamW' in the DeepSpeed config contradicts --optim paged_adamw_8bit",
              "fp16": "--fp16 with a quantized base", "both": "--load_in_4bit and --load_in_8bit are both set"}
    for name, needle in expect.items():
        assert_one_error(results[name], needle)
        assert not (tmp_path / name).exists()
