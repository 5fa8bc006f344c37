"""The base model: checked without loading its weights, then built (under zero.Init for ZeRO-3) with CLoRA attached.

``inspect_model`` reads config.json, the tokenizer and the weight files' headers and checks the CLoRA targets (k
against every adapted module) on a meta-device copy of the architecture, so a bad model or setting fails in seconds,
before any weight is read or any file written. ``build_model`` then loads it, attaches CLoRA and puts every module in
train mode: ``from_pretrained`` returns eval mode, PEFT switches only its own modules, and transformers checkpoints a
decoder layer (and dropout drops) only while that layer is training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .adapter import attach_clora, target_modules_and_problems
from .config import CLoRAConfig
from .ds_config import zero_stage
from .errors import ConfigError, UserError

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _weight_problems(model_dir: Path) -> List[str]:
    """Weight files present, listed shards present, safetensors headers readable and files not truncated."""
    from .export.merge import _safetensors_layout

    index = next((model_dir / n for n in WEIGHT_INDEXES if (model_dir / n).is_file()), None)
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            return [f"{index} is damaged ({_first_line(err)}); re-download or re-save the model"]
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            return [f"{model_dir}: {len(missing)} weight shard(s) listed in {index.name} are missing: {', '.join(missing[:3])}"]
    else:
        shards = [n for n in WEIGHT_FILES if (model_dir / n).is_file()][:1]
        if not shards:
            return [f"--model_name_or_path {model_dir}: no weights there (expected model.safetensors, or "
                    "model.safetensors.index.json and its shards); a model saved with save_pretrained has them"]
    problems = []
    for shard in shards:
        if shard.endswith(".safetensors"):
            try:
                _safetensors_layout(model_dir / shard)
            except UserError as err:
                problems.append(str(err))
    return problems


def inspect_model(name_or_path: str, trust_remote_code: bool = False):
    """(HF config, tokenizer, problems) of --model_name_or_path; config or tokenizer is None when it cannot be read."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(name_or_path)
    flag = f"--model_name_or_path {name_or_path}"
    looks_local = p.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") != 1
    if not p.exists():
        if looks_local:
            return None, None, [f"{flag}: no such directory"]
        if _offline():
            return None, None, [f"{flag}: not a local directory, and the hub is off (HF_HUB_OFFLINE is set); download "
                                "the model first (huggingface-cli download NAME --local-dir DIR) and pass the directory"]
    elif not p.is_dir():
        return None, None, [f"{flag} is a file; expected a saved HF model directory (config.json, tokenizer, weights)"]
    elif not (p / "config.json").is_file():
        return None, None, [f"{flag}: no config.json there; expected a saved HF model directory"]
    problems = []
    config = tokenizer = None
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # a damaged config.json, an unknown model_type, an unreachable hub
        where = f"{p / 'config.json'} cannot be read" if p.exists() else f"{flag}: cannot load its config from the hub"
        problems.append(f"{where} ({_first_line(err)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:
        if config is None:  # the tokenizer's class is read from the same damaged config
            return None, None, problems
        problems.append(f"{flag}: no usable tokenizer there (tokenizer.json, tokenizer.model or tokenizer_config.json; "
                        f"{_first_line(err)}); save the tokenizer beside the model")
    if tokenizer is not None and (tokenizer.eos_token_id is None or tokenizer.bos_token_id is None):
        problems.append(f"{flag}: the tokenizer has no {'EOS' if tokenizer.eos_token_id is None else 'BOS'} token; "
                        "examples are framed as [bos] prompt response [eos]")
    if p.is_dir():
        problems += _weight_problems(p)
    return config, tokenizer, problems


def linear_shapes(hf_config, trust_remote_code: bool = False) -> Dict[str, Tuple[int, int]]:
    """name -> (out, in) of every linear layer of the architecture ``hf_config`` describes (a meta-device copy)."""
    from transformers import AutoModelForCausalLM

    from .adapter import _linear_shapes

    with torch.device("meta"):
        return _linear_shapes(AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code))


def module_shapes(hf_config, clora: CLoRAConfig, trust_remote_code: bool = False):
    """(every linear layer, the modules CLoRA adapts), name -> (out, in), read from a meta-device copy of the
    architecture (None, None when it cannot be built: ``target_problems`` says why)."""
    from transformers import AutoModelForCausalLM

    from .adapter import _linear_shapes

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except Exception:
        return None, None
    return _linear_shapes(skeleton), target_modules_and_problems(skeleton, clora)[0]


