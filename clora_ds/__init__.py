"""clora_ds: CLoRA adapters (LoRA + a fixed-subspace regularizer) trained with DeepSpeed."""
from .config import CLoRAConfig, CLoRAConfigError
from .penalty import GroupedSubspacePenalty, SubspacePenalty, grouped_subspace_penalty, subspace_penalty
from .subspace import build_module_subspaces, random_orthonormal, subspace_seed, svd_subspaces

__version__ = "0.1.0"


def __getattr__(name):
    # adapter pulls in peft/transformers; import it only when asked for
    if name in ("attach_clora", "save_clora_adapter", "lora_state_dict", "resolve_target_modules", "CLoRARegularizer"):
        from . import adapter

        return getattr(adapter, name)
    raise AttributeError(name)


__all__ = [
    "CLoRAConfig",
    "CLoRAConfigError",
    "SubspacePenalty",
    "GroupedSubspacePenalty",
    "subspace_penalty",
    "grouped_subspace_penalty",
    "build_module_subspaces",
    "random_orthonormal",
    "subspace_seed",
    "svd_subspaces",
    "attach_clora",
    "save_clora_adapter",
    "lora_state_dict",
    "resolve_target_modules",
    "CLoRARegularizer",
]
