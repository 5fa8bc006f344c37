"""Turn a HF causal LM into a standard PEFT LoRA model with the CLoRA regularizer attached.

          x ──► W (frozen) ─────────────┐
          │                             (+) ──► y = W x + (α/r)·B A x
          └──► A [r, in] ──► B [out, r] ┘
    R = Σ ½‖A P_in‖² + ½‖Bᵀ P_out‖²   (P fixed, orthonormal columns; saved only when data-derived)

    model = attach_clora(hf_model, CLoRAConfig(r=8, k=64, lam=1.0))
    out = model(**batch)
    loss = model.clora.penalty_term(out.loss)   # task + λ·R, correct under ZeRO-3 and checkpointing
    model.clora.last_penalty                    # R, detached, for logging

The penalty of each module is evaluated in a forward hook on ``lora_A`` / ``lora_B``: there (and only
there) ZeRO-3 has the weight gathered. Hooks are registered here, before ``deepspeed.initialize``
registers its own, so they run while the weight is still whole; the hook checks that it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .activation_memory import outside_dispatch_modes
from .config import DATA_INITS, CLoRAConfig
from .errors import CLoRAConfigError
from .export.peft_writer import TrainingRecord, export_peft_adapter
from .fused_lora import FUSED_LORA_CHOICES, fuse_lora_layers, fused_lora_note
from .penalty import PenaltyAnchor, PenaltyScale, PenaltyTap, SubspacePenalty
from .subspace import ModuleSubspace, build_module_subspaces, load_subspaces, orthogonal_subspaces, subspace_nbytes

PEFT_PREFIX = "base_model.model."


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def _gathered(params: List[torch.Tensor]):
    """Gather ZeRO-3 partitioned parameters for reading (every rank must call), else a no-op."""
    partitioned = [p for p in params if _is_partitioned(p)]
    if not partitioned:
        import contextlib

        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def dequantized_weight(layer) -> torch.Tensor:
    """The weight of a (possibly bitsandbytes-quantized) linear layer as a dense [out, in] tensor."""
    weight = layer.weight
    if weight.__class__.__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(layer)
    return weight.data


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _linear_shapes(model: torch.nn.Module) -> Dict[str, Tuple[int, int]]:
    """name -> (out, in) of every nn.Linear, read from attributes (valid under ZeRO-3 partitioning)."""
    return {
        name: (mod.out_features, mod.in_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_target_modules(model: torch.nn.Module, config: CLoRAConfig) -> Dict[str, Tuple[int, int]]:
    """The modules CLoRA will adapt, name -> (out, in); one CLoRAConfigError listing every problem."""
    selected, problems = target_modules_and_problems(model, config)
    if problems:
        raise CLoRAConfigError("Cannot attach CLoRA:\n  - " + "\n  - ".join(problems))
    return selected


def target_modules_and_problems(model: torch.nn.Module, config: CLoRAConfig) -> Tuple[Dict[str, Tuple[int, int]], List[str]]:
    """(name -> (out, in) of the modules CLoRA would adapt, problems); works on a meta-device model too."""
    linears = _linear_shapes(model)
    output_layer = getattr(model, "get_output_embeddings", lambda: None)()
    output_names = {n for n, m in model.named_modules() if m is output_layer}
    candidates = sorted({n.rsplit(".", 1)[-1] for n in linears if n not in output_names})
    problems = []
    if config.target_modules == "all-linear":
        selected = {n: s for n, s in linears.items() if n not in output_names}
    else:
        selected = {n: s for n, s in linears.items() if any(_matches(n, t) for t in config.target_modules)}
        unmatched = [t for t in config.target_modules if not any(_matches(n, t) for n in linears)]
        if unmatched:
            problems.append(
                f"target_modules {unmatched} match no linear layer of {type(model).__name__}; "
                f"candidate names are: {', '.join(candidates)} (or 'all-linear')"
            )
    if not selected and not problems:
        problems.append(f"no linear layer to adapt; candidate names are: {', '.join(candidates)}")
    too_small = [f"{n} (out={o}, in={i})" for n, (o, i) in selected.items() if config.k > min(o, i)]
    if too_small:
        shown = "; ".join(too_small[:8]) + (f"; ... {len(too_small) - 8} more" if len(too_small) > 8 else "")
        smallest = min(min(o, i) for o, i in selected.values())
        problems.append(
            f"k={config.k} is larger than the in or out dimension of {len(too_small)} targeted module(s): {shown}. "
            f"Use k <= {smallest}, or leave those modules out of target_modules"
        )
    return selected, problems


class CLoRARegularizer:
    """Holds the fixed subspaces and the hooks; turns a task loss into task + λ·R.

    Sharded P (``shard_world`` = W > 1): this rank holds a disjoint share of every module's P columns, so its
    penalty R_r covers its share and R = Σ_r R_r. The rank's term is W·λ·R_r: data-parallel training averages
    gradients over the W ranks, which turns Σ_r W·λ·∇R_r / W into exactly λ·∇R. No extra communication; only the
    logged R is summed over ranks (``total_penalty``).
    """

    def __init__(self, config: CLoRAConfig, subspaces: Dict[str, ModuleSubspace], adapter_name: str, shard_world: int = 1,
                 shard_rank: int = 0, pending: bool = False):
        self.config = config
        self.subspaces = subspaces
        self.adapter_name = adapter_name
        self.shard_world, self.shard_rank = shard_world, shard_rank
        # data-derived P not computed yet (zeros of its final shape, so its memory is taken, and logged, up front):
        # ``clora_ds.calibration.calibrate_subspaces`` fills it; a training forward before that is refused
        self.pending = pending
        self.subspaces_file: Optional[Path] = None  # where the whole data-derived P is saved (None: seeded P)
        self.expected = 2 * len(subspaces)
        self.scale = PenaltyScale(config.lam * shard_world)
        self.last_penalty: Optional[torch.Tensor] = None
        self.fused_lora_note: Optional[str] = None  # attach_clora(fused_lora="auto"): which layers run fused
        self._handles: list = []
        self._weights: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None  # use_weight_penalty: (A, B)

    # -- hooks ----------------------------------------------------------------------------------
    def _begin_forward(self, module, args, kwargs=None):
        self.scale = PenaltyScale(self.config.lam * self.shard_world)

    def _make_hook(self, name: str, side: str, numel: int):
        penalize = self._side_penalty(name, side, numel)

        def hook(module, inputs, output):
            return penalize(module.weight, output, module.training)

        return hook

    def fused_penalty(self, name: str, numel_a: int, numel_b: int):
        """(A, B, y, training) -> y: both penalties of module ``name`` for a fused LoRA forward (fused_lora.py), which
        calls neither lora_A nor lora_B; taken where the fused layer has them gathered, tapped onto its output."""
        side_a, side_b = self._side_penalty(name, "A", numel_a), self._side_penalty(name, "B", numel_b)

        def penalize(a_weight, b_weight, output, training):
            return side_b(b_weight, side_a(a_weight, output, training), training)

        return penalize

    def _side_penalty(self, name: str, side: str, numel: int):
        """(weight, output, training) -> output: evaluate the penalty of ``name``'s lora_{side} once per forward and
        tap its gradient onto ``output`` (the output of the module that holds the weight gathered)."""
        subspace = self.subspaces[name]
        where = f"{name}.lora_{side}"

        def penalize(weight, output, training):
            if not training:
                return output
            self._refuse_pending()
            scale = self.scale
            # A tap is needed once per forward: in the forward itself, or (reentrant checkpointing, whose
            # forward runs without grad) in the recompute. A non-reentrant recompute finds it already made.
            tap = torch.is_grad_enabled() and scale.lam > 0 and weight.requires_grad and where not in scale.tapped
            if not (scale.collecting or tap):
                return output
            if weight.numel() != numel:
                raise RuntimeError(
                    f"CLoRA: {where}.weight has {weight.numel()} elements inside its forward, expected {numel}: "
                    "it is partitioned. Attach CLoRA before deepspeed.initialize so the penalty hook runs "
                    "while ZeRO-3 holds the weight gathered."
                )
            subspace.on(weight.device)
            # M [r, k] and P are saved as they are, never through activation checkpointing's pack hooks:
            # they are small, and then a recompute has nothing of ours to reproduce. The ops run in the forward only,
            # so selective checkpointing, which matches forward and recompute op by op, must not see them.
            with torch.autograd.graph.saved_tensors_hooks(_keep, _keep), outside_dispatch_modes():
                if side == "A":
                    r = SubspacePenalty.apply(weight, subspace.p_in)  # ½‖A P_in‖², A [r, in]
                else:
                    r = SubspacePenalty.apply(weight.t(), subspace.p_out)  # ½‖Bᵀ P_out‖², Bᵀ [r, out]
                if scale.collecting:
                    scale.values[where] = r.detach()
                if tap:
                    scale.tapped.add(where)
                    return PenaltyTap.apply(output, r, scale, where)
            return output

        return penalize

    def _refuse_pending(self) -> None:
        if self.pending:
            raise RuntimeError(f"CLoRA: P (p_init={self.config.p_init}) has not been computed: run "
                               "clora_ds.calibration.calibrate_subspaces (or pass saved_subspaces to attach_clora) "
                               "before training")

    def use_weight_penalty(self, peft_model: torch.nn.Module) -> None:
        """Take R from the LoRA weights in ``penalty_term`` (ordinary autograd, no hooks, no taps) instead of inside
        each module's forward: what ``--compile_layers`` needs, since the hooks' Python state (which taps are made)
        would break every compiled decoder layer at every LoRA module. The same R and the same gradient, once per
        micro-batch; valid only where every rank holds the LoRA weights whole (not ZeRO-3: plan_run refuses that).
        Before or after ``deepspeed.initialize``: ZeRO-0/1/2 keep the module's parameters as the same tensors."""
        modules = dict(peft_model.named_modules())
        weights = {}
        for name in self.subspaces:
            layer = modules[PEFT_PREFIX + name]
            a, b = layer.lora_A[self.adapter_name].weight, layer.lora_B[self.adapter_name].weight
            if a.numel() != layer.lora_A[self.adapter_name].in_features * layer.lora_A[self.adapter_name].out_features:
                raise RuntimeError(f"CLoRA: {name}.lora_A.weight is partitioned (ZeRO-3): the penalty cannot be taken "
                                   "from the weights; keep it in the modules' forward (no --compile_layers)")
            weights[name] = (a, b)
            if getattr(layer, "clora_penalty", None) is not None:  # a FusedLoraLinear: no penalty inside its forward
                layer.clora_penalty = None
        self.remove()
        self._weights = weights

    def _weight_penalty_term(self, task_loss: torch.Tensor) -> torch.Tensor:
        self._refuse_pending()
        lam = self.config.lam * self.shard_world  # sharded P: W·λ·R_r per rank (see the class doc)
        with torch.set_grad_enabled(torch.is_grad_enabled() and lam > 0):
            values = []
            for name, (a, b) in self._weights.items():
                sub = self.subspaces[name]
                sub.on(a.device)
                values.append(SubspacePenalty.apply(a, sub.p_in))  # ½‖A P_in‖²
                values.append(SubspacePenalty.apply(b.t(), sub.p_out))  # ½‖Bᵀ P_out‖²
            penalty = torch.stack(values).sum()
        self.last_penalty = penalty.detach()
        if lam == 0:
            return task_loss
        return task_loss + (penalty * lam).to(task_loss.device, task_loss.dtype)

    def register(self, peft_model: torch.nn.Module) -> None:
        base = peft_model.get_base_model()
        self._handles.append(base.register_forward_pre_hook(self._begin_forward))
        modules = dict(peft_model.named_modules())
        for name in self.subspaces:
            layer = modules[PEFT_PREFIX + name]
            for side, container in (("A", layer.lora_A), ("B", layer.lora_B)):
                lin = container[self.adapter_name]
                numel = lin.in_features * lin.out_features
                self._handles.append(lin.register_forward_hook(self._make_hook(name, side, numel)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- the loss ---------------------------------------------------------------------------------
    def penalty_term(self, task_loss: torch.Tensor) -> torch.Tensor:
        """task_loss + λ·R for the forward pass just run; R (detached) is kept in ``last_penalty``."""
        if self._weights is not None:
            return self._weight_penalty_term(task_loss)
        scale = self.scale
        scale.collecting = False
        if len(scale.values) != self.expected:
            seen = set(scale.values)
            missing = [f"{n}.lora_{s}" for n in self.subspaces for s in "AB" if f"{n}.lora_{s}" not in seen]
            raise RuntimeError(
                f"CLoRA: the last forward evaluated {len(scale.values)} of {self.expected} module penalties "
                f"(missing e.g. {missing[:4]}). Call penalty_term once after each training-mode forward "
                "of the whole model, with adapters enabled."
            )
        values = list(scale.values.values())
        penalty = torch.stack(values).sum()  # each value is already >= float32
        self.last_penalty = penalty
        if scale.lam == 0:
            return task_loss
        handle = torch.zeros((), device=task_loss.device, requires_grad=True)
        return task_loss + PenaltyAnchor.apply(handle, penalty.to(task_loss.device), scale)

    def total_penalty(self) -> torch.Tensor:
        """R of the last training forward. With sharded P, the sum over ranks of their shares: a collective, so
        every rank must call it (the launcher does, at logging steps)."""
        if self.shard_world == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.last_penalty
        from .distributed import collective_device

        total = self.last_penalty.detach().to(collective_device(), torch.float64).clone()
        dist.all_reduce(total)
        return total

    def install_subspaces(self, mine: Dict[str, Tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set every module's P to this rank's columns of the computed P (module -> (P_in [in, c], P_out [out, c]),
        c = the ``shard_columns`` count; all k unsharded), and let training start."""
        if set(mine) != set(self.subspaces):
            raise ValueError(f"install_subspaces: got P for {len(mine)} modules, the regularizer has {len(self.subspaces)}")
        for name, (p_in, p_out) in mine.items():
            sub = self.subspaces[name]
            if p_in.shape != sub.p_in.shape or p_out.shape != sub.p_out.shape:
                raise ValueError(f"install_subspaces: {name} P is {tuple(p_in.shape)}/{tuple(p_out.shape)}, this rank "
                                 f"holds {tuple(sub.p_in.shape)}/{tuple(sub.p_out.shape)}")
            sub.p_in = p_in.to(sub.p_in.device, sub.p_in.dtype)
            sub.p_out = p_out.to(sub.p_out.device, sub.p_out.dtype)
        self.pending = False

    @property
    def p_nbytes(self) -> int:
        """Bytes of P held by this rank (its share, with sharded P)."""
        return subspace_nbytes(self.subspaces.values())


def shard_columns(k: int, rank: int, world: int) -> slice:
    """The columns of a k-column P that ``rank`` of ``world`` keeps: contiguous, sizes differing by at most one."""
    base, extra = divmod(k, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def attach_clora(
    model: torch.nn.Module,
    config: CLoRAConfig,
    adapter_name: str = "default",
    subspace_device: Optional[Union[str, torch.device]] = None,
    subspace_threads: Optional[int] = None,
    shard: Optional[Tuple[int, int]] = None,
    fused_lora: str = "off",
    saved_subspaces: Optional[Union[str, Path]] = None,
):
    """Wrap ``model`` in a PEFT LoRA model (``peft.get_peft_model``) and attach the CLoRA regularizer.

    Returns the PeftModel; the regularizer is ``model.clora``. Call before ``deepspeed.initialize``.
    Under ZeRO-3 (model built in ``deepspeed.zero.Init``) every rank must call this, since the svd_*
    inits gather each frozen W once. ``subspace_device`` is where the QR/SVD run (default CPU);
    ``subspace_threads`` draw the seeded Gaussians of orthogonal P (default: this rank's share of the cores).
    ``shard=(rank, world)``: keep only this rank's share of each module's P columns (``shard_columns``); every rank
    builds each module's full P (one module at a time: the same numbers as unsharded) and keeps its columns.
    Data-derived P (``activations``) is read from ``saved_subspaces`` (a CLORA_SUBSPACES_NAME file, or the checkpoint
    or adapter directory holding it; each rank reads only its columns) or, without it, left to compute:
    ``clora_ds.calibration.calibrate_subspaces`` before training.
    ``fused_lora="auto"``: every LoRA layer that can (LoRA dropout 0, a plain nn.Linear base: ``fused_lora_problem``)
    runs as one fused autograd Function with its penalty taken inside (fused_lora.py); ``model.clora.fused_lora_note``
    says which; "off": PEFT's forward everywhere.
    """
    from peft import get_peft_model

    if fused_lora not in FUSED_LORA_CHOICES:
        raise CLoRAConfigError(f"fused_lora={fused_lora!r}: choose {' or '.join(FUSED_LORA_CHOICES)}")
    targets = resolve_target_modules(model, config)
    peft_model = get_peft_model(model, config.peft_lora_config(targets), adapter_name=adapter_name)

    device = torch.device(subspace_device) if subspace_device is not None else None
    modules = dict(peft_model.named_modules())
    layers = {name: modules[PEFT_PREFIX + name] for name in sorted(targets)}
    rank, world = shard or (0, 1)
    columns = shard_columns(config.k, rank, world)
    keep = (lambda p: p) if world == 1 else (lambda p: p[:, columns].contiguous())  # a copy: the full P is freed
    subspaces = {}
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in layers.items()}
    pending = config.p_init in DATA_INITS and saved_subspaces is None
    if config.p_init == "orthogonal":
        for name, p_in, p_out in orthogonal_subspaces(shapes, config, device, subspace_threads):
            subspaces[name] = ModuleSubspace(name, keep(p_in), keep(p_out))
    elif config.p_init in DATA_INITS and not pending:
        for name, (p_in, p_out) in load_subspaces(saved_subspaces, shapes, config, None if world == 1 else columns).items():
            subspaces[name] = ModuleSubspace(name, p_in, p_out)
    elif pending:
        n_columns = columns.stop - columns.start
        for name, (out_f, in_f) in shapes.items():
            subspaces[name] = ModuleSubspace(name, torch.zeros(in_f, n_columns, dtype=config.torch_p_dtype),
                                             torch.zeros(out_f, n_columns, dtype=config.torch_p_dtype))
    else:
        for name, layer in layers.items():
            base_layer = layer.get_base_layer()
            with _gathered([base_layer.weight]):  # the svd_* inits read W: dequantized for a 4-/8-bit base
                p_in, p_out = build_module_subspaces(name, (layer.out_features, layer.in_features), config,
                                                     weight=dequantized_weight(base_layer), device=device)
            subspaces[name] = ModuleSubspace(name, keep(p_in), keep(p_out))

    regularizer = CLoRARegularizer(config, subspaces, adapter_name, shard_world=world, shard_rank=rank, pending=pending)
    if saved_subspaces is not None and config.p_init in DATA_INITS:
        from .subspace import subspaces_path

        regularizer.subspaces_file = subspaces_path(saved_subspaces)
    regularizer.register(peft_model)
    if fused_lora == "auto":
        numel = lambda lin: lin.in_features * lin.out_features  # noqa: E731 (read from attributes: valid under ZeRO-3)
        penalties = {name: regularizer.fused_penalty(name, numel(layer.lora_A[adapter_name]), numel(layer.lora_B[adapter_name]))
                     for name, layer in layers.items()}
        kept = fuse_lora_layers(layers, adapter_name, penalties)
        regularizer.fused_lora_note = fused_lora_note(len(layers), kept)
    peft_model.clora = regularizer
    return peft_model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel inside a DeepSpeed engine or DDP wrapper (or the model itself)."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def lora_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Full (gathered) CPU copies of the trainable LoRA weights, keyed as in ``model.state_dict()``.

    Under ZeRO-3 every rank must call this (it gathers).
    """
    peft_model = _unwrap(model)
    named = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    with _gathered([p for _, p in named]):
        return {n: p.detach().to("cpu", copy=True) for n, p in named}


def save_clora_adapter(model: torch.nn.Module, output_dir: Union[str, Path], overwrite: bool = False) -> Path:
    """Write a plain PEFT LoRA adapter (safetensors) plus ``clora_config.json`` and a model card to ``output_dir``.

    The result loads with ``peft.PeftModel.from_pretrained`` and no clora_ds import. Every rank calls
    this (under ZeRO-3 it gathers); rank 0 writes, through ``export_peft_adapter`` (the writer the checkpoint
    converter uses too), into a temporary sibling directory that is then renamed, so a crash never leaves a
    half-written adapter.
    """
    peft_model = _unwrap(model)
    state = lora_state_dict(peft_model)
    if _rank() == 0:
        base = peft_model.peft_config[peft_model.clora.adapter_name].base_model_name_or_path
        export_peft_adapter(output_dir, state, peft_model.clora.config, TrainingRecord(base_model=base, source="a live model"),
                            overwrite=overwrite, subspaces_file=peft_model.clora.subspaces_file)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return Path(output_dir)
