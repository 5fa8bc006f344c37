"""The run directory OUT/: its names, how a run starts in it, checkpoint saving, and metrics.jsonl.

    OUT/train_config.json       resolved settings, DeepSpeed config and the run's identity (written at start)
    OUT/metrics.jsonl           one JSON line per logging step and per evaluation (a resumed run re-logs steps)
    OUT/loss_curve.png          drawn from metrics.jsonl at the end
    OUT/checkpoint-STEP/        DeepSpeed's shards of the trainable weights and optimizer (frozen weights excluded),
                                trainer_state.json, rng_state_RANK.pt, clora_config.json, train_config.json, and
                                COMPLETE, written last, after every rank's files are on disk; with data-derived P
                                (--clora_p_init activations) also clora_subspaces.safetensors, a link to OUT's
    OUT/clora_subspaces.safetensors   data-derived P, whole, written once after the calibration pass
    OUT/adapter/                the final PEFT adapter (the final checkpoint, converted)

Nothing here writes before ``start_run_dir``: ``inspect_output_dir`` only looks (and probes that it could write).
Only complete checkpoints are resumed from or counted by --save_total_limit; a checkpoint is deleted by renaming
it to a hidden name first, so a crash mid-delete never leaves a half-deleted directory that looks complete.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .config import CLORA_SUBSPACES_NAME
from .distributed import barrier, gather_texts, log, on_rank0, rank
from .errors import CheckpointError, ConfigError

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
ADAPTER_DIR = "adapter"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RNG_FILE = "rng_state_{rank}.pt"
RUN_ARTIFACTS = (METRICS_FILE, TRAIN_CONFIG_FILE, ADAPTER_DIR, LOSS_CURVE_FILE, CLORA_SUBSPACES_NAME, "profile", "monitor",
                 "peft_adapter", "zero_to_fp32.py", "zero_to_torch.py")  # the last two: DeepSpeed's recovery scripts, copied on save
DELETING_PREFIX = ".deleting-"
BEST_METRICS = {"loss": min, "accuracy": max}  # an eval metric's kind -> which value is best (--save_best_metric)
EVAL_METRIC_RE = re.compile(r"^eval_(?:(?P<name>[A-Za-z0-9][A-Za-z0-9_-]*)_)?(?P<kind>loss|accuracy)$")


def eval_metric(name: Optional[str], kind: str) -> str:
    """The key of an eval set's metric: eval_loss / eval_accuracy for a bare --eval_file, eval_NAME_loss /
    eval_NAME_accuracy for a named set (NAME=SOURCE)."""
    return f"eval_{name}_{kind}" if name else f"eval_{kind}"


def best_metric_direction(metric: str):
    """min or max: which value of an eval metric (``eval_metric``'s keys) is best; None when it is not one."""
    m = EVAL_METRIC_RE.match(metric or "")
    return BEST_METRICS[m.group("kind")] if m else None


def list_checkpoints(output_dir: Path, complete_only: bool = True) -> List[Tuple[int, Path]]:
    """[(step, path)] of the checkpoint-STEP directories in a training output directory, sorted by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (not complete_only or (p / COMPLETE_MARKER).is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def run_artifacts(output_dir: Path) -> List[Path]:
    """What a previous run left in output_dir (checkpoints, metrics, adapter, ...); other files are not ours."""
    if not output_dir.is_dir():
        return []
    return sorted(p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) or p.name in RUN_ARTIFACTS)


# ---------------------------------------------------------------------------------------------------
# reading what a run wrote (one reader each)
# ---------------------------------------------------------------------------------------------------
def read_json(path: Path) -> Optional[dict]:
    """A JSON object file, or None when it does not exist; CheckpointError naming it when it is damaged."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f":{err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path}{where}: malformed JSON ({getattr(err, 'msg', err)}); the file is damaged") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


def read_trainer_state(checkpoint: Path) -> dict:
    """trainer_state.json of a checkpoint: step, epoch, global batch, packing, and the run's identity."""
    state = read_json(Path(checkpoint) / STATE_FILE)
    if state is None:
        raise CheckpointError(f"{checkpoint} has no {STATE_FILE}: it was not written by launch/train.py, or not completely")
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{Path(checkpoint) / STATE_FILE} has no step number; the file is damaged")
    return state


def read_train_config(directory: Path) -> Optional[dict]:
    """train_config.json of a run (or of a checkpoint, which carries a copy)."""
    return read_json(Path(directory) / TRAIN_CONFIG_FILE)


def read_metrics(path: Path) -> Dict[Tuple[int, str], dict]:
    """{(step, "train" | "eval"): row} of a metrics.jsonl. A resumed run re-logs steps: the last line of a step and
    kind wins. Lines cut short by a crash are skipped."""
    rows = {}
    if Path(path).is_file():
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows[(row["step"], "eval" if any(EVAL_METRIC_RE.match(k) for k in row) else "train")] = row
    return rows


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing ``path`` (disk full, quota, permissions) becomes one clear error naming it."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"cannot write {path} ({err.strerror or err}); free space or fix the directory, then continue "
                          "with --resume_from_checkpoint auto") from None


