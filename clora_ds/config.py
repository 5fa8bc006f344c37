"""CLoRA settings: one validated dataclass, the single source of truth for the method's knobs.

R = Σ_m ½‖A_m P_in,m‖²_F + ½‖B_mᵀ P_out,m‖²_F,   total loss = task loss + lam · R
(A = lora_A [r, in], B = lora_B [out, r], P_in [in, k], P_out [out, k] orthonormal columns.)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

P_INITS = ("orthogonal", "svd_major", "svd_minor")
P_DTYPES = ("float32", "bfloat16", "float16", "float64")
CLORA_CONFIG_NAME = "clora_config.json"


class CLoRAConfigError(ValueError):
    """CLoRA settings that cannot work (for this model); the message lists every problem."""


@dataclass
class CLoRAConfig:
    """LoRA settings plus the CLoRA subspace regularizer settings."""

    r: int = field(default=8, metadata={"help": "LoRA rank r (lora_A is [r, in], lora_B is [out, r])."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is (alpha / r)·B·A. Usually 2*r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input, in [0, 1)."})
    target_modules: Union[str, list] = field(
        default="all-linear",
        metadata={"help": "Module name suffixes to adapt (e.g. q_proj,v_proj) or 'all-linear' (every linear layer but lm_head)."},
    )
    k: int = field(default=128, metadata={"help": "Subspace dimension k of P_in [in, k] and P_out [out, k]; k <= min(in, out) of every adapted module."})
    lam: float = field(default=1.0, metadata={"help": "Regularizer weight λ >= 0; 0 is exactly plain LoRA."})
    p_init: str = field(
        default="orthogonal",
        metadata={"help": "How P is built: 'orthogonal' (random Haar, the paper's default), 'svd_major' / 'svd_minor' (top / bottom-k singular vectors of the frozen W)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the subspaces; P is a pure function of (seed, module name, shape, k, p_init)."})
    p_dtype: str = field(default="float32", metadata={"help": "Storage dtype of P: float32, bfloat16, float16 or float64."})

    def __post_init__(self):
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        problems = []
        if not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if self.dropout < 0 or self.dropout >= 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.k, int) or self.k < 1:
            problems.append(f"k must be a positive integer, got {self.k!r}")
        if self.lam < 0:
            problems.append(f"lam (λ) must be >= 0, got {self.lam}; use lam=0 for plain LoRA")
        if self.p_init not in P_INITS:
            problems.append(f"unknown p_init {self.p_init!r}; choose one of {', '.join(P_INITS)}")
        if self.p_dtype not in P_DTYPES:
            problems.append(f"unknown p_dtype {self.p_dtype!r}; choose one of {', '.join(P_DTYPES)}")
        if not self.target_modules:
            problems.append("target_modules is empty; name module suffixes such as q_proj,v_proj or use 'all-linear'")
        if problems:
            raise CLoRAConfigError("Invalid CLoRA config:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CLoRAConfigError(f"Unknown CLoRA config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def save(self, directory: Union[str, Path]) -> Path:
        path = Path(directory) / CLORA_CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: Union[str, Path]) -> "CLoRAConfig":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / CLORA_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"No CLoRA settings at {path}; expected the {CLORA_CONFIG_NAME} written beside the adapter")
        return cls.from_dict(json.loads(path.read_text()))

    def peft_lora_config(self, target_modules):
        """The PEFT ``LoraConfig`` of these settings for the given module names: what ``attach_clora`` injects
        and what every exported adapter's ``adapter_config.json`` holds (the update is (alpha / r)·B·A)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=sorted(target_modules),
                          bias="none", task_type="CAUSAL_LM")

    @property
    def torch_p_dtype(self):
        import torch

        return getattr(torch, self.p_dtype)
