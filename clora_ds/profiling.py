"""Where a step's time goes: --profile_steps A-B (a torch.profiler trace of those optimizer steps on rank 0; every other
step pays nothing) and the model FLOPs behind the mfu column of metrics.jsonl (``ModelFlops`` over ``peak_tflops``)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .arguments import profile_window
from .distributed import log, rank


class StepProfiler:
    """torch.profiler over optimizer steps [first, last] (1-based) on rank 0; other ranks and steps pay nothing.

    Writes OUTPUT_DIR/profile/trace.json (chrome://tracing, Perfetto) and top_ops.txt (ops by self time on the
    GPU, or the CPU without one), and logs where they are.
    """

    def __init__(self, spec: Optional[str], output_dir: Path):
        window = profile_window(spec) if spec else None
        self.first, self.last = window if window and rank() == 0 else (0, -1)
        self.dir = output_dir / "profile"
        self.prof = None

    def before(self, step: int) -> None:
        if step + 1 == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()

    def after(self, step: int) -> None:
        if self.prof is None or step + 1 != self.last:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.dir / "trace.json"))
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60)
        (self.dir / "top_ops.txt").write_text(f"steps {self.first}-{self.last}, sorted by {key}\n{table}\n")
        self.prof = None
        log(f"profiled steps {self.first}-{self.last}: {self.dir / 'trace.json'}, {self.dir / 'top_ops.txt'}")


# Dense bf16/fp16 tensor-core peak of one GPU, TFLOP/s, by a pattern of torch.cuda.get_device_name(); the vendors'
# datasheets quote these with 2:4 sparsity as twice as much (sources: docs/performance.md). First match wins.
PEAK_TFLOPS = (
    (r"H100.*PCIe", 756.0), (r"H[12]00.*NVL", 835.0), (r"GH200|H100|H200", 989.0), (r"B200", 2250.0),
    (r"A100|A800", 312.0), (r"L40S", 362.0), (r"\bL4\b", 121.0), (r"\bA10\b", 125.0), (r"MI300X", 1307.0),
)


def peak_tflops(given: Optional[float], dtype: torch.dtype, device_name: Optional[str] = None) -> Optional[float]:
    """The per-GPU peak MFU is measured against: --peak_tflops, else the table's entry for this GPU when training in
    bf16/fp16 (None on the CPU, in fp32, or for a GPU not in the table)."""
    if given is not None:
        return given
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((tflops for pattern, tflops in PEAK_TFLOPS if re.search(pattern, device_name)), None)


@dataclass(frozen=True)
class ModelFlops:
    """Model FLOPs of training tokens, forward + backward (activation checkpointing's recompute is not counted: MFU
    counts the model's work, not the hardware's):

        FLOPs = (4·N_frozen + 6·N_trainable)·tokens + 6·layers·d_attn·Σ_sequences L²

    N: the weights of the linear layers (every projection, LoRA's A and B, the output layer; not the embedding table,
    a lookup, nor norms). Per token each weight costs 2 FLOPs forward and 2 for the gradient of its input; a trained
    one 2 more for its own gradient (the frozen base has none: the issue's 4N for LoRA). Attention of a sequence of L
    tokens, per layer: QKᵀ and A·V over the causal half, 2·d_attn·L² forward, twice that backward (d_attn = heads ×
    head size). Packed rows count each sequence's own L (no attention across sequences)."""

    frozen: int
    trainable: int
    layers: int
    attn_width: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelFlops":
        """From the model's shapes (in/out features and config: valid under ZeRO-3 partitioning and for a 4-bit base)."""
        from .model import head_size

        frozen = trainable = 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                n = module.in_features * module.out_features
                if module.weight.requires_grad:
                    trainable += n
                else:
                    frozen += n
        config = model.config
        return cls(frozen, trainable, config.num_hidden_layers, config.num_attention_heads * head_size(config))

    def __call__(self, tokens: int, squared_lengths: int) -> float:
        """FLOPs of ``tokens`` training tokens whose sequences' squared lengths sum to ``squared_lengths``."""
        return (4 * self.frozen + 6 * self.trainable) * tokens + 6 * self.layers * self.attn_width * squared_lengths


def squared_lengths(batches, step: int) -> int:
    """Σ L² over the sequences (examples) of global step ``step``: what attention's FLOPs grow with."""
    units = batches.step_units(step)
    examples = [ex for unit in units for ex in unit] if batches.packed else units
    return sum(len(ex["input_ids"]) ** 2 for ex in examples)
