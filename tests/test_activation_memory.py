"""--gradient_checkpointing off | full | selective | every_N and --activation_offloading on the model the launcher builds
(build_model, in process, fp32 tiny LLaMA): the same losses and LoRA gradients as no checkpointing, and the effect
measured: bytes held for backward after the forward (the CPU profiler's allocations), recomputed ops counted in the
backward (a TorchDispatchMode), the saved tensors that went through the offload hook. One 2-rank ZeRO-2 launcher run."""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import clora_ds.adapter as adapter_module
from clora_ds.activation_memory import checkpointing_policy, checkpointing_problems, layer_count_problems
from clora_ds.config import CLoRAConfig
from clora_ds.errors import ConfigError
from clora_ds.model import build_model

from conftest import DATA, ROOT, child_env, counting_penalty, tree_hash

CFG = CLoRAConfig(r=4, alpha=8, k=5, dropout=0.0, target_modules="q_proj,k_proj,v_proj,up_proj,down_proj")
BATCH, SEQ, STEPS, LAYERS = 2, 24, 3, 2
SMALL = BATCH * SEQ * CFG.r * 4 + 1  # offloading threshold here: the [tokens, r] LoRA activations (fp32) stay
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")


class OpCount(TorchDispatchMode):
    """aten calls by name; the ops a selective-checkpoint cache serves never reach it (they do not run)."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.name()] = self.calls.get(func.name(), 0) + 1
        return func(*args, **(kwargs or {}))

    def gemms(self) -> int:
        return sum(self.calls.get(name, 0) for name in GEMMS)


def held_bytes(forward):
    """(forward(), bytes allocated and not freed during it): what the graph holds for backward, plus the loss."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = forward()
    return out, sum(e.self_cpu_memory_usage for e in prof.events())


def train_steps(model_dir, policy="off", offloading=False, fused="auto", input_grads=False):
    """STEPS SGD steps of the launcher's model; per step: loss, LoRA gradients, penalty evaluations, bytes saved through
    autograd's hooks outside the layers' own, GEMM / silu calls in forward and backward; step 0: bytes held after the
    forward; offload statistics."""
    calls = []
    Counting = counting_penalty(calls)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter_module, "SubspacePenalty", Counting)
        model, _ = build_model(str(model_dir), CFG, {"zero_optimization": {"stage": 2}}, "sdpa", torch.float32,
                               gradient_checkpointing=policy, seed=1, fused_lora=fused, activation_offloading=offloading)
        offloader = model.activation_memory.offloader
        if offloader is not None:
            offloader.min_bytes = SMALL
        if input_grads:  # what checkpointing switches on: the backward then has the same GEMMs whatever recomputes
            model.enable_input_require_grads()
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for n, p in model.named_parameters():
                if "lora_B" in n:  # B = 0 at init would leave A's gradient 0
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD(lora.values(), lr=0.5)
        out = {"loss": [], "grads": [], "penalties": [], "saved": [], "fwd": [], "bwd": [], "offload": [], "held": None,
               "modules": len(model.clora.subspaces)}
        for step in range(STEPS):
            ids = torch.randint(3, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
            saved, fwd, bwd = [0], OpCount(), OpCount()
            calls.clear()

            def count(t):
                saved[0] += t.numel() * t.element_size()
                return t

            def forward():
                with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t), fwd:
                    return model.clora.penalty_term(model(input_ids=ids, labels=ids).loss)

            if step == 0:
                loss, out["held"] = held_bytes(forward)
            else:
                loss = forward()
            with bwd:
                loss.backward()
            out["loss"].append(loss.item())
            out["grads"].append({n: p.grad.clone() for n, p in lora.items()})
            out["penalties"].append(len(calls))
            out["saved"].append(saved[0])
            out["fwd"].append(fwd)
            out["bwd"].append(bwd)
            if offloader is not None:
                out["offload"].append(dict(vars(offloader.stats)))
                offloader.stats.reset()
            opt.step()
            opt.zero_grad()
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir):
    cache = {}

    def get(policy="off", offloading=False, fused="auto", input_grads=False):
        key = (policy, offloading, fused, input_grads)
        if key not in cache:
            cache[key] = train_steps(tiny_model_dir, policy, offloading, fused, input_grads)
        return cache[key]

    return get


@pytest.mark.parametrize("policy, offloading, fused", [
    ("full", False, "auto"), ("selective", False, "auto"), ("every_2", False, "auto"), ("off", True, "auto"),
    ("selective", True, "auto"), ("selective", False, "off"), ("every_2", True, "off")])
def test_policy_gives_the_losses_and_lora_gradients_of_no_checkpointing(runs, policy, offloading, fused):
    """fused: the launcher's fused LoRA projection (auto) or PEFT's path (off)."""
    ref, got = runs("off", False, fused), runs(policy, offloading, fused)
    for step in range(STEPS):
        assert abs(got["loss"][step] - ref["loss"][step]) < 1e-6, (step, got["loss"], ref["loss"])
        for name, g in ref["grads"][step].items():
            assert g.abs().max() > 0, name
            assert (got["grads"][step][name] - g).abs().max().item() < 1e-6, (step, name)
    # the CLoRA penalty: once per module (A and B) and step, as without checkpointing
    assert got["penalties"] == ref["penalties"] == [2 * ref["modules"]] * STEPS


