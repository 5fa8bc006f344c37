"""Safe resume: what a checkpoint records about its run, what must match to continue it, and loading it safely.

A checkpoint's trainer_state.json holds the run's identity: the CLoRA and LoRA settings (P is a function of them),
the base model's architecture, a fingerprint of the tokenized training data (the sample order means something only
for the same data; for a mixture also each source's and the weights, so that the message names what changed), the global batch, packing, world size, precision and the optimizer schedule. A resume is refused,
with one message naming each difference, when any of these differ; nothing is loaded or written then. Logging,
saving, evaluation, checkpointing and attention settings may change freely.

Every file read on resume goes through the restricted unpickler (``export.zero_reader.restricted_unpickling``): the
rank files are checked (present, complete, safe) before any rank loads, and DeepSpeed's own ``load_checkpoint`` runs
under it too.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List

import torch

from .config import CLoRAConfig
from .errors import CheckpointError, UserError
from .run_dir import RNG_FILE, read_trainer_state, set_rng_state

ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size")


def run_identity(*, hf_config, clora: CLoRAConfig, model_path: str, data: dict, global_batch: int, world: int,
                 precision: str, optimizer: dict, total_steps: int) -> dict:
    """What must stay the same for a checkpoint of this run to be continued (JSON-serialisable); total_steps (the
    schedule's length) may change, with a note: training longer is a common reason to resume."""
    return {"base_model": {"path": model_path, **{k: getattr(hf_config, k, None) for k in ARCHITECTURE_KEYS}},
            "clora": clora.to_dict(), "data": data, "global_batch": global_batch, "world_size": world,
            "precision": precision, "optimizer": optimizer, "total_steps": total_steps}


def _flag(field_name: str) -> str:
    """The flag a CLoRAConfig field comes from; a recorded field (no flag, e.g. p_fingerprint) by its label."""
    meta = {f.name: f.metadata for f in dataclasses.fields(CLoRAConfig)}[field_name]
    return f"--{meta['flag']}" if meta["flag"] else meta["label"]


def identity_differences(saved: dict, now: dict) -> List[str]:
    """Each setting that differs, as "WHAT: SAVED in the checkpoint, NOW now"."""
    out = []

    def diff(label, a, b):
        if a != b:
            out.append(f"{label}: {a!r} in the checkpoint, {b!r} now")

    for key, value in now.get("clora", {}).items():
        if key in saved.get("clora", {}):
            diff(_flag(key), saved["clora"][key], value)
    base_a, base_b = saved.get("base_model", {}), now.get("base_model", {})
    for key in ARCHITECTURE_KEYS:
        if key in base_a:
            diff(f"--model_name_or_path ({key})", base_a[key], base_b.get(key))
    data_a, data_b = saved.get("data", {}), now.get("data", {})
    for key in ("packing", "max_seq_length", "dataset_format", "train_on_prompt"):
        if key in data_a:
            diff(f"--{key}", data_a[key], data_b.get(key))
    named = _mixture_differences(data_a, data_b)
    out += named
    if not named and "fingerprint" in data_a and data_a["fingerprint"] != data_b.get("fingerprint"):
        out.append(f"--train_file: the tokenized training data differ (checkpoint: {data_a.get('train_file')}, "
                   f"{data_a.get('units')} units; now: {data_b.get('train_file')}, {data_b.get('units')} units), so the "
                   "saved position in the sample order means nothing here")
    before, after = saved.get("base_adapters") or [], now.get("base_adapters") or []
    if [a["fingerprint"] for a in before] != [a["fingerprint"] for a in after]:  # the base the adapter is trained on
        out.append(f"--base_adapters: {[a['path'] for a in before] or 'none'} merged into the base in the checkpoint, "
                   f"{[a['path'] for a in after] or 'none'} now (the same adapters' files, in the same order, are needed)")
    if "global_batch" in saved:
        diff("global batch (per device x accumulation x ranks)", saved["global_batch"], now.get("global_batch"))
    if "precision" in saved:
        diff("precision (--bf16 / --fp16)", saved["precision"], now.get("precision"))
    for key, value in now.get("optimizer", {}).items():
        if key in saved.get("optimizer", {}):
            diff(f"--{key}" if not key.startswith("deepspeed") else f"{key} of the DeepSpeed config",
                 saved["optimizer"][key], value)
    return out


def _mixture_differences(data_a: dict, data_b: dict) -> List[str]:
    """What differs in a mixture's sources (each one's tokenized content, by fingerprint) and weights; a run with
    one source records none of them (its fingerprint is the source's)."""
    def sources(data):
        return data.get("sources") or [{"source": data.get("train_file"), "examples": data.get("units"),
                                        "fingerprint": data.get("fingerprint")}]

    def weights(data):
        w = data.get("weights")
        return "none (each source in proportion to its size)" if w is None else ",".join(f"{x:.6g}" for x in w)

    if "sources" not in data_a and "sources" not in data_b:
        return []
    out = []
    a, b = sources(data_a), sources(data_b)
    if len(a) != len(b):
        out.append(f"--train_file: {len(a)} source{'s' * (len(a) != 1)} in the checkpoint "
                   f"({', '.join(str(s['source']) for s in a)}), {len(b)} now ({', '.join(str(s['source']) for s in b)})")
    else:
        for i, (sa, sb) in enumerate(zip(a, b), 1):
            if sa["fingerprint"] != sb["fingerprint"]:
                out.append(f"--train_file source {i}: its tokenized data differ (checkpoint: {sa['source']}, "
                           f"{sa['examples']} examples; now: {sb['source']}, {sb['examples']} examples)")
    if weights(data_a) != weights(data_b):
        out.append(f"--train_weights: {weights(data_a)} in the checkpoint, {weights(data_b)} now")
    if not out and data_a.get("fingerprint") != data_b.get("fingerprint"):  # same sources and weights, other rows
        out.append("--train_file: the same sources and weights give other training units (the packing changed?), so "
                   "the saved position in the sample order means nothing here")
    return out


def resume_problems(checkpoint: Path, identity: dict, check_files: bool = True) -> List[str]:
    """Why this run cannot continue ``checkpoint`` (empty: it can). ``check_files`` also opens every rank file
    through the restricted unpickler (rank 0 does; the others rely on it)."""
    from .export.zero_reader import inspect_checkpoint

    try:
        state = read_trainer_state(checkpoint)
    except UserError as err:
        return [str(err)]
    world = identity["world_size"]
    problems = []
    if check_files:
        try:
            layout = inspect_checkpoint(checkpoint)
        except UserError as err:
            problems.append(f"cannot resume: {err}")
        else:
            if layout.world_size != world:
                return [f"cannot resume {checkpoint}: it was written by {layout.world_size} ranks and this run has "
                        f"{world}; DeepSpeed cannot re-partition ZeRO optimizer state to another world size. Resume with "
                        f"{layout.world_size} ranks, or export the adapter (OUT/adapter) and start a new run from it"]
    missing = [RNG_FILE.format(rank=r) for r in range(world) if not (checkpoint / RNG_FILE.format(rank=r)).is_file()]
    if missing:
        problems.append(f"cannot resume {checkpoint}: {', '.join(missing[:3])} missing (every rank saves its RNG state); "
                        "copy the whole checkpoint directory")
    saved = state.get("run")
    if saved is None:  # written before checkpoints recorded their run: compare what they did record
        saved = {k: state[k] for k in ("global_batch",) if state.get(k) is not None}
        saved["data"] = {k: state[k] for k in ("packing",) if state.get(k) is not None}
        try:
            saved["clora"] = CLoRAConfig.load(checkpoint).to_dict()
        except UserError:
            pass
    differences = identity_differences(saved, identity)
    if differences:
        problems.append(f"cannot resume {checkpoint}: it was trained with other settings (resume with the checkpoint's, "
                        "or start a new run: another --output_dir, or --overwrite_output_dir):\n      "
                        + "\n      ".join(differences))
    return problems


def load_checkpoint_safely(engine, checkpoint: Path, rank: int) -> int:
    """Restore weights, optimizer, scheduler and this rank's RNG from ``checkpoint``; returns its step."""
    from .export.zero_reader import restricted_unpickling

    try:
        with restricted_unpickling():
            path, _ = engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
    except UserError:
        raise
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot resume {checkpoint}: DeepSpeed could not load it ({text})") from None
    if path is None:
        raise CheckpointError(f"cannot resume {checkpoint}: DeepSpeed found no checkpoint there")
    rng = checkpoint / RNG_FILE.format(rank=rank)
    with restricted_unpickling():
        set_rng_state(torch.load(rng, weights_only=True))
    return read_trainer_state(checkpoint)["step"]
