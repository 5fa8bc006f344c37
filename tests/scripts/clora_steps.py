"""Train a tiny LLaMA with CLoRA for a few steps and record losses and LoRA weights.

    python tests/scripts/clora_steps.py --backend torch --model M --out O --runs RUNS.json
    deepspeed --num_gpus 2 tests/scripts/clora_steps.py --backend deepspeed --zero_stage 3 ...

RUNS.json is a list of {"name", "micro_batch", "grad_accum", "checkpointing": none|reentrant|nonreentrant,
"lam", "k", "lr", "steps", "p_shard" (each rank keeps its share of P's columns), "fused_lora" (auto | off), "chunked_loss" (true: the chunked loss, deepspeed backend)}. Every run sees the same global batches (global batch = world · micro · accum
rows of one fixed token tensor), so every backend and layout should reach the same numbers. Rank 0
writes O/NAME.json (losses, penalties) and O/NAME.safetensors (gathered LoRA weights); runs with
"save_adapter" also write the PEFT adapter to O/NAME-adapter.
"""
import argparse
import gc
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from clora_ds import CLoRAConfig, attach_clora
from clora_ds.adapter import lora_state_dict, save_clora_adapter
from clora_ds.loss import ChunkedCausalLMLoss, causal_lm_loss

SEQ_LEN = 24
GLOBAL_BATCH = 4


def batches(vocab, steps, seed=1234):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (steps, GLOBAL_BATCH, SEQ_LEN), generator=gen)


def build(args, run, ds_config=None):
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(run.get("lora_seed", 7))  # same LoRA init whatever the loading path consumed
    cfg = CLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=run.get("targets", "all-linear"),
                      k=run.get("k", 6), lam=run.get("lam", 1.0), p_init=run.get("p_init", "orthogonal"), seed=3)
    shard = (dist.get_rank(), dist.get_world_size()) if run.get("p_shard") and dist.is_initialized() else None
    model = attach_clora(model, cfg, shard=shard, fused_lora=run.get("fused_lora", "off"))
    # how often a lora_A / lora_B module runs: a fused projection (fused_lora auto) calls neither
    model.lora_module_calls = [0]
    model.chunked = ChunkedCausalLMLoss.install(model) if run.get("chunked_loss") else None
    for name, module in model.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            module.register_forward_hook(lambda *_: model.lora_module_calls.__setitem__(0, model.lora_module_calls[0] + 1))
    if run["checkpointing"] != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": run["checkpointing"] == "reentrant"})
        model.enable_input_require_grads()
    model.train()
    return model


def mean_over_ranks(x: torch.Tensor) -> float:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x.item()


def run_torch(args, run):
    model = build(args, run)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=run.get("lr", 1e-2), weight_decay=0.0)
    data = batches(model.config.vocab_size, run["steps"])
    micro, accum = run["micro_batch"], run["grad_accum"]
    assert micro * accum == GLOBAL_BATCH
    losses, penalties = [], []
    for step in range(run["steps"]):
        step_loss = 0.0
        for j in range(accum):
            ids = data[step, j * micro:(j + 1) * micro]
            out = model(input_ids=ids, labels=ids)
            loss = model.clora.penalty_term(out.loss)
            (loss / accum).backward()
            step_loss += out.loss.item() / accum
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        penalties.append(model.clora.last_penalty.item())
    return model, losses, penalties


def run_deepspeed(args, run):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    world = dist.get_world_size()
    rank = dist.get_rank()
    micro, accum = run["micro_batch"], run["grad_accum"]
    assert world * micro * accum == GLOBAL_BATCH
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": GLOBAL_BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": run.get("lr", 1e-2), "weight_decay": 0.0, "torch_adam": True}},
        "gradient_clipping": 0.0,
        # DeepSpeed's default buckets (5e8 elements, 2 GB in fp32) dwarf a tiny model on a 24 GB CI box
        "zero_optimization": {"stage": args.zero_stage, "reduce_bucket_size": 1_000_000, "allgather_bucket_size": 1_000_000,
                              "stage3_prefetch_bucket_size": 100_000, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    hf_ds = HfDeepSpeedConfig(ds_config) if args.zero_stage == 3 else None  # from_pretrained under zero.Init
    model = build(args, run, ds_config)
    if args.zero_stage == 3:
        some = next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n)
        assert some.numel() == 0 and hasattr(some, "ds_id"), "ZeRO-3 base weights should be partitioned"
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config)
    data = batches(model.config.vocab_size, run["steps"])
    losses, penalties = [], []
    for step in range(run["steps"]):
        step_loss = torch.zeros(())
        for j in range(accum):
            start = (j * world + rank) * micro
            ids = data[step, start:start + micro]
            task = causal_lm_loss(engine, {"input_ids": ids, "labels": ids}, None, engine.module.chunked)
            loss = engine.module.clora.penalty_term(task)
            engine.backward(loss)
            engine.step()
            step_loss += task.detach() / accum
        losses.append(mean_over_ranks(step_loss))
        penalties.append(engine.module.clora.total_penalty().item())
    del hf_ds
    return engine, losses, penalties


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["torch", "deepspeed"], required=True)
    parser.add_argument("--zero_stage", type=int, default=2)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    if args.backend == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for run in json.loads(Path(args.runs).read_text()):
        fn = run_torch if args.backend == "torch" else run_deepspeed
        model, losses, penalties = fn(args, run)
        weights = lora_state_dict(model)
        if run.get("save_adapter"):
            save_clora_adapter(model, out / f"{run['name']}-adapter", overwrite=True)
            probe = batches(model.module.config.vocab_size if hasattr(model, "module") else model.config.vocab_size, 1, seed=99)[0]
            model.eval()
            with torch.no_grad():  # every rank runs the forward: ZeRO-3 gathers collectively
                logits = model(input_ids=probe).logits
            if not dist.is_initialized() or dist.get_rank() == 0:
                torch.save({"input_ids": probe, "logits": logits.cpu()}, out / f"{run['name']}-probe.pt")
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(out / f"{run['name']}.safetensors"))
            calls = (model.module if hasattr(model, "module") else model).lora_module_calls[0]
            (out / f"{run['name']}.json").write_text(json.dumps({"losses": losses, "penalties": penalties,
                                                                  "lora_module_calls": calls}))
        print(f"[clora_steps] {args.backend} zero={args.zero_stage} {run['name']}: losses={losses} penalties={penalties}", flush=True)
        if hasattr(model, "destroy"):
            model.destroy()  # release ZeRO-3 hooks and buffers before the next engine
        del model
        gc.collect()


if __name__ == "__main__":
    main()
