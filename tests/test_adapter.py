"""attach_clora on a tiny LLaMA, single process, against a float64 plain-autograd reference."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clora_ds import CLoRAConfig, attach_clora, save_clora_adapter
from clora_ds.adapter import PEFT_PREFIX
from clora_ds.subspace import build_module_subspaces

from conftest import child_env, counting_penalty


def load(model_dir, dtype=torch.float64):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)


def clora_model(model_dir, dtype=torch.float64, randomize_b=True, **cfg):
    torch.manual_seed(0)
    model = attach_clora(load(model_dir, dtype), CLoRAConfig(**{"r": 4, "alpha": 8, "k": 6, "lam": 0.7, "dropout": 0.0, "target_modules": "all-linear", **cfg}))
    if randomize_b:  # B = 0 at init would make half of every check trivial
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return model.train()


def reference_penalty(model):
    """R = Σ ½‖A P_in‖² + ½‖Bᵀ P_out‖², plain autograd in float64, straight from the parameters."""
    modules = dict(model.named_modules())
    total = 0
    for name, s in model.clora.subspaces.items():
        layer = modules[PEFT_PREFIX + name]
        a = layer.lora_A["default"].weight.double()
        b = layer.lora_B["default"].weight.double()
        total = total + 0.5 * (a @ s.p_in.double()).pow(2).sum() + 0.5 * (b.t() @ s.p_out.double()).pow(2).sum()
    return total


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_rel(got, ref):
    return max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)


def input_ids(vocab, batch=2, seq=13, seed=0):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def reference_grads(tiny_model_dir):
    model = clora_model(tiny_model_dir)
    model.clora.remove()  # plain autograd only
    ids = input_ids(model.config.vocab_size, batch=4)
    out = model(input_ids=ids, labels=ids)
    loss = out.loss + 0.7 * reference_penalty(model)
    loss.backward()
    return loss.item(), reference_penalty(model).item(), grads(model)


@pytest.mark.parametrize("checkpointing", ["none", "reentrant", "nonreentrant"])
@pytest.mark.parametrize("accum", [1, 2])
def test_gradients_match_fp64_reference(tiny_model_dir, reference_grads, checkpointing, accum):
    ref_loss, ref_penalty, ref_grads = reference_grads
    model = clora_model(tiny_model_dir)
    if checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    ids = input_ids(model.config.vocab_size, batch=4)
    total = 0.0
    for chunk in ids.chunk(accum):
        out = model(input_ids=chunk, labels=chunk)
        loss = model.clora.penalty_term(out.loss)
        (loss / accum).backward()
        total += loss.item() / accum
    assert abs(model.clora.last_penalty.item() - ref_penalty) / ref_penalty < 1e-12
    # transformers computes the task loss in float32 even for a float64 model: splitting the batch
    # moves the *reported* loss at fp32 rounding; gradients flow in float64 and must match tightly
    assert abs(total - ref_loss) / ref_loss < (1e-10 if accum == 1 else 1e-6)
    assert max_rel(grads(model), ref_grads) < 1e-9


def test_penalty_counted_once_with_two_forwards_in_eval_between(tiny_model_dir):
    model = clora_model(tiny_model_dir)
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        model.eval()
        model(input_ids=ids)
        model.train()
    out = model(input_ids=ids, labels=ids)
    model.clora.penalty_term(out.loss)
    assert abs(model.clora.last_penalty.item() - reference_penalty(model).item()) < 1e-12


def test_backward_without_penalty_term_is_a_clear_error(tiny_model_dir):
    model = clora_model(tiny_model_dir)
    ids = input_ids(model.config.vocab_size)
    out = model(input_ids=ids, labels=ids)
    with pytest.raises(RuntimeError, match="before the penalty term"):
        out.loss.backward()


def _train(model, steps, use_penalty, task_weight=1.0, lr=1e-2, opt_cls=torch.optim.AdamW):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(params, lr=lr)
    for step in range(steps):
        ids = input_ids(model.config.vocab_size, seed=step)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss * task_weight
        if use_penalty:
            loss = model.clora.penalty_term(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _subspace_norms(model):
    modules = dict(model.named_modules())
    a_norm = b_norm = 0.0
    for name, s in model.clora.subspaces.items():
        layer = modules[PEFT_PREFIX + name]
        a_norm += (layer.lora_A["default"].weight.double() @ s.p_in.double()).norm().item()
        b_norm += (layer.lora_B["default"].weight.double().t() @ s.p_out.double()).norm().item()
    return a_norm, b_norm


def test_lambda_zero_is_exactly_plain_lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = clora_model(tiny_model_dir, dtype=torch.float32, randomize_b=False, lam=0.0)
    clora_weights = _train(model, steps=3, use_penalty=True)
    torch.manual_seed(0)
    targets = sorted(model.clora.subspaces)
    plain = get_peft_model(load(tiny_model_dir, torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM")).train()
    plain_weights = _train(plain, steps=3, use_penalty=False)
    assert clora_weights.keys() == plain_weights.keys()
    for n in clora_weights:
        assert torch.equal(clora_weights[n], plain_weights[n]), n
    before = _subspace_norms(model)
    assert before[0] > 0.1 and before[1] > 0.01  # plain LoRA leaves weight inside span(P)


def test_large_lambda_without_task_loss_empties_the_subspace(tiny_model_dir):
    model = clora_model(tiny_model_dir, dtype=torch.float32, lam=50.0)
    start = _subspace_norms(model)
    _train(model, steps=40, use_penalty=True, task_weight=0.0, lr=0.01, opt_cls=torch.optim.SGD)
    end = _subspace_norms(model)
    assert end[0] < 1e-3 * start[0] and end[1] < 1e-3 * start[1], (start, end)
    # only the span(P) component is removed: A keeps its weight outside span(P_in)
    a_total = sum(p.norm().item() for n, p in model.named_parameters() if "lora_A" in n)
    assert a_total > 0.5 * start[0]


def test_p_is_not_a_parameter_buffer_or_state(tiny_model_dir):
    model = clora_model(tiny_model_dir, dtype=torch.float32)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("p_in" in n or "p_out" in n or "clora" in n for n in model.state_dict())
    assert not any(b.shape[-1] == 6 and b.dim() == 2 for _, b in model.named_buffers())
    for s in model.clora.subspaces.values():
        assert not s.p_in.requires_grad and not s.p_out.requires_grad


def test_k_larger_than_a_module_names_it(tiny_model_dir):
    base = load(tiny_model_dir, torch.float32)
    # GQA: k_proj / v_proj are 40 -> 20, so k = 25 fits q/o/mlp but not k/v
    with pytest.raises(ValueError) as err:
        attach_clora(base, CLoRAConfig(k=25))
    msg = str(err.value)
    assert "k=25" in msg and "model.layers.0.self_attn.k_proj (out=20, in=40)" in msg and "Use k <= 20" in msg
    assert not any("lora_" in n for n, _ in base.named_modules()), "nothing may be changed before the error"


def test_unmatched_targets_list_candidates(tiny_model_dir):
    base = load(tiny_model_dir, torch.float32)
    with pytest.raises(ValueError) as err:
        attach_clora(base, CLoRAConfig(k=4, target_modules="q_proj,qkv_proj"))
    msg = str(err.value)
    assert "['qkv_proj'] match no linear layer" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    assert "lm_head" not in msg.split("candidate names are:")[1]


@pytest.mark.parametrize("p_init", ["svd_major", "svd_minor"])
def test_svd_init_uses_the_frozen_weight(tiny_model_dir, p_init):
    model = attach_clora(load(tiny_model_dir, torch.float32), CLoRAConfig(k=3, p_init=p_init, target_modules="up_proj"))
    name = "model.layers.1.mlp.up_proj"
    w = dict(model.named_modules())[PEFT_PREFIX + name].get_base_layer().weight.detach().double()
    u, _, vh = torch.linalg.svd(w, full_matrices=True)
    expect_in = vh.T[:, :3] if p_init == "svd_major" else vh.T[:, -3:]
    got = model.clora.subspaces[name].p_in.double()
    assert torch.allclose(got @ got.T, expect_in @ expect_in.T, atol=1e-5)


def test_saved_adapter_loads_with_plain_peft_in_a_fresh_process(tiny_model_dir, tmp_path):
    model = clora_model(tiny_model_dir, dtype=torch.float32, k=5, lam=1.5, target_modules="q_proj,v_proj,down_proj")
    _train(model, steps=2, use_penalty=True)
    model.eval()
    ids = input_ids(model.config.vocab_size, batch=2, seq=11, seed=9)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = save_clora_adapter(model, tmp_path / "adapter")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "clora_config.json"]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 3 * 2 and all("lora_A" in k or "lora_B" in k for k in tensors)
    saved_cfg = CLoRAConfig.load(out)
    assert saved_cfg == model.clora.config
    # P is rebuildable from the saved settings alone
    p_in, p_out = build_module_subspaces("model.layers.0.mlp.down_proj", (40, 72), saved_cfg)
    assert torch.equal(p_in, model.clora.subspaces["model.layers.0.mlp.down_proj"].p_in)

    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained({str(tiny_model_dir)!r}, dtype=torch.float32)
model = PeftModel.from_pretrained(base, {str(out)!r}).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})
assert not any(m.startswith('clora_ds') for m in sys.modules), 'clora_ds was imported'
"""
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env(), capture_output=True, timeout=300)
    got = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert (got - expected).abs().max().item() < 1e-5
    with pytest.raises(FileExistsError):
        save_clora_adapter(model, out)


