"""The fused LoRA projection (clora_ds/fused_lora.py): PEFT's numbers in float64, the CLoRA penalty exact (single
process, checkpointing, ZeRO-2 / ZeRO-3 on 2 ranks through the real launcher), a plain PEFT adapter afterwards."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SCRIPTS, deepspeed_cmd, run_checked
from clora_ds import CLoRAConfig, attach_clora
from clora_ds.fused_lora import FusedLoraLinear, fuse_lora_layers, fused_lora_problem


def _peft_layer(bias: bool, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import PretrainedConfig, PreTrainedModel

    class Tiny(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self):
            super().__init__(PretrainedConfig())
            self.proj = torch.nn.Linear(13, 11, bias=bias)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Tiny().double(), LoraConfig(r=3, lora_alpha=7, lora_dropout=dropout, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # PEFT starts B at 0: make every gradient non-trivial
    return layer


@pytest.mark.parametrize("bias", [False, True])
def test_fused_projection_matches_peft_lora_linear_in_float64(bias):
    peft_layer = _peft_layer(bias)
    fused = copy.deepcopy(peft_layer)
    assert fuse_lora_layers({"proj": fused}, "default") == {} and type(fused) is FusedLoraLinear
    x = torch.randn(2, 5, 13, dtype=torch.float64)
    grad = torch.randn(2, 5, 11, dtype=torch.float64)
    results = []
    for layer in (peft_layer, fused):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(grad)
        results.append((y, xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
        assert layer.base_layer.weight.grad is None  # W stays frozen
    for name, got, want in zip(("output", "input grad", "A grad", "B grad"), results[1], results[0]):
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-10, name
    assert results[0][2].abs().max() > 0.1 and results[0][3].abs().max() > 0.1


def test_fused_layer_falls_back_to_peft_where_it_must():
    assert "dropout" in fused_lora_problem(_peft_layer(False, dropout=0.1), "default")
    layer = _peft_layer(False)
    fuse_lora_layers({"proj": layer}, "default")
    x = torch.randn(4, 13, dtype=torch.float64)
    with torch.no_grad():
        base = layer.base_layer(x)
        layer.enable_adapters(False)  # what PeftModel.disable_adapter() does: PEFT's forward, the base alone
        assert torch.equal(layer(x), base)
        layer.enable_adapters(True)
        assert (layer(x) - base).abs().max() > 1e-3


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)


@pytest.mark.parametrize("checkpointing", ["none", "reentrant", "nonreentrant"])
def test_fused_model_gives_the_same_loss_penalty_and_gradients_in_float64(tiny_model_dir, checkpointing):
    base = _tiny(tiny_model_dir)
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got = {}
    for mode in ("off", "auto"):
        torch.manual_seed(7)
        model = attach_clora(copy.deepcopy(base), CLoRAConfig(r=4, alpha=8, dropout=0.0, k=5, lam=0.7,
                                                              target_modules="all-linear"), fused_lora=mode)
        calls = []
        for name, module in model.named_modules():
            if name.endswith(".lora_A.default"):
                module.register_forward_hook(lambda *_: calls.append(1))
        if checkpointing != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
            model.enable_input_require_grads()
        model.train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        for _ in range(2):  # two micro-batches accumulate: the penalty counted once per forward
            out = model(input_ids=ids, labels=ids)
            model.clora.penalty_term(out.loss).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        got[mode] = (out.loss.item(), model.clora.last_penalty.item(), grads, len(calls))
    (loss0, r0, g0, calls0), (loss1, r1, g1, calls1) = got["off"], got["auto"]
    assert calls0 > 0 and calls1 == 0, "the fused path must not call lora_A"
    assert "14 of 14" in attach_clora(copy.deepcopy(base), CLoRAConfig(dropout=0.0, k=3, target_modules="all-linear"),
                                      fused_lora="auto").clora.fused_lora_note
    assert abs(loss0 - loss1) < 1e-12 and abs(r0 - r1) < 1e-12 and r0 > 0
    assert g0.keys() == g1.keys() and len(g0) == 2 * 14
    for name in g0:
        assert (g0[name] - g1[name]).abs().max().item() < 1e-10, name


def test_fused_model_saves_a_plain_peft_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel

    torch.manual_seed(7)
    model = attach_clora(_tiny(tiny_model_dir), CLoRAConfig(r=4, dropout=0.0, k=3, target_modules="q_proj,down_proj"),
                         fused_lora="auto")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.eval()
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(_tiny(tiny_model_dir), str(tmp_path / "adapter")).eval()
    assert not any(isinstance(m, FusedLoraLinear) for m in loaded.modules())
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - want).abs().max().item() < 1e-10


def test_a_4bit_base_keeps_peft_path_and_says_so(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                           bnb_4bit_quant_storage=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, quantization_config=q)
    model = attach_clora(base, CLoRAConfig(r=4, k=3, target_modules="q_proj", dropout=0.0), fused_lora="auto")
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())
    assert "0 of 2 LoRA layers" in model.clora.fused_lora_note and "bitsandbytes" in model.clora.fused_lora_note


def _launcher_runs(stage: int, tiny_model_dir, tmp_path):
    common = {"steps": 3}
    runs = [{"name": "peft", "micro_batch": 2, "grad_accum": 1, "checkpointing": "none", **common},
            {"name": "fused", "micro_batch": 2, "grad_accum": 1, "checkpointing": "none", "fused_lora": "auto", **common},
            {"name": "fused-reentrant-ga2", "micro_batch": 1, "grad_accum": 2, "checkpointing": "reentrant",
             "fused_lora": "auto", **common},
            {"name": "fused-nonreentrant-ga2", "micro_batch": 1, "grad_accum": 2, "checkpointing": "nonreentrant",
             "fused_lora": "auto", "chunked_loss": True, **common}]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    run_checked(deepspeed_cmd(2) + [str(SCRIPTS / "clora_steps.py"), "--backend", "deepspeed", "--zero_stage", str(stage),
                                    "--model", str(tiny_model_dir), "--out", str(tmp_path), "--runs",
                                    str(tmp_path / "runs.json")], timeout=900)
    return {r["name"]: (json.loads((tmp_path / f"{r['name']}.json").read_text()),
                        load_file(str(tmp_path / f"{r['name']}.safetensors"))) for r in runs}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_fused_lora_under_zero_matches_peft_path(stage, tiny_model_dir, tmp_path):
    """fp32, 2 ranks: the fused projection (and, in the last run, the chunked loss too) reaches PEFT's losses, R and
    LoRA weights within 1e-6, without checkpointing and with either kind, with gradient accumulation."""
    results = _launcher_runs(stage, tiny_model_dir, tmp_path)
    (ref_log, ref_w) = results.pop("peft")
    assert ref_log["lora_module_calls"] > 0
    for name, (log, weights) in results.items():
        assert log["lora_module_calls"] == 0, f"ZeRO-{stage} {name}: lora_A / lora_B ran, so nothing was fused"
        for key in ("losses", "penalties"):
            assert len(log[key]) == 3 and max(abs(a - b) for a, b in zip(log[key], ref_log[key])) <= 1e-6, \
                f"ZeRO-{stage} {name}: {key} {log[key]} vs {ref_log[key]}"
        assert weights.keys() == ref_w.keys() and all(weights[k].numel() > 0 for k in weights)
        diff = max((weights[k] - ref_w[k]).abs().max().item() for k in ref_w)
        assert diff <= 1e-6, f"ZeRO-{stage} {name}: LoRA weights differ by {diff}"
    assert ref_log["penalties"][0] > 0 and ref_log["losses"][0] != ref_log["losses"][-1]
