"""CUDA-only paths (skipped without a GPU): bf16 penalty, per-sequence SDPA on packed rows, the launcher on one
GPU in bf16 (FusedAdam, NCCL), and flash_attention_2 where the flash-attn package imports.

Each is measured against a float64 CPU reference of the same computation, so a wrong CUDA path cannot pass.
"""
import copy
import json
import sys

import pytest
import torch

from conftest import DATA, ROOT, run_checked

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


def test_penalty_bf16_on_cuda_vs_fp64():
    from clora_ds.penalty import subspace_penalty
    from clora_ds.subspace import random_orthonormal

    torch.manual_seed(0)
    a = torch.randn(32, 4096, dtype=torch.float64)  # lora_A [r, in] at 7B width
    p = random_orthonormal(4096, 512, seed=1)
    ref_a = a.clone().requires_grad_(True)
    ref = 0.5 * (ref_a @ p).pow(2).sum()
    ref.backward()
    for p_dtype in (torch.float32, torch.bfloat16):
        x = a.to("cuda", torch.bfloat16).requires_grad_(True)
        val = subspace_penalty(x, p.to("cuda", p_dtype))
        val.backward()
        assert x.grad.dtype == torch.bfloat16 and x.grad.is_cuda
        assert _rel(val.detach(), ref.detach()) < 1e-2, p_dtype
        assert _rel(x.grad, ref_a.grad) < 1e-2, p_dtype


def _tiny_llama_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(copy.deepcopy(cfg)).double()
    ref.set_attn_implementation("sdpa")
    return cfg, ref


def _packed_batch(lengths, vocab=97, seed=0):
    from clora_ds.batches import collate_packed

    g = torch.Generator().manual_seed(seed)
    rows = [[{"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist(), "labels": [-100] * n} for n in row]
            for row in lengths]
    return rows, collate_packed(rows, pad_id=0)


@pytest.mark.parametrize("attn", ["clora_packed_sdpa", "clora_packed_varlen", "flash_attention_2"])
def test_packed_rows_bf16_cuda_vs_fp64_each_sequence(attn, monkeypatch):
    """Packed bf16 rows on CUDA against each sequence run alone in fp64 on CPU."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from transformers import LlamaForCausalLM

    import clora_ds.attention as attention  # registers clora_packed_sdpa / clora_packed_varlen

    if attn == "clora_packed_varlen" and not attention.varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    calls = []
    real_call = attention._varlen_call
    monkeypatch.setattr(attention, "_varlen_call", lambda *a, **k: calls.append(1) or real_call(*a, **k))

    cfg, ref = _tiny_llama_pair()
    model = LlamaForCausalLM(copy.deepcopy(cfg)).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    model.set_attn_implementation(attn)
    rows, batch = _packed_batch([[5, 300, 3, 17, 1, 90], [600, 2, 2, 8], [40] * 10])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False).logits
        for b, row in enumerate(rows):
            t = 0
            for ex in row:
                n = len(ex["input_ids"])
                alone = ref(input_ids=batch["input_ids"][b:b + 1, t:t + n], use_cache=False).logits[0]
                assert _rel(out[b, t:t + n], alone) < 2e-2, (attn, b, t, n)
                t += n
    # the varlen kernel really ran: one call per layer over the whole packed batch
    assert len(calls) == (cfg.num_hidden_layers if attn == "clora_packed_varlen" else 0)


def test_packed_varlen_gradients_match_fp64_each_sequence():
    """Backward through torch's varlen kernel: bf16 gradients of a packed batch vs the fp64 sum over each sequence alone."""
    from transformers import LlamaForCausalLM

    import clora_ds.attention as attention

    if not attention.varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    cfg, ref = _tiny_llama_pair()
    model = LlamaForCausalLM(copy.deepcopy(cfg)).to("cuda", torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    model.set_attn_implementation(attention.PACKED_VARLEN)
    rows, batch = _packed_batch([[5, 300, 3, 17, 1, 90], [600, 2, 2, 8]], seed=1)
    out = model(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(), use_cache=False).logits
    lse = out.float().logsumexp(-1)
    sum(lse[b, :sum(len(ex["input_ids"]) for ex in row)].sum() for b, row in enumerate(rows)).backward()  # no pads
    total = 0
    for b, row in enumerate(rows):
        t = 0
        for ex in row:
            n = len(ex["input_ids"])
            total = total + ref(input_ids=batch["input_ids"][b:b + 1, t:t + n], use_cache=False).logits.logsumexp(-1).sum()
            t += n
    total.backward()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        got, want = model.get_parameter(name).grad, ref.get_parameter(name).grad
        assert _rel(got, want) < 3e-2, (name, _rel(got, want))


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["auto", "flash_attention_2"])
def test_launcher_bf16_one_gpu_packed(attn, tiny_model_dir, tmp_path):
    """python launch/train.py on one GPU in bf16 with packing: trains, logs GPU memory, writes a full-shape adapter."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    from safetensors.torch import load_file

    import shutil

    from clora_ds.tiny import build_tiny_llama

    # head size 16 (the shared tiny model's 10 is below what flash kernels take, so auto would not pick varlen)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_llama(vocab, hidden_size=64, num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(model_dir))
    out = tmp_path / "run"
    run_checked([sys.executable, str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / "ds_configs" / "zero2.json"),
                 "--model_name_or_path", str(model_dir), "--train_file", str(DATA / "alpaca_tiny.jsonl"),
                 "--output_dir", str(out), "--max_steps", "12", "--learning_rate", "1e-2", "--bf16", "--packing",
                 "--per_device_train_batch_size", "2", "--max_seq_length", "256", "--lora_r", "4", "--lora_alpha", "8",
                 "--clora_k", "5", "--logging_steps", "1", "--save_steps", "6", "--attn_implementation", attn])
    cfg = json.loads((out / "train_config.json").read_text())
    from clora_ds.attention import varlen_available
    from clora_ds.model import flash_attention_available

    auto_choice = ("flash_attention_2" if flash_attention_available()[0] else
                   "clora_packed_varlen" if varlen_available() else "clora_packed_sdpa")
    assert cfg["attention"] == (auto_choice if attn == "auto" else "flash_attention_2")
    assert cfg["deepspeed"]["bf16"]["enabled"] is True
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "task_loss" in l]
    assert len(rows) == 12 and all(r["peak_mem_gb"] > 0 for r in rows)
    first, last = sum(r["task_loss"] for r in rows[:3]) / 3, sum(r["task_loss"] for r in rows[-3:]) / 3
    assert last < first - 0.1, (first, last)
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 and torch.isfinite(t.float()).all() for t in tensors.values())
    assert (out / "checkpoint-6" / "COMPLETE").is_file()
