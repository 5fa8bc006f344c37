"""Activation memory of the decoder layers: what each layer keeps for backward, what it recomputes, and where the
kept tensors live (``--gradient_checkpointing POLICY``, ``--activation_offloading``).

    off        every layer keeps what autograd saves (the most memory, no recompute)
    full       every layer keeps only its input and recomputes its whole forward in backward
    every_N    full checkpointing of layers 0, N, 2N, ... only; the others keep everything
    selective  every layer keeps the outputs of its matmuls and attention (aten mm / addmm / bmm /
               _scaled_dot_product_* / flash kernels) and recomputes the cheap ops between them (RMSNorm, RoPE,
               SwiGLU, casts): no GEMM runs twice. Needs non-reentrant checkpointing (torch's selective
               checkpoint contexts).

Offloading: a decoder layer's tensors saved for backward (under full / every_N checkpointing: a checkpointed layer's
input, the only thing it saves) go to pinned CPU memory in forward, copied on a side CUDA stream so the copy overlaps
the next kernels, and come back in backward. Parameters and tensors under ``OFFLOAD_MIN_BYTES`` (the LoRA path's
[tokens, r] activations) stay on the device. Under ``selective`` only the layer's input is offloaded: the matmul
outputs selective checkpointing keeps are held by torch's checkpoint cache, outside autograd's saved-tensor hooks.
On the CPU the hook runs just the same (counted in ``stats``) and moves nothing.

The CLoRA penalty is untouched by both: it is taken once per module and micro-batch in the forward (a non-reentrant
recompute finds its tap made), and its saved M and P bypass these hooks (adapter.py), so they are never offloaded.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .errors import ConfigError

POLICIES = ("off", "full", "selective", "every_N")
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "none", "")
OFFLOAD_MIN_BYTES = 1 << 20  # smaller saved tensors stay on the device: a copy costs more than the memory it frees
# ops whose outputs selective checkpointing keeps (prefixes of OpOverload.name()); all others are recomputed
SAVED_OP_PREFIXES = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_", "aten::_flash_attention_",
                     "aten::_efficient_attention_", "aten::_cudnn_attention_", "flash_attn::")


@dataclass(frozen=True)
class CheckpointingPolicy:
    """Which decoder layers recompute in backward: ``kind`` off | full | selective | every (every ``n``-th layer)."""

    kind: str
    n: int = 1

    def checkpoints(self, layer_index: int) -> bool:
        return self.kind in ("full", "selective") or (self.kind == "every" and layer_index % self.n == 0)

    def __str__(self) -> str:
        return f"every_{self.n}" if self.kind == "every" else self.kind


def checkpointing_policy(value) -> CheckpointingPolicy:
    """--gradient_checkpointing's value -> its policy; true (a bare flag, configs' ``true``) is full, false is off."""
    if isinstance(value, bool) or value is None:
        return CheckpointingPolicy("full" if value else "off")
    text = str(value).strip().lower()
    if text in _TRUE or text == "full":
        return CheckpointingPolicy("full")
    if text in _FALSE or text == "off":
        return CheckpointingPolicy("off")
    if text == "selective":
        return CheckpointingPolicy("selective")
    m = re.fullmatch(r"every_(-?\d+)", text)
    if m:
        return CheckpointingPolicy("every", int(m.group(1)))
    raise ConfigError(f"--gradient_checkpointing {value!r}: choose off, full (a bare --gradient_checkpointing, or true), "
                      "selective, or every_N (full checkpointing of every N-th decoder layer, e.g. every_2)")


def checkpointing_problems(value, reentrant: bool) -> List[str]:
    """What is wrong with --gradient_checkpointing and --gradient_checkpointing_reentrant (pure: no model read)."""
    try:
        policy = checkpointing_policy(value)
    except ConfigError as err:
        return [str(err)]
    problems = []
    if policy.kind == "every" and policy.n < 1:
        problems.append(f"--gradient_checkpointing {value}: N must be >= 1 (every_1 is full)")
    if policy.kind == "selective" and reentrant:
        problems.append("--gradient_checkpointing selective needs non-reentrant checkpointing (torch's selective "
                        "checkpoint contexts); drop --gradient_checkpointing_reentrant")
    return problems


def layer_count_problems(value, n_layers: Optional[int]) -> List[str]:
    """every_N against the model's ``n_layers`` decoder layers (its config's num_hidden_layers)."""
    try:
        policy = checkpointing_policy(value)
    except ConfigError:  # checkpointing_problems says why
        return []
    if policy.kind == "every" and isinstance(n_layers, int) and policy.n > n_layers >= 1:
        return [f"--gradient_checkpointing {value}: the model has {n_layers} decoder layers; N must be at most "
                f"{n_layers} (every_{n_layers} checkpoints layer 0 only)"]
    return []


def offloading_problems(offloading: bool, ds_config: Optional[dict]) -> List[str]:
    """--activation_offloading against the DeepSpeed config. ZeRO stages 0-3 and ZeRO's optimizer / parameter offload
    combine with it (other tensors; pinned host memory is what they share). DeepSpeed's own ``activation_checkpointing``
    section acts only on models that call ``deepspeed.checkpointing``, which HF models do not: asking for its CPU
    offload beside ours would promise an offload that never happens."""
    ac = (ds_config or {}).get("activation_checkpointing") or {}
    if offloading and isinstance(ac, dict) and (ac.get("cpu_checkpointing") or ac.get("partition_activations")):
        return ["--activation_offloading with the DeepSpeed config's activation_checkpointing.cpu_checkpointing / "
                "partition_activations: DeepSpeed's activation checkpointing acts only on models that call "
                "deepspeed.checkpointing, which HF models do not; drop that section (--activation_offloading and "
                "--gradient_checkpointing do it here)"]
    return []


# ----------------------------------------------------------------------------------------------- selective policy
@functools.lru_cache(maxsize=None)
def _is_saved_op(name: str) -> bool:
    return name.startswith(SAVED_OP_PREFIXES)


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    name = op.name() if hasattr(op, "name") else str(op)
    return CheckpointPolicy.MUST_SAVE if _is_saved_op(name) else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """The (forward, recompute) contexts of selective checkpointing. ``allow_cache_entry_mutation``: the fused LoRA
    projection adds its LoRA term into its base GEMM's output in place (``addmm_``); both ops are kept, and the recompute
    takes both from the cache, so no recomputed op reads the mutated value."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_selective_policy, allow_cache_entry_mutation=True)


