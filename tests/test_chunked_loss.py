"""The chunked causal-LM loss (clora_ds/loss.py): HF's loss and gradients in float64, a peak that falls with the chunk
count (measured), the launcher's losses unchanged with it and the fused projection on; the MFU formula by hand."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clora_ds.profiling import ModelFlops, peak_tflops
from clora_ds.loss import ChunkedCausalLMLoss, allocation_peak, causal_lm_loss, chunked_causal_lm_loss


def _llama(vocab=97, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).train()


def _batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 14), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


def _reference_loss(model, batch, num_items):
    """HF's ForCausalLMLoss formula over the full logits, kept in float64 (HF itself upcasts to float32)."""
    logits = model(input_ids=batch["input_ids"]).logits
    targets = F.pad(batch["labels"], (0, 1), value=-100)[..., 1:].reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=-100, reduction="sum")
    return total / (num_items if num_items is not None else (targets != -100).sum())


@pytest.mark.parametrize("num_items", [None, 23])
@pytest.mark.parametrize("chunk_rows", [1, 5, None])
def test_chunked_loss_and_gradients_equal_hf_full_logits_in_float64(num_items, chunk_rows):
    ref_model = _llama()
    model = copy.deepcopy(ref_model)
    chunked = ChunkedCausalLMLoss.install(model, chunk_rows=chunk_rows)
    batch = _batch(ref_model.config.vocab_size)
    ref = _reference_loss(ref_model, batch, num_items)
    ref.backward()
    got = causal_lm_loss(model, batch, num_items, chunked)
    got.backward()
    assert got.dtype == torch.float64 and abs(got.item() - ref.item()) < 1e-12
    for (name, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert (p.grad - q.grad).abs().max().item() < 1e-10, name
    # HF's own loss (float32 upcast inside) agrees to float32 precision; an unarmed forward still gives logits
    hf = ref_model(**batch, num_items_in_batch=num_items).loss
    assert abs(hf.item() - got.item()) < 1e-6
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, ref_model(input_ids=batch["input_ids"]).logits)


