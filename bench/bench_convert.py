"""Checkpoint -> PEFT adapter at LLaMA-2-7B layer shapes: our converter vs zero_to_fp32's full reconstruction.

    python bench/bench_convert.py                      # 4 layers (hidden 4096, intermediate 11008), r=32, q,k,v,up,down
    python bench/bench_convert.py --layers 6 --workdir /scratch/bench_convert

Everything runs on CPU with two ranks and the real launcher, in one run:
 1. a base model with LLaMA-2-7B layer shapes (32 heads, no GQA) and a small vocabulary, saved in fp32, 1 GB shards;
 2. `deepspeed --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json ... --max_steps 1`: OUT/checkpoint-1,
    saved the launcher's way (frozen weights excluded);
 3. the same engine restored from it and saved again with DeepSpeed's defaults (`engine.save_checkpoint(dir)`:
    frozen weights included, a `latest` file): what most training scripts leave behind;
 4. conversions, each in a fresh process, peak RSS as the kernel accounts it (tests/scripts/peak_rss.py):
      ours       python launch/convert_to_peft.py OUT/checkpoint-1 ADAPTER
      baseline   get_fp32_state_dict_from_zero_checkpoint(DEFAULT) (full reconstruction) -> LoRA tensors -> safetensors
      merge      python launch/convert_to_peft.py OUT/checkpoint-1 MERGED --merge   (shard by shard)
Prints a markdown table. Needs ~10 GiB of RAM at 4 layers and ~20 GB of disk.
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
GIB = 2**30


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run(cmd, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, **kw)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def measured(cmd):
    """(wall seconds, peak RSS bytes) of cmd in a fresh process."""
    start = time.perf_counter()
    proc = run([sys.executable, SCRIPTS / "peak_rss.py", *cmd])
    return time.perf_counter() - start, int(proc.stdout.strip().splitlines()[-1])


def deepspeed(*args):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29731", *args]


def build_assets(work: Path, layers: int, hidden: int, intermediate: int) -> tuple:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from clora_ds.tiny import record_text, sample_records, train_tokenizer, write_sample_data

    data = write_sample_data(work / "train.jsonl", n=64)
    model_dir = work / "base"
    tokenizer = train_tokenizer([record_text(r) for r in sample_records(64)], model_dir, vocab_size=300)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(model_dir), max_shard_size="1GB")
    frozen = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return model_dir, data, frozen


def save_default(ckpt: Path, dest: Path) -> None:
    """Worker (under the deepspeed launcher): restore the engine from ckpt, save it with DeepSpeed's defaults."""
    import deepspeed as ds

    sys.path.insert(0, str(SCRIPTS))
    from engine_logits import restore_engine

    ds.init_distributed(dist_backend="gloo")
    engine, keep_alive = restore_engine(ckpt)
    engine.save_checkpoint(str(dest))  # tag global_stepN, `latest`, frozen weights included
    engine.destroy()


