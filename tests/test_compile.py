"""--compile_layers (clora_ds/compile.py): the weight penalty equals the hooks' in float64 (sharded P included); the
launcher's model with compiled decoder layers gives eager's losses, R and LoRA gradients under every checkpointing
policy, as one graph per layer variant (no graph break) that no later sequence length recompiles; checkpointing still
lowers the memory held for backward; the refusals; one 2-rank ZeRO-2 launcher run.

The backend is inductor, torch.compile's default, where this machine can build its C++ kernels (a C++ compiler and
Python's headers); elsewhere aot_eager (the same Dynamo capture, AOT autograd and checkpoint partitioning, no
code generation), and the tests say which in their assertion messages."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import clora_ds.adapter as adapter_module
from clora_ds import CLoRAConfig, attach_clora
from clora_ds.compile import _cpu_inductor_problem, compile_decoder_layers, compile_problems, compiled_graphs
from clora_ds.model import build_model

from conftest import child_env, counting_penalty, tree_hash

CFG = CLoRAConfig(r=4, alpha=8, k=5, dropout=0.0, lam=0.7, target_modules="q_proj,k_proj,v_proj,up_proj,down_proj")
LENGTHS = (24, 31, 17, 40, 28, 35)  # a padded batch is as long as its longest row: the length changes every step


@pytest.fixture(scope="module")
def backend():
    return "aot_eager" if _cpu_inductor_problem() else "inductor"


def _tiny(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)


def _randomize_b(model, seed=0):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B = 0 at init would leave A's gradient 0
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@pytest.mark.parametrize("fused, lam", [("auto", 0.7), ("off", 0.7), ("auto", 0.0)])
def test_weight_penalty_gives_the_hooks_loss_penalty_and_gradients_in_float64(tiny_model_dir, fused, lam):
    base = _tiny(tiny_model_dir, torch.float64)
    cfg = CLoRAConfig(r=4, alpha=8, k=5, dropout=0.0, lam=lam, target_modules="all-linear")
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got = {}
    for mode in ("hooks", "weights"):
        torch.manual_seed(7)
        model = attach_clora(copy.deepcopy(base), cfg, fused_lora=fused)
        if mode == "weights":
            model.clora.use_weight_penalty(model)
        model.train()
        _randomize_b(model)
        for _ in range(2):  # two micro-batches accumulate: the penalty counted once per forward
            out = model(input_ids=ids, labels=ids)
            model.clora.penalty_term(out.loss).backward()
        got[mode] = (out.loss.item(), model.clora.last_penalty.item(),
                     {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (l0, r0, g0), (l1, r1, g1) = got["hooks"], got["weights"]
    assert r0 > 0 and abs(l0 - l1) < 1e-12 and abs(r0 - r1) < 1e-12, (l0, l1, r0, r1)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 14
    for name in g0:
        assert g0[name].abs().max() > 0 and (g0[name] - g1[name]).abs().max().item() < 1e-10, name


def test_weight_penalty_with_sharded_p_sums_to_the_unsharded_penalty(tiny_model_dir):
    """Each of W ranks takes W·λ·R_r from its share of P's columns; data parallelism averages the gradients."""
    base = _tiny(tiny_model_dir, torch.float64)
    ids = torch.randint(3, base.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    runs = []
    for shard in (None, (0, 2), (1, 2)):
        torch.manual_seed(7)
        model = attach_clora(copy.deepcopy(base), CFG, fused_lora="auto", shard=shard)
        model.clora.use_weight_penalty(model)
        model.train()
        _randomize_b(model)
        model.clora.penalty_term(model(input_ids=ids, labels=ids).loss).backward()
        runs.append((model.clora.last_penalty.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (r, g), (r0, g0), (r1, g1) = runs
    assert r > 0 and abs(r0 + r1 - r) < 1e-12, (r0, r1, r)
    for name in g:
        assert ((g0[name] + g1[name]) / 2 - g[name]).abs().max().item() < 1e-10, name


def _steps(model_dir, policy, backend=None):
    """The launcher's model (build_model, fp32), SGD over LENGTHS: per step loss, R, penalty evaluations, LoRA
    gradients and the graphs compiled so far; graph breaks; bytes held for backward by the forward at LENGTHS[0] after
    the steps (the CPU profiler's allocations: compiling done by then)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from test_activation_memory import held_bytes

    dynamo.reset()
    counters.clear()
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adapter_module, "SubspacePenalty", counting_penalty(calls))
        model, _ = build_model(str(model_dir), CFG, {"zero_optimization": {"stage": 2}}, "sdpa", torch.float32,
                               gradient_checkpointing=policy, seed=1, fused_lora="auto")
        if backend:
            compile_decoder_layers(model, backend)
        _randomize_b(model)
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD(lora.values(), lr=0.5)
        out = {"loss": [], "R": [], "penalties": [], "grads": [], "graphs": []}
        for step, length in enumerate(LENGTHS):
            ids = torch.randint(3, model.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(step))
            calls.clear()
            loss = model.clora.penalty_term(model(input_ids=ids, labels=ids).loss)
            loss.backward()
            out["loss"].append(loss.item())
            out["R"].append(model.clora.last_penalty.item())
            out["penalties"].append(len(calls))
            out["grads"].append({n: p.grad.clone() for n, p in lora.items()})
            out["graphs"].append(compiled_graphs())
            opt.step()
            opt.zero_grad()
        ids = torch.randint(3, model.config.vocab_size, (2, LENGTHS[0]), generator=torch.Generator().manual_seed(0))
        _, out["held"] = held_bytes(lambda: model(input_ids=ids, labels=ids).loss)
        out["breaks"] = sum(counters["graph_break"].values())
        out["modules"] = len(model.clora.subspaces)
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, backend):
    cache = {}

    def get(policy, compiled):
        key = (policy, compiled)
        if key not in cache:
            cache[key] = _steps(tiny_model_dir, policy, backend if compiled else None)
        return cache[key]

    return get


@pytest.mark.parametrize("policy", ["off", "full", "selective"])
def test_compiled_layers_give_eager_numbers_as_one_graph_that_lengths_do_not_recompile(runs, backend, policy):
    ref, got = runs(policy, False), runs(policy, True)
    for step in range(len(LENGTHS)):
        assert abs(got["loss"][step] - ref["loss"][step]) < 1e-5, (backend, step, got["loss"], ref["loss"])
        assert abs(got["R"][step] - ref["R"][step]) < 1e-6 * max(1.0, ref["R"][step]), (backend, step)
        for name, g in ref["grads"][step].items():
            assert g.abs().max() > 0, name
            assert (got["grads"][step][name] - g).abs().max().item() < 1e-5, (backend, step, name)
    # the penalty: once per module (A and B) and step, from the weights
    assert got["penalties"] == ref["penalties"] == [2 * got["modules"]] * len(LENGTHS)
    assert got["breaks"] == 0, (backend, got["breaks"])
    graphs = got["graphs"]
    # step 1 compiles layer 0 (its input needs no gradient) and the others; step 2's new length makes the sequence
    # length symbolic (a second compile); no step after that compiles anything, nor the later forward at LENGTHS[0]
    assert 1 <= graphs[0] < graphs[1] == graphs[-1] <= 4, (backend, graphs)
    assert ref["graphs"] == [0] * len(LENGTHS)


def test_checkpointing_still_lowers_the_memory_held_for_backward_when_compiled(runs, backend):
    held = {policy: runs(policy, True)["held"] for policy in ("off", "selective", "full")}
    assert held["off"] > held["selective"] > held["full"] > 0, (backend, held)
    assert held["off"] <= runs("off", False)["held"] * 1.05, (backend, held["off"], runs("off", False)["held"])


def test_compile_flags_are_checked():
    assert compile_problems(False, "inductor", 3, True, True) == []
    assert "without --compile_layers" in compile_problems(False, "aot_eager", 0, False, False)[0]
    assert "torch" in compile_problems(True, "no_such_backend", 0, False, False)[0]
    found = compile_problems(True, "aot_eager", 3, True, True)
    assert len(found) == 3 and "ZeRO-3" in found[0] and "--activation_offloading" in found[1] and "4bit" in found[2]
    assert compile_problems(True, "aot_eager", 2, False, False) == []


def test_compile_with_zero3_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    from test_train import CFG as CONFIGS, TRAIN, train_args

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = tree_hash(out)
    proc = subprocess.run([sys.executable, TRAIN] + train_args(tiny_model_dir, out, deepspeed=str(CONFIGS / "zero3.json"),
                                                               compile_layers="true", compile_backend="aot_eager"),
                          capture_output=True, text=True, timeout=300, env=child_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("error:") == 1 and "--compile_layers with ZeRO-3" in proc.stderr, proc.stderr[-3000:]
    assert tree_hash(out) == before


@pytest.mark.slow
def test_zero2_launcher_run_with_compiled_layers_matches_eager(tiny_model_dir, tmp_path, backend):
    from test_train import COMMONSENSE, launch, losses

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    launch(tiny_model_dir, eager)
    proc = launch(tiny_model_dir, compiled, compile_layers="true", compile_backend=backend, eval_file=COMMONSENSE,
                  eval_steps=2)
    assert f"torch.compile: 2 decoder layers ({backend};" in proc.stdout + proc.stderr
    got, ref = losses(compiled), losses(eager)
    assert len(got) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-5, (backend, got, ref)
    rows = [json.loads(line) for line in (compiled / "metrics.jsonl").read_text().splitlines()]
    graphs = {r["step"]: r["compiled_graphs"] for r in rows if "task_loss" in r}
    assert sorted(graphs) == [1, 2, 3, 4, 5]
    # steps 3 and 4 (after the first evaluation at step 2) compile nothing; only evaluations add graphs
    assert graphs[1] <= graphs[2] <= graphs[3] == graphs[4] <= graphs[5], graphs
    assert any("eval_loss" in r for r in rows)