@pytest.mark.parametrize("checkpointing, per_module", [("none", 1), ("nonreentrant", 1), ("reentrant", 2)])
def test_penalty_evaluations_per_step(tiny_model_dir, monkeypatch, checkpointing, per_module):
    """Once per module and step; reentrant needs a second one (its forward runs without grad, so the
    gradient tap is made in the recompute). A non-reentrant recompute must not redo it."""
    import clora_ds.adapter as adapter_module

    calls = []
    Counting = counting_penalty(calls)

    monkeypatch.setattr(adapter_module, "SubspacePenalty", Counting)
    model = clora_model(tiny_model_dir)
    if checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    ids = input_ids(model.config.vocab_size)
    model.clora.penalty_term(model(input_ids=ids, labels=ids).loss).backward()
    assert len(calls) == per_module * 2 * len(model.clora.subspaces)


def test_sharded_p_is_the_unsharded_p_split_by_columns(tiny_model_dir):
    """Every rank's share of P, put back together, is the unsharded P bit for bit; each rank holds ~1/W of it."""
    from clora_ds.adapter import shard_columns

    def subspaces(shard=None, k=7):
        return attach_clora(load(tiny_model_dir, torch.float32), CLoRAConfig(r=2, k=k, dropout=0.0, target_modules="all-linear"),
                            shard=shard).clora

    for world in (2, 3):
        full = subspaces()
        shards = [subspaces((r, world)) for r in range(world)]
        for name, sub in full.subspaces.items():
            for side in ("p_in", "p_out"):
                joined = torch.cat([getattr(s.subspaces[name], side) for s in shards], dim=1)
                assert torch.equal(joined, getattr(sub, side)), (world, name, side)
        sizes = [s.p_nbytes for s in shards]
        per_column = full.p_nbytes / 7
        assert sum(sizes) == full.p_nbytes and max(sizes) - min(sizes) <= per_column * 1.0001
        assert all(abs(size - full.p_nbytes / world) <= per_column for size in sizes)
    assert [shard_columns(5, r, 2) for r in range(2)] == [slice(0, 3), slice(3, 5)]
    assert [shard_columns(2, r, 3) for r in range(3)] == [slice(0, 1), slice(1, 2), slice(2, 2)]  # k < W: some empty
