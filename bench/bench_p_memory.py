"""Memory of the fixed subspaces P (P_in [in, k], P_out [out, k] per adapted module).

Part 1, from shapes (no tensors built): LLaMA-2-7B, 32 layers, adapted q_proj, k_proj, v_proj
(4096->4096), up_proj (4096->11008), down_proj (11008->4096); numbers = Σ (in + out)·k from
``clora_ds.subspace.count_subspace_numbers``; bytes = numbers × element size of each ``p_dtype``.
The reference is the CLoRA authors' code: a per-module float32 copy of P on every GPU
(3.6 GB at k=512, 14.4 GB at k=2048); the script checks that its float32 numbers reproduce these.
clora_ds also builds P once per process (it is a pure function of the seed, no communication),
so the per-GPU figure is the per-process figure; with N GPUs the machine total is N times it.

Part 2, measured: ``attach_clora`` on a small LLaMA (hidden 256, intermediate 688, 2 layers,
4 heads, 2 KV heads, so k_proj/v_proj are 256->128) for every p_dtype and two k; compares
``model.clora.p_nbytes`` and the bytes of the distinct storages actually allocated for P against
the formula, to show the formula is what the implementation builds.

Part 3, sharded P (``--clora_p_shard auto``: each of W data-parallel ranks keeps its share of every module's P
columns): bytes per GPU at LLaMA-2-7B shapes for W = 1, 2, 8 (computed: the largest share, ``shard_columns``) and,
for W = 2, measured on the small LLaMA (``p_nbytes`` of each rank's ``attach_clora(shard=(rank, 2))``).

Run (CPU, a few seconds, < 1 GiB RAM):
    python bench/bench_p_memory.py
"""
from __future__ import annotations

import argparse
import warnings

import torch

from clora_ds.adapter import attach_clora, resolve_target_modules
from clora_ds.config import CLoRAConfig
from clora_ds.subspace import count_subspace_numbers

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft -> transformers 5 deprecation

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
DTYPES = ["float32", "bfloat16", "float16"]
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
AUTHORS_GB = {512: 3.6, 2048: 14.4}  # their per-module fp32 copy on every GPU, decimal GB


def llama_shapes(layers, hidden, intermediate, heads, kv_heads, targets=TARGETS):
    """name -> (out, in) of the adapted linears, as in HF LlamaForCausalLM."""
    head_dim = hidden // heads
    per_layer = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    return {
        f"model.layers.{i}.{n}": s
        for i in range(layers)
        for n, s in per_layer.items()
        if n.rsplit(".", 1)[-1] in targets
    }


def part1(ks, r):
    shapes = llama_shapes(32, 4096, 11008, 32, 32)
    lora_numbers = sum((o + i) * r for o, i in shapes.values())
    print("## 1. P for LLaMA-2-7B (32 layers; q,k,v,up,down = 160 modules), from shapes\n")
    print(f"Σ (in + out) over the 160 modules = {sum(o + i for o, i in shapes.values()):,}; "
          f"numbers = that × k. Bytes are per GPU (per process); GB = 1e9 bytes, GiB = 2^30.\n")
    print("| k | P numbers | p_dtype | bytes per GPU | GB | GiB | vs authors' fp32 copy | "
          "authors' fp32 copy (quoted) | × LoRA A+B params (r=%d, fp32) |" % r)
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    checks = []
    for k in ks:
        n = count_subspace_numbers(shapes, k)
        authors = n * 4
        for dt in DTYPES:
            b = n * ELEMENT_SIZE[dt]
            quoted = f"{AUTHORS_GB[k]} GB" if k in AUTHORS_GB else "—"
            print(f"| {k} | {n:,} | {dt} | {b:,} | {b / 1e9:.2f} | {b / 2**30:.2f} | {b / authors:.2f}× "
                  f"| {quoted} | {b / (lora_numbers * 4):.1f}× |")
        if k in AUTHORS_GB:
            ok = round(authors / 1e9, 1) == AUTHORS_GB[k]
            checks.append((k, authors / 1e9, AUTHORS_GB[k], ok))
    print(f"\nLoRA A+B at r={r} for the same modules: {lora_numbers:,} numbers = {lora_numbers * 4 / 1e9:.3f} GB fp32.")
    print("\nReproduces the quoted authors' figures (float32 bytes rounded to 0.1 GB):")
    for k, got, want, ok in checks:
        print(f"- k={k}: {got:.3f} GB -> {got:.1f} GB vs quoted {want} GB: {'yes' if ok else 'NO'}")
    return all(c[-1] for c in checks)