class MetricsLog:
    """Appends one JSON line per call to OUT/metrics.jsonl on rank 0 (a no-op elsewhere), flushed each time."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / METRICS_FILE
        with writing(self.path):
            self.file = open(self.path, "a") if rank() == 0 else None

    def write(self, row: dict) -> None:
        if self.file:
            with writing(self.path):
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def plot_losses(metrics_path: Path, out_png: Path) -> Dict[str, Tuple[List[int], List[float]]]:
    """Task loss, task + λ·R and each eval set's loss per step, from ``read_metrics`` (each step once, cut lines
    skipped); returns what it drew: label -> (steps, values) ("eval loss", "eval NAME loss")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train_rows = [rows[k] for k in sorted(rows) if k[1] == "train" and "task_loss" in rows[k]]
    eval_rows = [rows[k] for k in sorted(rows) if k[1] == "eval"]
    steps = [r["step"] for r in train_rows]
    series = {"task loss": (steps, [r["task_loss"] for r in train_rows]),
              "task + λ·R": (steps, [r["task_loss"] + r.get("penalty", 0.0) for r in train_rows])}
    loss_keys = sorted({k for r in eval_rows for k in r if k.endswith("_loss") and EVAL_METRIC_RE.match(k)})
    for key in loss_keys:
        have = [r for r in eval_rows if key in r]
        series[key.replace("_", " ")] = ([r["step"] for r in have], [r[key] for r in have])
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, "o-" if label.startswith("eval") else "-", label=label, alpha=0.7 if "R" in label else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return series


# ---------------------------------------------------------------------------------------------------
# how a run starts: decided before anything is written
# ---------------------------------------------------------------------------------------------------
@dataclass
class RunStart:
    """Where the run starts: from scratch or from a checkpoint, and what of an earlier run it replaces."""

    output_dir: Path
    resume: Optional[Path] = None                          # the complete checkpoint to continue from
    replaces: List[Path] = field(default_factory=list)     # an earlier run's files, removed by start_run_dir
    leftover_config: Optional[dict] = None                 # train_config.json of the files it would replace
    notes: List[str] = field(default_factory=list)         # what to log about the decision


def _write_problem(path: Path) -> Optional[str]:
    """Why nothing can be written at ``path`` (or under its nearest existing ancestor); None when it can.
    Probes with a temporary directory that is removed at once: permissions alone do not tell (root, read-only
    or special filesystems)."""
    probe_at = path
    while not probe_at.exists():
        if probe_at.parent == probe_at:
            return f"{path}: no existing parent directory"
        probe_at = probe_at.parent
    if not probe_at.is_dir():
        return f"{probe_at} is a file, so {path} cannot be created there"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".clora_write_test-", dir=probe_at))
    except OSError as err:
        return f"cannot write in {probe_at} ({err.strerror or err})"
    return None