def test_chunked_loss_through_peft_with_clora(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from clora_ds import CLoRAConfig, attach_clora

    models = []
    for _ in range(2):
        torch.manual_seed(7)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64)
        models.append(attach_clora(base, CLoRAConfig(r=4, dropout=0.0, k=3, target_modules="all-linear"),
                                   fused_lora="auto").train())
    chunked = ChunkedCausalLMLoss.install(models[1], chunk_rows=7)
    batch = _batch(models[0].config.vocab_size, seed=1)
    for model, head in zip(models, (None, chunked)):
        model.clora.penalty_term(causal_lm_loss(model, batch, 19, head)).backward()
    for (name, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        if p.requires_grad:
            assert (p.grad - q.grad).abs().max().item() < 1e-6, name  # HF upcasts its logits to float32
    assert models[0].clora.last_penalty.item() == models[1].clora.last_penalty.item()


def test_loss_peak_memory_falls_with_the_chunk_count():
    """Measured: the most bytes alive at once during the loss's forward + backward (torch.profiler's memory timeline)."""
    torch.manual_seed(0)
    vocab, tokens = 8000, 512
    weight = torch.randn(vocab, 32) / 6
    hidden = torch.randn(1, tokens, 32, requires_grad=True)
    labels = torch.randint(0, vocab, (1, tokens))

    def full():
        logits = hidden @ weight.t()
        F.cross_entropy(logits.float().reshape(-1, vocab), F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1),
                        reduction="sum").backward()

    peaks = {"full": allocation_peak(full)}
    for chunks in (1, 4, 16):
        rows = -(-tokens // chunks)
        peaks[chunks] = allocation_peak(lambda: chunked_causal_lm_loss(hidden, weight, labels, None, rows).backward())
    logits_bytes = tokens * vocab * 4
    assert peaks["full"][0] >= 2 * logits_bytes  # HF: the logits and their log-softmax (and the gradient) at once
    assert peaks["full"][0] > peaks[1][0] > peaks[4][0] > peaks[16][0], peaks
    assert peaks[16][0] < 0.2 * peaks[1][0]
    assert peaks[4][1] <= logits_bytes / 4 + 4096  # no tensor bigger than one chunk's logits


def test_model_flops_against_a_hand_count():
    """The tiny config by hand: hidden 24, intermediate 40, 2 layers, 4 heads of 6 (2 KV heads), vocab 97; LoRA r = 2
    on q_proj and down_proj."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    h, i, kv, v, layers, r = 24, 40, 12, 97, 2, 2
    frozen = layers * (h * h + 2 * h * kv + h * h + 3 * h * i) + h * v  # q, k, v, o, gate, up, down; lm_head
    trainable = layers * (r * h + h * r + r * i + h * r)  # q_proj: A [2, 24], B [24, 2]; down_proj: A [2, 40], B [24, 2]
    flops = ModelFlops.of(model)
    assert (flops.frozen, flops.trainable, flops.layers, flops.attn_width) == (frozen, trainable, 2, 24)
    # two sequences of 10 and 30 tokens
    assert flops(40, 10 ** 2 + 30 ** 2) == (4 * frozen + 6 * trainable) * 40 + 6 * layers * 24 * 1000


def test_peak_tflops_from_the_device_name():
    assert peak_tflops(None, torch.bfloat16, "NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops(None, torch.bfloat16, "NVIDIA H200") == 989.0
    assert peak_tflops(None, torch.float16, "NVIDIA H100 PCIe") == 756.0
    assert peak_tflops(None, torch.bfloat16, "NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops(None, torch.bfloat16, "NVIDIA A10") == 125.0 and peak_tflops(None, torch.bfloat16, "NVIDIA L4") == 121.0
    assert peak_tflops(None, torch.float32, "NVIDIA H100 80GB HBM3") is None  # fp32 runs at another rate
    assert peak_tflops(None, torch.bfloat16, "Some Future GPU") is None
    assert peak_tflops(400.0, torch.float32, "NVIDIA H100 80GB HBM3") == 400.0
    if not torch.cuda.is_available():
        assert peak_tflops(None, torch.bfloat16) is None  # the CPU: mfu is null


@pytest.mark.slow
def test_launcher_with_fused_lora_and_chunked_loss_matches_off_and_logs_mfu(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import launch, losses

    off, on = tmp_path / "off", tmp_path / "on"
    proc_off = launch(tiny_model_dir, off, ranks=1, fused_lora="off", chunked_loss="off", max_steps=3)
    proc_on = launch(tiny_model_dir, on, ranks=1, peak_tflops=0.001, max_steps=3)
    assert "fused LoRA projection: off" in proc_off.stdout and "chunked loss: off (--chunked_loss off)" in proc_off.stdout
    assert "fused LoRA projection: 10 of 10 LoRA layers" in proc_on.stdout and "chunked loss: on" in proc_on.stdout
    got, ref = losses(on), losses(off)
    assert len(got) == len(ref) == 3 and max(abs(a - b) for a, b in zip(got, ref)) < 1e-6, (got, ref)
    rows_off = [json.loads(l) for l in (off / "metrics.jsonl").read_text().splitlines() if '"task_loss"' in l]
    rows_on = [json.loads(l) for l in (on / "metrics.jsonl").read_text().splitlines() if '"task_loss"' in l]
    assert all(r["mfu"] is None and r["tokens_per_s_per_gpu"] == r["tokens_per_s"] for r in rows_off)
    from transformers import AutoModelForCausalLM

    from clora_ds import CLoRAConfig, attach_clora

    flops = ModelFlops.of(attach_clora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), CLoRAConfig(
        r=4, k=5, dropout=0.0, target_modules="q_proj,k_proj,v_proj,up_proj,down_proj")))
    for row in rows_on:  # FLOPs per token = mfu · peak / (tokens/s per GPU): the linear part plus some attention
        per_token = row["mfu"] * 0.001e12 / row["tokens_per_s_per_gpu"]
        linear = 4 * flops.frozen + 6 * flops.trainable
        assert linear < per_token < linear + 6 * flops.layers * flops.attn_width * 256, (row, linear)