def outside_dispatch_modes():
    """A context whose ops no TorchDispatchMode sees (selective checkpointing's among them): for the CLoRA penalty,
    which runs in a layer's forward but not in its recompute. Selective checkpointing pairs the n-th call of each op
    in the recompute with its n-th call in the forward; an op of the forward alone would shift every later pairing."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


# ----------------------------------------------------------------------------------------------- offloading
@dataclass
class OffloadStats:
    """Saved tensors that went through the offload hook since the last ``reset``: ``offloaded`` went to (on the CPU:
    already were in) host memory; ``reused`` were saved again in the same layer call and share that host copy;
    ``small`` (< min_bytes) and ``params`` (parameters and their views) stayed where they were."""

    offloaded: int = 0
    offloaded_bytes: int = 0
    reused: int = 0
    reused_bytes: int = 0
    small: int = 0
    small_bytes: int = 0
    largest_small_bytes: int = 0
    params: int = 0
    params_bytes: int = 0

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, 0)


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(getattr(t, "_base", None), torch.nn.Parameter)


class ActivationOffloader:
    """saved_tensors_hooks that move a decoder layer's saved activations to pinned host memory (torchtune's
    OffloadActivations is the model). One ``hooks()`` context per layer call: a tensor saved by several ops in it
    (the normalised hidden state that q, k and v all read) is copied once; the device tensor is referenced until the
    context ends, so no later tensor can take its address and be mistaken for it."""

    def __init__(self, min_bytes: int = OFFLOAD_MIN_BYTES):
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        self._stream = None
        self._seen: Optional[dict] = None

    @contextlib.contextmanager
    def hooks(self):
        outer, self._seen = self._seen, {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._seen = outer

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        st = self.stats
        if _is_parameter(t):
            st.params, st.params_bytes = st.params + 1, st.params_bytes + nbytes
            return t
        if nbytes < self.min_bytes or t.layout != torch.strided:
            st.small, st.small_bytes = st.small + 1, st.small_bytes + nbytes
            st.largest_small_bytes = max(st.largest_small_bytes, nbytes)
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)
        if self._seen is not None and key in self._seen:
            st.reused, st.reused_bytes = st.reused + 1, st.reused_bytes + nbytes
            return self._seen[key][1]
        st.offloaded, st.offloaded_bytes = st.offloaded + 1, st.offloaded_bytes + nbytes
        packed = self._to_host(t) if t.device.type == "cuda" else t  # on the CPU it is there already
        if self._seen is not None:
            self._seen[key] = (t, packed)
        return packed

    def _to_host(self, t: torch.Tensor):
        if self._stream is None:
            self._stream = torch.cuda.Stream(t.device)
        compute = torch.cuda.current_stream(t.device)
        self._stream.wait_stream(compute)  # t is written by the compute stream
        with torch.cuda.stream(self._stream):
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = self._stream.record_event()
        t.record_stream(self._stream)  # t's memory is not reused before the copy has read it
        return _OnHost(host, t.device, done)

    @staticmethod
    def _unpack(packed):
        if not isinstance(packed, _OnHost):
            return packed
        torch.cuda.current_stream(packed.device).wait_event(packed.done)
        return packed.host.to(packed.device, non_blocking=True)


@dataclass
class _OnHost:
    host: torch.Tensor
    device: torch.device
    done: object  # the CUDA event after the device-to-host copy


# ----------------------------------------------------------------------------------------------- the model
@dataclass
class ActivationMemory:
    """What ``configure_activation_memory`` set up: the policy, which decoder layers recompute, the offloader (or
    None)."""

    policy: CheckpointingPolicy
    reentrant: bool
    layers: int
    checkpointed: List[int] = field(default_factory=list)
    offloader: Optional[ActivationOffloader] = None

    def note(self) -> str:
        """One log line."""
        if self.policy.kind == "off":
            text = "activation checkpointing: off"
        else:
            kind = "reentrant" if self.reentrant else "non-reentrant"
            what = ("the matmul and attention outputs kept, the ops between them recomputed" if self.policy.kind == "selective"
                    else "each recomputes its forward in backward")
            text = (f"activation checkpointing: {self.policy} ({kind}), {len(self.checkpointed)} of {self.layers} decoder "
                    f"layers, {what}")
        if self.offloader is not None:
            where = "pinned CPU memory, copied on a side CUDA stream" if torch.cuda.is_available() else "the CPU (already there)"
            text += (f"; activation offloading: the decoder layers' saved tensors >= {self.offloader.min_bytes:,} bytes "
                     f"to {where}")
        return text


def decoder_layers(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The model's repeated decoder layers (transformers' GradientCheckpointingLayer), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def configure_activation_memory(model: torch.nn.Module, policy, reentrant: bool = False, offloading: bool = False,
                                min_offload_bytes: int = OFFLOAD_MIN_BYTES) -> ActivationMemory:
    """Set up checkpointing ``policy`` (a CheckpointingPolicy, or --gradient_checkpointing's value) and offloading on
    the decoder layers of ``model`` (a PEFT model or a HF model), in place. Each layer runs its forward through the
    function transformers' GradientCheckpointingLayer calls in training (``_gradient_checkpointing_func``): ours
    checkpoints it or not, under the offload hooks or not. Eval mode and no-grad forwards run the layer as is."""
    if not isinstance(policy, CheckpointingPolicy):
        policy = checkpointing_policy(policy)
    layers = decoder_layers(model)
    memory = ActivationMemory(policy, reentrant, len(layers))
    if policy.kind == "off" and not offloading:
        return memory
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no transformers GradientCheckpointingLayer decoder layers: "
                          "--gradient_checkpointing and --activation_offloading need them")
    if policy.kind != "off":
        # transformers' own switch: flags on every module that has one, and the inputs' requires_grad (PEFT)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        kwargs = {"use_reentrant": reentrant}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    memory.offloader = ActivationOffloader(min_offload_bytes) if offloading else None
    for i, layer in enumerate(layers):
        ckpt = policy.checkpoints(i)
        if ckpt:
            memory.checkpointed.append(i)
        layer.gradient_checkpointing = ckpt or offloading
        layer._gradient_checkpointing_func = functools.partial(
            _run_layer, checkpointed=ckpt, reentrant=reentrant, selective=policy.kind == "selective",
            offloader=memory.offloader)
    return memory


def _run_layer(function, *args, checkpointed: bool, reentrant: bool, selective: bool,
               offloader: Optional[ActivationOffloader]):
    from torch.utils.checkpoint import checkpoint

    with offloader.hooks() if offloader is not None else contextlib.nullcontext():
        if not checkpointed:
            return function(*args)
        extra = {"context_fn": selective_contexts} if selective else {}
        return checkpoint(function, *args, use_reentrant=reentrant, **extra)