def inspect_output_dir(output_dir: Path, resume_from: Optional[str], overwrite: bool) -> Tuple[RunStart, List[str]]:
    """(the start decision, problems) for --output_dir and --resume_from_checkpoint; writes nothing."""
    output_dir = Path(output_dir)
    start, problems = RunStart(output_dir), []
    if output_dir.exists() and not output_dir.is_dir():
        return start, [f"--output_dir {output_dir} is a file; give a directory (it is created if missing)"]
    why = _write_problem(output_dir)
    if why:
        problems.append(f"--output_dir {output_dir}: {why}")
    found = run_artifacts(output_dir)
    if resume_from == "auto":
        complete = list_checkpoints(output_dir)
        if complete:
            start.resume = complete[-1][1]
            return start, problems
        incomplete = [p.name for _, p in list_checkpoints(output_dir, complete_only=False)]
        start.replaces = found
        start.leftover_config = read_train_config(output_dir) if found else None
        what = (f"({', '.join(incomplete)} {'has' if len(incomplete) == 1 else 'have'} no {COMPLETE_MARKER} marker: the "
                "run stopped while saving)" if incomplete else "")
        start.notes.append(f"--resume_from_checkpoint auto: no complete checkpoint in {output_dir} {what}".rstrip()
                           + "; starting fresh at step 0" + ("; the earlier attempt's files are replaced" if found else ""))
    elif resume_from:
        ckpt = Path(resume_from)
        if not (ckpt / COMPLETE_MARKER).is_file():
            complete = [str(p) for _, p in list_checkpoints(ckpt.parent)][-3:]
            why = "no such directory" if not ckpt.exists() else f"not a complete checkpoint (no {COMPLETE_MARKER} marker)"
            problems.append(f"--resume_from_checkpoint {ckpt}: {why}"
                            + (f"; complete ones there: {', '.join(complete)}" if complete else ""))
        else:
            start.resume = ckpt
    elif found and not overwrite:
        problems.append(f"--output_dir {output_dir} holds another run ({', '.join(p.name for p in found[:5])}); pass "
                        "--resume_from_checkpoint auto to continue it or --overwrite_output_dir to replace it")
    elif found:
        start.replaces = found
        start.notes.append(f"--overwrite_output_dir: replacing the run in {output_dir} ({len(found)} entries)")
    return start, problems


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory: renamed to a hidden name first (atomic), so it never looks complete half-gone."""
    hidden = path.parent / f"{DELETING_PREFIX}{path.name}-{os.getpid()}-{time.time_ns()}"
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def start_run_dir(start: RunStart, settings: dict) -> None:
    """Rank 0: remove what the run replaces, create OUT, write train_config.json. The first write of the run."""
    def create():
        with writing(start.output_dir):
            _replace_and_create(start, settings)

    on_rank0(create)


def _replace_and_create(start: RunStart, settings: dict) -> None:
    """Remove what the run replaces, create OUT, write train_config.json."""
    out = start.output_dir
    for p in start.replaces:
        if p.is_dir() and CHECKPOINT_RE.match(p.name):
            remove_checkpoint(p)
        elif p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(f"{DELETING_PREFIX}*"):  # a delete that a crash interrupted
        shutil.rmtree(p, ignore_errors=True)
    _write_atomic(out / TRAIN_CONFIG_FILE, json.dumps(settings, indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# saving a checkpoint
# ---------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(directory: Path) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_failure(err: BaseException, directory: Path) -> str:
    """What went wrong writing a checkpoint, in words: a full disk shows up as ENOSPC, or as torch's stream writer
    failing in odd ways ("unexpected pos", "iostream error"), so the free space decides too."""
    text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or (free is not None and free < 2**20):
        return f"no space left on the device ({free / 2**10:,.0f} KiB free)" if free is not None else "no space left on the device"
    return f"{type(err).__name__}: {text}"


def retained_checkpoints(output_dir: Path, limit: Optional[int], best_metric: Optional[str] = None,
                         protect: Tuple[Path, ...] = ()) -> List[Path]:
    """The complete checkpoints --save_total_limit keeps: the newest, the best by ``best_metric`` (recorded in each
    checkpoint's trainer_state.json), the protected ones (the checkpoint this process resumed from), then the newest
    others up to ``limit``. Everything else may be deleted."""
    done = list_checkpoints(output_dir)
    if limit is None or not done:
        return [p for _, p in done]
    keep = [done[-1][1]]
    if best_metric:
        scored = [(read_trainer_state(p).get("metrics", {}).get(best_metric), s, p) for s, p in done]
        scored = [(v, s, p) for v, s, p in scored if isinstance(v, (int, float))]
        if scored:
            pick = best_metric_direction(best_metric)
            best = pick(scored, key=lambda t: (t[0], t[1] if pick is max else -t[1]))  # ties: the newest
            keep.append(best[2])
    keep += [p for p in protect if p in {q for _, q in done}]
    for _, p in reversed(done):
        if len(set(keep)) >= limit:
            break
        keep.append(p)
    return sorted(set(keep), key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def save_training_checkpoint(engine, output_dir: Path, step: int, state: dict, clora, save_total_limit: Optional[int],
                             best_metric: Optional[str] = None, protect: Tuple[Path, ...] = ()) -> Path:
    """Every rank calls this. COMPLETE is written by rank 0 after every rank's files are written and synced.

    A rank that cannot write (disk full, quota) does not leave the others waiting: every rank meets at DeepSpeed's
    closing barrier, the failures are gathered, the partial directory is removed and every rank raises the same
    CheckpointError, naming the directory and the newest complete checkpoint.
    """
    tag = f"checkpoint-{step}"
    ckpt = output_dir / tag
    if rank() == 0:
        if ckpt.exists():  # a leftover from a crash mid-save: never half-trust it
            remove_checkpoint(ckpt)
        ckpt.mkdir()
    barrier()
    failure = ""
    try:
        engine.save_checkpoint(str(output_dir), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    except Exception as err:  # torch.save raises RuntimeError or OSError when the disk is full
        failure = _save_failure(err, output_dir)
        barrier()  # DeepSpeed's closing barrier, where the ranks that could write are waiting
    if not failure:
        try:
            torch.save(rng_state(), ckpt / RNG_FILE.format(rank=rank()))
            if rank() == 0:
                (ckpt / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
                clora.save(ckpt)
                saved_p = getattr(getattr(engine, "module", engine), "clora", None)
                if saved_p is not None and saved_p.subspaces_file is not None:  # data-derived P: whole, linked
                    from .subspace import place_subspaces_file

                    place_subspaces_file(saved_p.subspaces_file, ckpt)
                if (output_dir / TRAIN_CONFIG_FILE).is_file():  # a checkpoint describes itself (base, data, dtype)
                    shutil.copyfile(output_dir / TRAIN_CONFIG_FILE, ckpt / TRAIN_CONFIG_FILE)
        except Exception as err:
            failure = _save_failure(err, output_dir)
    failures = [f"rank {r}: {text}" for r, text in enumerate(gather_texts(failure)) if text]
    if failures:
        if rank() == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
        newest = list_checkpoints(output_dir)
        raise CheckpointError(
            f"could not write checkpoint {ckpt} ({'; '.join(failures[:2])}). The partial checkpoint was removed and never marked {COMPLETE_MARKER}; newest complete checkpoint: "
            f"{newest[-1][1] if newest else 'none'}. Free space (or move --output_dir), then continue with "
            "--resume_from_checkpoint auto")
    barrier()
    fault_point("stall_in_save", step)
    fault_point("kill_in_save", step)
    if rank() == 0:
        _fsync_tree(ckpt)
        _write_atomic(ckpt / COMPLETE_MARKER, f"{step}\n")
        keep = set(retained_checkpoints(output_dir, save_total_limit, best_metric, protect))
        for _, old in list_checkpoints(output_dir):
            if old not in keep:
                remove_checkpoint(old)
    barrier()
    fault_point("kill_after_save", step)
    return ckpt


def fault_point(name: str, step: int) -> None:
    """Test hook, CLORA_DS_FAULT=NAME:STEP on rank 0: kill_* SIGKILLs the process here, stall_* sleeps (for a
    signal sent from outside while a checkpoint is being written). Used to prove crash and signal safety."""
    if os.environ.get("CLORA_DS_FAULT") != f"{name}:{step}" or rank() != 0:
        return
    if name.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    log(f"fault point {name}:{step}: stalling")
    time.sleep(600)
