"""``--compile_layers``: torch.compile of every decoder layer, one graph per layer shape shared by all layers.

What makes a layer compile as one graph: nothing inside it touches Python state. The CLoRA penalty normally does
(its hooks record which modules' gradient taps are made), so with compiled layers the regularizer takes R from the
LoRA weights in ``penalty_term`` instead (``CLoRARegularizer.use_weight_penalty``): the same R and the same
gradient, once per micro-batch, by ordinary autograd. That needs the LoRA weights whole on every rank, so ZeRO-3 is
refused (its per-module gather hooks would break the graph at every projection too). Activation checkpointing
(full, every_N, selective) is traced into the graph (torch's checkpoint higher-order op: the compiled backward
recomputes what the policy says). Activation offloading is refused: its saved-tensor hooks break the graph.
Quantized (bitsandbytes) bases are refused: untested here.

Shapes: packed or padded batches are as long as their longest row, so the sequence length changes from step to
step. Dynamo's automatic dynamic shapes compile a layer once for the first length and once more, with a symbolic
length, at the first different one; after that no length recompiles. The first layer compiles apart from the others
(its input needs no gradient), evaluation (no grad) adds its own graphs. ``compiled_graphs()`` counts them all; the
launcher writes the count into metrics.jsonl, so a recompile per step would show there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .errors import ConfigError

DEFAULT_BACKEND = "inductor"


def compile_backends() -> List[str]:
    """Every torch.compile backend this torch has, the debugging ones (aot_eager, eager) included."""
    import torch._dynamo as dynamo

    return sorted(dynamo.list_backends(exclude_tags=()))


def compile_problems(compile_layers: bool, backend: str, zero: int, offloading: bool, quantized: bool) -> List[str]:
    """What is wrong with --compile_layers / --compile_backend for this run (no model read; the inductor probe on a
    machine without CUDA compiles one tiny kernel, writing only to torch's own cache directory)."""
    problems = []
    if backend != DEFAULT_BACKEND and not compile_layers:
        return [f"--compile_backend {backend} without --compile_layers: it would do nothing; add --compile_layers or "
                "drop --compile_backend"]
    if not compile_layers:
        return []
    backends = compile_backends()
    if backend not in backends:
        return [f"--compile_backend {backend!r}: torch {torch.__version__} has {', '.join(backends)}"]
    if zero == 3:
        problems.append("--compile_layers with ZeRO-3: ZeRO-3 gathers each weight in its module's forward hook and the "
                        "CLoRA penalty must be taken there, both outside a compiled graph; use ZeRO-2 (or 0/1) with "
                        "--compile_layers, or drop it")
    if offloading:
        problems.append("--compile_layers with --activation_offloading: the offload's saved-tensor hooks break the "
                        "compiled graph; choose one (--gradient_checkpointing combines with --compile_layers)")
    if quantized:
        problems.append("--compile_layers with --load_in_4bit / --load_in_8bit is not supported (bitsandbytes' layers "
                        "inside a compiled graph are untested here); drop one of them")
    if not problems and backend == "inductor" and not torch.cuda.is_available():
        problem = _cpu_inductor_problem()
        if problem:
            problems.append(problem)
    return problems


def _cpu_inductor_problem() -> Optional[str]:
    """Inductor's CPU kernels are C++ built at run time (a C++ compiler and Python's headers): try one."""
    try:
        fn = torch.compile(lambda x: (x * 2.0).sin(), backend="inductor", fullgraph=True)
        fn(torch.ones(8))
    except Exception as err:  # noqa: BLE001 (any failure of the toolchain is the user's answer)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return (f"--compile_layers: torch.compile (inductor) cannot build CPU kernels on this machine ({first}); install "
                "a C++ compiler and Python's development headers, pass --compile_backend aot_eager, or drop "
                "--compile_layers")
    finally:
        import torch._dynamo as dynamo

        dynamo.reset()
    return None


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (every layer variant, recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class CompiledLayers:
    layers: int
    backend: str

    def note(self) -> str:
        return (f"torch.compile: {self.layers} decoder layers ({self.backend}; the CLoRA penalty taken from the LoRA "
                "weights, outside the layers); the first steps and the first evaluation compile (minutes on a large "
                "model), later steps reuse the graphs: compiled_graphs in metrics.jsonl")


def compile_decoder_layers(model: torch.nn.Module, backend: str = DEFAULT_BACKEND) -> CompiledLayers:
    """torch.compile every decoder layer of ``model`` (a PEFT model with CLoRA attached, in place; lazy: each compiles
    at its first call), after switching the regularizer to the weight penalty. Call after any calibration forward
    (``data_subspaces``), whose hooks must not be traced."""
    from .activation_memory import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no transformers GradientCheckpointingLayer decoder layers: "
                          "--compile_layers needs them")
    if hasattr(model, "clora"):
        model.clora.use_weight_penalty(model)
    for layer in layers:
        layer.compile(backend=backend, dynamic=None)
    return CompiledLayers(len(layers), backend)
