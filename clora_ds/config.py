"""CLoRA settings: one validated dataclass, the single source of truth for the method's knobs.

R = Σ_m ½‖A_m P_in,m‖²_F + ½‖B_mᵀ P_out,m‖²_F,   total loss = task loss + lam · R
(A = lora_A [r, in], B = lora_B [out, r], P_in [in, k], P_out [out, k] orthonormal columns.)

``launch/train.py``'s LoRA / CLoRA flags are generated from these fields (``metadata["flag"]`` names the flag;
defaults and help text are these), so the library and the launcher cannot disagree. The defaults are the
LLM-Adapters settings the CLoRA paper trains with (dropout 0.05 on q, k, v, up, down).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from .errors import CLoRAConfigError

P_INITS = ("orthogonal", "svd_major", "svd_minor", "activations", "adapters")
DATA_INITS = ("activations", "adapters")  # P derived from data: not a function of the seed, so saved (CLORA_SUBSPACES_NAME)
P_DTYPES = ("float32", "bfloat16", "float16", "float64")
CLORA_CONFIG_NAME = "clora_config.json"
CLORA_SUBSPACES_NAME = "clora_subspaces.safetensors"  # data-derived P, whole: "{module}.p_in" [in, k], "{module}.p_out" [out, k]
MIN_TOKENS_PER_K = 4  # calibration tokens per column of P below which the covariance's top-k is a noisy estimate
LLAMA_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"

__all__ = ["CLoRAConfig", "CLoRAConfigError", "CLORA_CONFIG_NAME", "CLORA_SUBSPACES_NAME", "DATA_INITS", "P_INITS", "P_DTYPES",
           "clora_flags"]


@dataclass
class CLoRAConfig:
    """LoRA settings plus the CLoRA subspace regularizer settings."""

    r: int = field(default=8, metadata={"flag": "lora_r", "help": "LoRA rank r (lora_A is [r, in], lora_B is [out, r])."})
    alpha: float = field(default=16.0, metadata={"flag": "lora_alpha", "help": "LoRA alpha; the update is (alpha / r)·B·A. Usually 2*r."})
    dropout: float = field(default=0.05, metadata={"flag": "lora_dropout", "help": "Dropout on the LoRA branch input, in [0, 1)."})
    target_modules: Union[str, list] = field(
        default=LLAMA_TARGETS,
        metadata={"flag": "target_modules", "help": "Module name suffixes to adapt (comma-separated, e.g. q_proj,v_proj) or "
                  "'all-linear' (every linear layer but lm_head)."},
    )
    k: int = field(default=128, metadata={"flag": "clora_k", "help": "Subspace dimension k of P_in [in, k] and P_out [out, k]; "
                                          "k <= min(in, out) of every adapted module."})
    lam: float = field(default=1.0, metadata={"flag": "clora_lambda", "help": "Regularizer weight λ >= 0; 0 is exactly plain LoRA."})
    p_init: str = field(
        default="orthogonal",
        metadata={"flag": "clora_p_init", "help": "How P is built: 'orthogonal' (random Haar, the paper's default), 'svd_major' / "
                  "'svd_minor' (top / bottom-k singular vectors of the frozen W), 'activations' (top-k eigenvectors of the "
                  "second moment E[x xᵀ] of each module's inputs, and of its frozen outputs W·x, over --clora_p_tokens tokens "
                  "of --clora_p_data), 'adapters' (the span of earlier PEFT LoRA adapters, --clora_p_adapters: their lora_A "
                  "rows for P_in, lora_B columns for P_out; completed to k by the activations of --clora_p_data when they "
                  "span fewer); data-derived P is saved as clora_subspaces.safetensors with every checkpoint and the adapter."},
    )
    seed: int = field(default=0, metadata={"flag": "seed", "help": "Seed of the subspaces; P is a pure function of (seed, module "
                                           "name, shape, k, p_init)."})
    p_dtype: str = field(default="float32", metadata={"flag": "clora_p_dtype", "help": "Storage dtype of P: float32, bfloat16, "
                                                      "float16 or float64."})
    p_data: Optional[str] = field(
        default=None,
        metadata={"flag": "clora_p_data", "help": "Calibration data of --clora_p_init activations: a file in any training format "
                  "(.json, .jsonl, .parquet, .txt; general text, not the task), tokenized as for training and concatenated "
                  "into rows of --max_seq_length tokens. Read once, at the start of a run (a resume uses the saved P). With "
                  "--clora_p_init adapters (optional): completes P to k columns where the adapters span fewer."},
    )
    p_adapters: Optional[str] = field(
        default=None,
        metadata={"flag": "clora_p_adapters", "help": "The earlier PEFT LoRA adapters of --clora_p_init adapters, comma-separated "
                  "directories (adapter_config.json + adapter_model.safetensors): P_in spans their lora_A rows, P_out their "
                  "lora_B columns, per module; they must adapt every module this run adapts, with the base model's shapes. "
                  "Read once, at the start of a run."},
    )
    p_tokens: int = field(default=131072, metadata={"flag": "clora_p_tokens", "help": "Calibration tokens for --clora_p_init "
                                                    "activations: the first N tokens of --clora_p_data (all of it when it "
                                                    f"has fewer); at least --clora_k, and >= {MIN_TOKENS_PER_K}·k for a "
                                                    "stable estimate."})
    p_fingerprint: Optional[str] = field(
        default=None,
        metadata={"flag": None, "label": "--clora_p_data (the calibration tokens' fingerprint)",
                  "help": "sha256 of the calibration token ids P was computed from (recorded by the launcher, not a flag)."},
    )

    def __post_init__(self):
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        problems = self.problems(self.to_dict())
        if problems:
            raise CLoRAConfigError("Invalid CLoRA config:\n  - " + "\n  - ".join(f"{name} {text}" for name, text in problems))

    @staticmethod
    def problems(values: Dict[str, object]) -> List[Tuple[str, str]]:
        """[(field, what is wrong with it)] for these settings, each read as "FIELD TEXT"; the library names the
        fields, the launcher its flags (``--clora_k must be a positive integer, got 0``)."""
        out = []

        def positive_int(name):
            v = values.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                out.append((name, f"must be a positive integer, got {v!r}"))

        def number(name, ok, text):
            v = values.get(name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
                out.append((name, f"{text}, got {v!r}"))

        positive_int("r")
        number("alpha", lambda v: v > 0, "must be a positive number")
        number("dropout", lambda v: 0 <= v < 1, "must be in [0, 1)")
        positive_int("k")
        number("lam", lambda v: v >= 0, "(λ) must be a finite number >= 0 (0 is plain LoRA)")
        for name, choices in (("p_init", P_INITS), ("p_dtype", P_DTYPES)):
            if values.get(name) not in choices:
                out.append((name, f"{values.get(name)!r} is not one of {', '.join(choices)}"))
        positive_int("p_tokens")
        data, init, adapters = values.get("p_data"), values.get("p_init"), values.get("p_adapters")
        if init == "adapters" and not adapters:
            out.append(("p_adapters", "is needed by p_init adapters: give the earlier PEFT LoRA adapter directories, "
                                      "comma-separated"))
        elif adapters and init != "adapters":
            out.append(("p_adapters", f"is read only by p_init adapters, and p_init is {init!r}; drop it or set p_init "
                                      "to adapters"))
        if init == "activations" and not data:
            out.append(("p_data", f"is needed by p_init {init}: give a calibration file of general text (any training "
                                  "format, e.g. a .txt file)"))
        elif data and init not in DATA_INITS:
            out.append(("p_data", f"is read only by p_init activations, and p_init is {init!r}; drop it or set p_init "
                                  "to activations (p_init adapters reads it too, to complete P to k)"))
        tokens, k = values.get("p_tokens"), values.get("k")
        if init in DATA_INITS and data and all(isinstance(v, int) and v >= 1 for v in (tokens, k)) and tokens < k:
            out.append(("p_tokens", f"{tokens} is fewer than k={k}: the second moment of n tokens has rank <= n, so its "
                                    f"top-k eigenvectors need at least k tokens (>= {MIN_TOKENS_PER_K * k} for a stable "
                                    "estimate)"))
        targets = values.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            out.append(("target_modules", "is empty; name module suffixes such as q_proj,v_proj or use 'all-linear'"))
        return out

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
            raise CLoRAConfigError(f"No CLoRA settings at {path}; expected the {CLORA_CONFIG_NAME} written beside the adapter")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CLoRAConfigError(f"{path}: malformed JSON ({err})") from None
        if not isinstance(data, dict):
            raise CLoRAConfigError(f"{path}: expected a JSON object of CLoRA settings")
        return cls.from_dict(data)

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


def clora_flags() -> Dict[str, dataclasses.Field]:
    """Command-line flag name -> the CLoRAConfig field it sets."""
    return {f.metadata["flag"]: f for f in dataclasses.fields(CLoRAConfig) if f.metadata["flag"]}

