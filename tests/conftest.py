import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SCRIPTS = ROOT / "tests" / "scripts"

# No test may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny LLaMA (odd sizes, GQA) with a sentencepiece tokenizer trained on tests/data."""
    from clora_ds.tiny import build_tiny_llama, record_text, train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    records = [json.loads(line) for line in (DATA / "alpaca_tiny.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer([record_text(r) for r in records], root / "model", vocab_size=200)
    model = build_tiny_llama(len(tokenizer), seed=0)
    model.save_pretrained(str(root / "model"))
    return root / "model"


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def counting_penalty(calls: list):
    """A SubspacePenalty that appends to ``calls`` on every evaluation: set it as clora_ds.adapter.SubspacePenalty to
    count the penalty's evaluations per step."""
    from clora_ds.penalty import SubspacePenalty

    class Counting(SubspacePenalty):
        @staticmethod
        def forward(ctx, x, p):
            calls.append(1)
            return SubspacePenalty.forward(ctx, x, p)

    return Counting


def run_checked(cmd, timeout=900, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def deepspeed_cmd(num_ranks=2):
    """The real `deepspeed` launcher, run by this interpreter (no reliance on a PATH shim; never skipped)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(29500 + os.getpid() % 2000)]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords:
            try:
                import torch

                has_gpu = torch.cuda.is_available()
            except ImportError:
                has_gpu = False
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the real deepspeed launcher or trains for a while (CI runs these too)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slurm: runs jobs on a real two-node SLURM cluster built on this machine (root, "
                                       "slurm-wlm and munge; skipped without them, installed by .ci/run)")


def tree_hash(path):
    """sha256 over every file's relative path and bytes, and every directory's path, under ``path`` (None if absent):
    equal before and after means nothing was created, changed or removed there."""
    import hashlib

    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode() + (b"/" if p.is_dir() else b""))
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