def target_problems(hf_config, clora: CLoRAConfig, trust_remote_code: bool = False) -> List[str]:
    """CLoRA's targets and k against the architecture, built on the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except Exception as err:
        return [f"cannot build a causal LM from {getattr(hf_config, '_name_or_path', 'the model')}'s config "
                f"({_first_line(err)})"]
    conv1d = [n for n, m in skeleton.named_modules() if type(m).__name__ == "Conv1D"]  # transformers.pytorch_utils
    if conv1d:  # W stored as [in, out] (PEFT's fan_in_fan_out): P's sides, the export and the merge assume [out, in]
        return [f"--model_name_or_path {getattr(hf_config, '_name_or_path', '')}: a {hf_config.model_type} model, whose "
                f"layers are GPT-2-style Conv1D ({len(conv1d)}, e.g. {conv1d[0]}); the launcher supports decoder models "
                "built from nn.Linear layers (the LLaMA family: LLaMA, Mistral, Qwen2, ...)"]
    return target_modules_and_problems(skeleton, clora)[1]


def sequence_length_problems(hf_config, max_seq_length: int) -> List[str]:
    """--max_seq_length against the positions the model was trained on (its max_position_embeddings)."""
    limit = getattr(hf_config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_seq_length > limit:
        return [f"--max_seq_length {max_seq_length} exceeds the model's max_position_embeddings {limit}: it would train "
                f"on positions the model never learned; use --max_seq_length {limit} or less (or a model, or a rope "
                "scaling in its config.json, made for longer sequences)"]
    return []


def flash_attention_available() -> Tuple[bool, str]:
    """(True, "") when flash-attn can run here, else (False, the reason)."""
    if not torch.cuda.is_available():
        return False, "flash-attn needs a CUDA GPU and none is visible"
    try:
        import flash_attn  # noqa: F401  (the import is the check)
    except ImportError as err:
        return False, f"the flash-attn package does not import ({err}); pip install 'clora_ds[flash]'"
    return True, ""


def head_size(hf_config) -> Optional[int]:
    """Attention head size of a HF config (None when it has none to read)."""
    if hf_config is None:
        return None
    size = getattr(hf_config, "head_dim", None)
    if size is None and getattr(hf_config, "num_attention_heads", None):
        size = hf_config.hidden_size // hf_config.num_attention_heads
    return size


def choose_attention(requested: str, packing: bool, half_precision: bool = False, head_dim: Optional[int] = None) -> str:
    """The attn_implementation to build the model with.

    auto: flash_attention_2 when flash-attn imports on CUDA (its varlen kernels handle packed rows), else
    SDPA. With --packing, SDPA becomes PyTorch's own flash varlen kernel on CUDA in bf16/fp16 (clora_packed_varlen;
    its flash kernel takes head sizes that are multiples of 8 up to 256), else a per-sequence SDPA (clora_packed_sdpa):
    never a dense block-diagonal mask, so Σ len² work instead of T² per row. An explicit sdpa with --packing takes the
    per-sequence SDPA.
    """
    flash_ready, why_not = flash_attention_available()
    attn = requested
    if requested == "auto":
        attn = "flash_attention_2" if flash_ready else "sdpa"
    elif requested == "flash_attention_2" and not flash_ready:
        raise ConfigError(f"--attn_implementation flash_attention_2: {why_not}. Use --attn_implementation sdpa (or auto, "
                          "which picks flash_attention_2 only where it works)")
    if attn == "sdpa" and packing:
        from .attention import PACKED_SDPA, PACKED_VARLEN, varlen_available, varlen_head_size_ok

        head_ok = head_dim is None or varlen_head_size_ok(head_dim)
        return PACKED_VARLEN if requested == "auto" and half_precision and head_ok and varlen_available() else PACKED_SDPA
    return attn


def quantization_config(load_in_4bit: bool, load_in_8bit: bool, quant_type: str, dtype: torch.dtype):
    """bitsandbytes settings of a QLoRA base (None: not quantized). 4-bit: NF4 (or FP4), double quantization, compute
    and quant storage in the training dtype, so ZeRO-3 can partition the packed weights like any other parameter."""
    if not (load_in_4bit or load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)


def quantization_problems(load_in_4bit: bool, load_in_8bit: bool, ds_config: Optional[dict]) -> List[str]:
    """What rules out a quantized base here, before any weight is read."""
    if not (load_in_4bit or load_in_8bit):
        return []
    flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        return [f"{flag} needs bitsandbytes ({err}): pip install 'clora_ds[qlora]'"]
    zero = (ds_config or {}).get("zero_optimization", {})
    if zero.get("stage") == 3 and load_in_8bit:
        return ["--load_in_8bit cannot be sharded by ZeRO-3: LLM.int8 weights have no storage-dtype option, so DeepSpeed "
                "cannot partition them; use --load_in_4bit (its quant storage is the training dtype) or ZeRO-2"]
    if zero.get("stage") == 3 and zero.get("offload_param"):
        return [f"{flag} with ZeRO-3 parameter offload (offload_param) is not supported: the offloaded 4-bit weights "
                "would need their quantization state (absmax, the double-quant codebook), which ZeRO's offload does not "
                "move with them; use ds_configs/zero3.json (weights sharded across GPUs) for QLoRA"]
    return []


def keep_4bit_cpu_forward_as_trained(model) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on the forward training uses (dequantize W, matmul in the
    compute dtype), also in eval mode on the CPU; returns how many layers it set. Call it before the first forward.

    Why: on a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its own kernel at the first
    eval-mode forward without gradients. That kernel computes in bf16 whatever the compute dtype (logits differ from
    the training forward by bf16 rounding, so a figure depends on the CPU it ran on), and the repack takes only layers
    whose out_features is a multiple of 32 and in_features a multiple of the quant block size (64): any other shape
    fails with ``N must be divisible by block_n``. LLaMA 7B-70B shapes pass; the test models' odd sizes do not.
    Every eval-mode 4-bit forward in clora_ds (evaluation during training, ``--verify`` against the 4-bit base) goes
    through this, so it works for any shape and gives the same numbers as training on every x86-64 CPU.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: nothing of the model is 4-bit
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False  # the flag bitsandbytes' forward reads before repacking
    return len(layers)


def training_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def build_model(name_or_path: str, clora: CLoRAConfig, ds_config: dict, attn: str, dtype: torch.dtype,
                gradient_checkpointing="off", reentrant: bool = False, trust_remote_code: bool = False,
                seed: int = 0, quantization=None, shard: Optional[Tuple[int, int]] = None, saved_subspaces=None,
                fused_lora: str = "off", chunked_loss: str = "off", activation_offloading: bool = False,
                base_adapters=()):
    """The base model (under zero.Init for ZeRO-3, so it is never whole on one rank) with CLoRA attached, every
    module in train mode, and the decoder layers' activation memory as asked (``gradient_checkpointing``: a policy of
    activation_memory.py, off | full | selective | every_N, True meaning full; ``activation_offloading``; what was set
    up is ``model.activation_memory``). Data-derived P is loaded
    from ``saved_subspaces`` (a resume), else computed after ``deepspeed.initialize`` (``calibration.data_subspaces``).
    ``fused_lora`` goes to ``attach_clora``; ``chunked_loss="auto"`` installs the chunked loss on the output layer where
    ``chunked_loss_problem`` allows it: ``model.chunked_loss`` is then the ``ChunkedCausalLMLoss`` (else None).
    ``base_adapters`` (``base_adapters.LoraAdapter``, checked by plan_run) are merged into the loaded base weights, in
    order, before CLoRA is attached (under ZeRO-3 each weight gathered whole for it: ``merge_base_adapters``)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config) if zero_stage(ds_config) == 3 else None  # noqa: F841 (from_pretrained checks it)
    extra = {}
    if quantization is not None:
        extra["quantization_config"] = quantization
        if torch.cuda.is_available():  # bitsandbytes quantizes as the weights land on this rank's GPU
            extra["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code, **extra)
    if base_adapters:
        from .base_adapters import merge_base_adapters

        merge_base_adapters(model, list(base_adapters))
    keep_4bit_cpu_forward_as_trained(model)  # evaluation during training runs in eval mode
    model.config.use_cache = False  # a KV cache in training also hides packed sequences from the mask builder
    torch.manual_seed(seed)
    model = attach_clora(model, clora, subspace_device="cuda" if torch.cuda.is_available() else None, shard=shard,
                         saved_subspaces=saved_subspaces, fused_lora=fused_lora)
    from .activation_memory import configure_activation_memory
    from .loss import ChunkedCausalLMLoss, chunked_loss_problem

    model.chunked_loss = (ChunkedCausalLMLoss.install(model) if chunked_loss == "auto" and chunked_loss_problem(model) is None
                          else None)
    model.activation_memory = configure_activation_memory(model, gradient_checkpointing, reentrant, activation_offloading)
    model.train()
    return model, keep_alive