def baseline(default_dir: Path, dest: Path) -> None:
    """What scripts do today: rebuild the whole model's fp32 state dict, then keep its LoRA tensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    from clora_ds.export import peft_file_key

    state = get_fp32_state_dict_from_zero_checkpoint(str(default_dir))
    lora = {peft_file_key(k): v.contiguous() for k, v in state.items() if ".lora_" in k}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers at LLaMA-2-7B shapes (>= 4)")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size (LLaMA-2-7B: 4096; smaller only to try the script)")
    parser.add_argument("--intermediate", type=int, default=11008, help="MLP size (LLaMA-2-7B: 11008)")
    parser.add_argument("--workdir", default=str(ROOT / "out" / "bench_convert"), help="where models and checkpoints go (replaced)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    parser.add_argument("--worker", choices=["save_default", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "save_default":
        return save_default(Path(args.src), Path(args.dest))
    if args.worker == "baseline":
        return baseline(Path(args.src), Path(args.dest))

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    model_dir, data, frozen = build_assets(work, args.layers, args.hidden, args.intermediate)
    print(f"[bench] base: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}: {frozen:,} numbers ({dir_bytes(model_dir) / GIB:.2f} GiB on disk)", flush=True)
    out = work / "run"
    run(deepspeed(ROOT / "launch" / "train.py", "--deepspeed", ROOT / "ds_configs" / "zero3.json", "--model_name_or_path", model_dir,
                  "--train_file", data, "--output_dir", out, "--max_steps", "1", "--save_steps", "0", "--lora_r", "32",
                  "--lora_alpha", "64", "--lora_dropout", "0", "--clora_k", "64", "--target_modules", "q_proj,k_proj,v_proj,up_proj,down_proj",
                  "--per_device_train_batch_size", "1", "--max_seq_length", "160", "--learning_rate", "1e-3", "--logging_steps", "1"))
    ours_ckpt, default_dir = out / "checkpoint-1", work / "default"
    print(f"[bench] trained 1 step under ZeRO-3, 2 ranks ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    run(deepspeed(Path(__file__).resolve(), "--worker", "save_default", "--src", ours_ckpt, "--dest", default_dir))
    default_tag = default_dir / (default_dir / "latest").read_text().strip()

    t_ours, rss_ours = measured([sys.executable, ROOT / "launch" / "convert_to_peft.py", ours_ckpt, work / "adapter"])
    t_base, rss_base = measured([sys.executable, Path(__file__).resolve(), "--worker", "baseline", "--src", default_dir,
                                 "--dest", work / "adapter-baseline"])
    t_merge, rss_merge = measured([sys.executable, ROOT / "launch" / "convert_to_peft.py", ours_ckpt, work / "merged", "--merge"])

    from safetensors.torch import load_file

    mine = load_file(str(work / "adapter" / "adapter_model.safetensors"))
    theirs = load_file(str(work / "adapter-baseline" / "adapter_model.safetensors"))
    same = mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    adapter_fp32 = 4 * sum(t.numel() for t in mine.values())
    target = 3 * adapter_fp32 + GIB
    shard = max(p.stat().st_size for p in model_dir.glob("*.safetensors"))

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    print(f"\nhidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers ({frozen:,} base numbers, vocab {vocab}), "
          f"r=32 on q,k,v,up,down: {len(mine)} tensors, "
          f"{adapter_fp32 // 4:,} numbers = {adapter_fp32 / 2**20:.1f} MiB fp32. ZeRO-3, 2 CPU ranks, fp32 training.\n")
    print("| conversion | checkpoint on disk | wall time | peak RSS | peak RSS / adapter fp32 | target ≤ 3×adapter + 1 GiB |")
    print("|---|---:|---:|---:|---:|---|")
    for name, ckpt, t, rss in (("ours: `convert_to_peft.py OUT/checkpoint-1` (launcher checkpoint)", ours_ckpt, t_ours, rss_ours),
                               ("zero_to_fp32 full reconstruction of a default-saved checkpoint", default_tag, t_base, rss_base)):
        print(f"| {name} | {dir_bytes(ckpt) / 2**20:,.1f} MiB | {t:.1f} s | {rss / GIB:.2f} GiB | {rss / adapter_fp32:.1f}× | "
              f"{'yes' if rss <= target else 'no'} ({target / GIB:.2f} GiB) |")
    print(f"\nratios (baseline / ours): checkpoint bytes {dir_bytes(default_tag) / dir_bytes(ours_ckpt):.0f}×, wall time "
          f"{t_base / t_ours:.1f}×, peak RSS {rss_base / rss_ours:.1f}×; same adapter tensors: {'yes' if same else 'NO'}")
    print(f"`--merge` onto the base ({len(list(model_dir.glob('*.safetensors')))} shards, largest {shard / GIB:.2f} GiB, "
          f"{dir_bytes(model_dir) / GIB:.2f} GiB in all): {t_merge:.1f} s, peak RSS {rss_merge / GIB:.2f} GiB "
          f"({rss_merge / shard:.2f}× the largest shard, {rss_merge / dir_bytes(model_dir):.2f}× the whole base)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
