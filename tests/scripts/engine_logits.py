"""The training engine's logits at a checkpoint, restored the way `launch/train.py --resume_from_checkpoint` restores it.

    deepspeed --num_gpus 2 tests/scripts/engine_logits.py --out O OUT/checkpoint-STEP [OUT2/checkpoint-STEP ...]

For each checkpoint written by launch/train.py: the base model named in its train_config.json, loaded as the
launcher loads it (under zero.Init for ZeRO-3, so every rank holds a partition), CLoRA attached from its
clora_config.json, `deepspeed.initialize` with the run's resolved DeepSpeed config, `engine.load_checkpoint`,
then the engine's own forward on fixed random token ids (every rank runs it; ZeRO-3 gathers the weights).
Rank 0 saves O/<i>.pt = {"input_ids", "logits"} for the i-th checkpoint given (from 0). No clora_ds checkpoint-reading code is involved.
"""
import argparse
import gc
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from clora_ds import CLoRAConfig, attach_clora


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 13), generator=torch.Generator().manual_seed(2024))


def restore_engine(ckpt: Path):
    """(engine, keep_alive): the run's engine rebuilt from its train_config.json and loaded from ``ckpt``.
    Keep ``keep_alive`` (transformers' ZeRO-3 marker) referenced while the engine is used."""
    settings = json.loads((ckpt / "train_config.json").read_text())
    args, ds_config = settings["arguments"], settings["deepspeed"]
    assert not (args["bf16"] or args["fp16"]), "built for fp32 runs"
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    keep_alive = HfDeepSpeedConfig(ds_config) if zero3 else None  # from_pretrained under zero.Init
    model = AutoModelForCausalLM.from_pretrained(args["model_name_or_path"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model = attach_clora(model, CLoRAConfig.load(ckpt))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
    return engine, keep_alive


def engine_logits(ckpt: Path) -> dict:
    engine, keep_alive = restore_engine(ckpt)
    engine.eval()
    ids = probe_ids(engine.module.config.vocab_size)
    with torch.no_grad():
        logits = engine(input_ids=ids, use_cache=False).logits.cpu()
    engine.destroy()
    del engine, keep_alive
    gc.collect()
    return {"input_ids": ids, "logits": logits}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, ckpt in enumerate(map(Path, args.checkpoints)):
        result = engine_logits(ckpt)
        if dist.get_rank() == 0:
            torch.save(result, out / f"{i}.pt")
        dist.barrier()


if __name__ == "__main__":
    main()
