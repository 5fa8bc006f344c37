from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="clora_ds",
    version="0.1.0",
    description="CLoRA adapters (LoRA + fixed-subspace regularizer) for LLaMA-class models, trained with DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["clora_ds", "clora_ds.*"]),
    # lm-eval task templates and the accuracy metric module, loaded by path (nothing fetched)
    package_data={"clora_ds.evaluation": ["lm_eval_tasks/*", "metrics/accuracy/*.py"]},
    install_requires=[
        # torch is pinned by the user's environment (CUDA build on clusters); any 2.4+ works
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46,<6",
        "peft>=0.13",
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf>=4",  # transformers 5 needs it to convert sentencepiece tokenizers
        "tqdm>=4.66",
        "pyyaml>=6",
    ],
    entry_points={"console_scripts": ["clora-ds-convert=clora_ds.export.convert:main"]},  # = python launch/convert_to_peft.py
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "qlora": ["bitsandbytes>=0.44"],
        "eval": ["evaluate>=0.4", "matplotlib>=3.8", "lm_eval>=0.4.9"],
        "assets": ["gguf>=0.10"],  # launch/prepare_assets.py smollm2: transformers reads the GGUF through it
        "dev": ["pytest>=8", "matplotlib>=3.8", "evaluate>=0.4", "lm_eval>=0.4.9", "gguf>=0.10", "bitsandbytes>=0.44"],
    },
)