def part2(ks, r):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    expected_shapes = llama_shapes(2, 256, 688, 4, 2)
    print("\n## 2. Measured: attach_clora on a small LLaMA (hidden 256, intermediate 688, 2 layers, "
          "4 heads, 2 KV heads; q,k,v,up,down = 10 modules)\n")
    print("`p_nbytes` = model.clora.p_nbytes; `storage bytes` = Σ untyped_storage().nbytes() over the distinct "
          "storages behind every P_in/P_out (what was really allocated); formula = count_subspace_numbers × "
          "element size, with the shapes written out from the LlamaConfig.\n")
    print("| k | p_dtype | P tensors | dtype seen | formula bytes | p_nbytes | storage bytes | match |")
    print("|---:|---|---:|---|---:|---:|---:|---|")
    all_ok = True
    for k in ks:
        for dt in DTYPES + ["float64"]:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**cfg))
            resolved = resolve_target_modules(model, CLoRAConfig(r=r, k=k, target_modules=TARGETS))
            assert resolved == expected_shapes, (resolved, expected_shapes)
            peft_model = attach_clora(model, CLoRAConfig(r=r, alpha=2 * r, k=k, target_modules=TARGETS, p_dtype=dt))
            subs = peft_model.clora.subspaces.values()
            tensors = [t for s in subs for t in (s.p_in, s.p_out)]
            storages = {}
            for t in tensors:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
            storage_bytes = sum(storages.values())
            formula = count_subspace_numbers(expected_shapes, k) * ELEMENT_SIZE[dt]
            measured = peft_model.clora.p_nbytes
            dtypes_seen = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
            ok = formula == measured == storage_bytes and dtypes_seen == [dt] and len(storages) == len(tensors)
            all_ok &= ok
            print(f"| {k} | {dt} | {len(tensors)} | {','.join(dtypes_seen)} | {formula:,} | {measured:,} "
                  f"| {storage_bytes:,} | {'yes' if ok else 'NO'} |")
            del peft_model, model
    return all_ok


def part3(ks, r):
    from transformers import LlamaConfig, LlamaForCausalLM

    from clora_ds.adapter import shard_columns

    shapes = llama_shapes(32, 4096, 11008, 32, 32)
    per_column = sum(o + i for o, i in shapes.values())
    print("\n## 3. Sharded P: bytes per GPU at LLaMA-2-7B shapes (the largest rank's share), computed\n")
    print("| k | W | columns per rank (max) | float32 GB | bfloat16 GB | vs unsharded |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        for world in (1, 2, 8):
            cols = max(shard_columns(k, w, world).stop - shard_columns(k, w, world).start for w in range(world))
            print(f"| {k} | {world} | {cols} | {per_column * cols * 4 / 1e9:.3f} | {per_column * cols * 2 / 1e9:.3f} "
                  f"| {cols / k:.3f}× |")
    cfg = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    print("\nMeasured, W = 2, the small LLaMA (p_nbytes of each rank's attach_clora(shard=(rank, 2)), float32):\n")
    print("| k | unsharded bytes | rank 0 | rank 1 | rank 0 + rank 1 == unsharded | max share / unsharded |")
    print("|---:|---:|---:|---:|---|---:|")
    ok = True
    for k in (33, 64):
        sizes = []
        for shard in (None, (0, 2), (1, 2)):
            torch.manual_seed(0)
            model = attach_clora(LlamaForCausalLM(LlamaConfig(**cfg)), CLoRAConfig(r=r, k=k, target_modules=TARGETS),
                                 shard=shard)
            sizes.append(model.clora.p_nbytes)
        full, a, b = sizes
        ok &= a + b == full
        print(f"| {k} | {full:,} | {a:,} | {b:,} | {'yes' if a + b == full else 'NO'} | {max(a, b) / full:.3f} |")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--small-ks", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--r", type=int, default=32)
    args = ap.parse_args()
    print(f"# CLoRA subspace memory (torch {torch.__version__})\n")
    ok1 = part1(args.ks, args.r)
    ok2 = part2(args.small_ks, 8)
    ok3 = part3(args.ks, 8)
    print(f"\nformula reproduces the authors' numbers: {'yes' if ok1 else 'NO'}; "
          f"formula == bytes built by attach_clora: {'yes' if ok2 else 'NO'}; shards add up: {'yes' if ok3 else 'NO'}")
    if not (ok1 and ok2 and ok3):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