def test_memory_held_for_backward_and_recompute_follow_the_policy(runs):
    none, full, selective, every_2 = (runs(p) for p in ("off", "full", "selective", "every_2"))
    held = {name: r["held"] for name, r in [("none", none), ("selective", selective), ("every_2", every_2), ("full", full)]}
    assert held["none"] > held["selective"] > held["full"] > 0, held
    assert held["none"] > held["every_2"] > held["full"], held
    # recomputed GEMMs: the backward's GEMMs beyond those of an uncheckpointed model whose inputs need grad too
    reference = runs("off", input_grads=True)
    base_bwd = reference["bwd"][0].gemms()
    fwd_gemms = none["fwd"][0].gemms()  # decoder layers + the output layer (one GEMM)
    recomputed = {name: r["bwd"][0].gemms() - base_bwd for name, r in [("full", full), ("selective", selective),
                                                                       ("every_2", every_2)]}
    assert recomputed["full"] == fwd_gemms - 1, (recomputed, fwd_gemms)  # every layer's forward again
    assert recomputed["every_2"] * 2 == recomputed["full"], recomputed    # layer 0 of 2
    assert recomputed["selective"] == 0, recomputed                       # no GEMM twice
    for r in (none, full, selective, every_2):
        assert r["fwd"][0].gemms() == fwd_gemms
    # the elementwise ops are what selective recomputes: SwiGLU's silu once per layer, as full does
    silu = {name: r["bwd"][0].calls.get("aten::silu", 0) for name, r in [("none", none), ("full", full),
                                                                        ("selective", selective), ("every_2", every_2)]}
    assert silu == {"none": 0, "full": LAYERS, "selective": LAYERS, "every_2": 1}, silu


@pytest.mark.parametrize("policy", ["off", "full"])
def test_offloading_takes_every_large_saved_tensor_of_the_layers(runs, policy):
    plain, off = runs(policy), runs(policy, offloading=True)
    for step in range(STEPS):
        stats = off["offload"][step]
        through_hook = stats["offloaded_bytes"] + stats["reused_bytes"] + stats["small_bytes"] + stats["params_bytes"]
        # what the layers saved without offloading is exactly what went through the hook (the rest: embedding, norm,
        # output layer and loss, saved outside the layers either way)
        assert plain["saved"][step] - off["saved"][step] == through_hook, (step, stats)
        assert stats["offloaded"] > 0 and stats["largest_small_bytes"] < SMALL
        if policy == "full":  # a checkpointed layer saves its input only: one [B, T, hidden] tensor per layer
            assert stats["offloaded"] == LAYERS and stats["small"] == stats["params"] == 0, stats
        else:  # what stays: the LoRA path's [tokens, r] activations and the frozen weights, never a large activation
            assert stats["small"] > 0 and stats["params"] > 0
            assert stats["offloaded_bytes"] > 2 * stats["small_bytes"], stats


def test_policy_values():
    assert [str(checkpointing_policy(v)) for v in (True, "true", "full", "", "false", False, "off", "selective",
                                                    "every_2", "EVERY_3")] == \
        ["full", "full", "full", "off", "off", "off", "off", "selective", "every_2", "every_3"]
    with pytest.raises(ConfigError, match="choose off, full"):
        checkpointing_policy("every2")
    assert checkpointing_problems("every_0", False) and checkpointing_problems("selective", True)
    assert checkpointing_problems("every_2", True) == [] and checkpointing_problems("full", True) == []
    assert layer_count_problems("every_3", 2) and layer_count_problems("every_2", 2) == []


def test_bad_policies_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    import json
    import subprocess

    from test_train import TRAIN, train_args

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_hash(out)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**json.loads((ROOT / "ds_configs" / "zero2.json").read_text()),
                              "activation_checkpointing": {"cpu_checkpointing": True}}))
    for over, expect in [({"gradient_checkpointing": "sometimes"}, ["--gradient_checkpointing 'sometimes': choose"]),
                         ({"gradient_checkpointing": "every_3", "activation_offloading": "true", "deepspeed": str(ds)},
                          ["has 2 decoder layers", "activation_checkpointing.cpu_checkpointing"])]:
        proc = subprocess.run([sys.executable, TRAIN] + train_args(tiny_model_dir, out, **over), capture_output=True,
                              text=True, timeout=300, env=child_env())
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.count("error:") == 1 and all(e in proc.stderr for e in expect), proc.stderr[-3000:]
        assert tree_hash(out) == before


@pytest.mark.slow
def test_zero2_launcher_run_with_every_2_and_offloading_matches_one_process(tiny_model_dir, tmp_path):
    from test_train import launch, losses, silu_calls

    single, zero2 = tmp_path / "single", tmp_path / "zero2"
    launch(tiny_model_dir, single, ranks=1)
    proc = launch(tiny_model_dir, zero2, profile_steps="2", gradient_checkpointing="every_2", activation_offloading="true")
    assert "activation checkpointing: every_2 (non-reentrant), 1 of 2 decoder layers" in proc.stdout
    assert "activation offloading" in proc.stdout
    assert silu_calls(zero2) == LAYERS + 1  # both layers' forwards, layer 0's again in backward
    got, ref = losses(zero2), losses(single)
    assert len(got) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)
