"""Rank, barrier, rank-0-first, the device collectives need, stopping every rank when the launcher goes away, and
leaving together (``leave_together``: the one way out of a run, on success and on error alike).

Every helper also works without torch.distributed (one process): rank 0 of a world of 1.
"""
from __future__ import annotations

import datetime
import os
import sys
import signal
import threading
import time
from typing import Callable, List, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class SiblingFailed(RuntimeError):
    """Another rank hit an error and reports it; this rank exits quietly."""


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def log(msg: str) -> None:
    if rank() == 0:
        print(f"[clora_ds] {msg}", flush=True)


def collective_device() -> torch.device:
    """Where a tensor must live for a collective: NCCL takes CUDA tensors only, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (every rank must call)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t)
    return t.item() > 0


def gather_texts(text: str) -> List[str]:
    """Every rank's ``text`` (any length), in rank order, on every rank; sent as UTF-8 bytes, never pickled."""
    if not dist.is_initialized():
        return [text]
    device = collective_device()
    encoded = text.encode()
    data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8) if encoded else torch.zeros(0, dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = max(int(n.item()) for n in sizes)
    buf = torch.zeros(max(longest, 1), dtype=torch.uint8, device=device)
    buf[:data.numel()] = data.to(device)
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf)
    return [t[:int(n.item())].cpu().numpy().tobytes().decode(errors="replace") for t, n in zip(out, sizes)]


def on_rank0(fn: Callable[[], T]) -> Optional[T]:
    """Run fn on rank 0 only (None elsewhere); an error there is raised on rank 0 and stops the others."""
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the other ranks know
            error = err
    if any_rank(error is not None):
        raise error if error is not None else SiblingFailed()
    return result


def rank0_first(fn: Callable[[], T]) -> T:
    """Run fn on rank 0, then (if it worked there) on the others; an error on any rank stops all."""
    result = on_rank0(fn)
    if rank() != 0:
        error = None
        try:
            result = fn()
        except Exception as err:
            error = err
        if any_rank(error is not None):
            raise error if error is not None else SiblingFailed()
    elif any_rank(False):
        raise SiblingFailed()
    return result


# ---------------------------------------------------------------------------------------------------
# stopping with the launcher
# ---------------------------------------------------------------------------------------------------
DEEPSPEED_LAUNCH = "deepspeed.launcher.launch"


def _proc_ppid(pid: int) -> Optional[int]:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name in (...) may hold spaces


def _proc_cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_with_launcher(poll_s: float = 0.5) -> bool:
    """Under DeepSpeed's launcher, stop this run when the runner above it goes away.

    ``deepspeed`` (the runner) starts one ``deepspeed.launcher.launch`` per node, which starts the ranks. A
    SIGTERM to the runner ends only the runner on a single node: the launcher and the ranks train on, orphaned.
    A watcher thread notices (the launcher's parent changed, or the launcher is gone) and sends SIGTERM to the
    launcher, whose own handler ends every rank; this rank kills itself a few seconds later if still alive.
    Ranks keep the default SIGTERM / SIGINT actions (immediate exit), so a signal to one rank ends it at once and
    the launcher ends the others. Returns whether the watcher runs (Linux, under the launcher); ``leave_together``
    stops it.
    """
    global _watcher
    parent = os.getppid()
    if DEEPSPEED_LAUNCH not in _proc_cmdline(parent):
        return False
    runner = _proc_ppid(parent)
    _stop_watching.clear()

    def watch():
        while os.getppid() == parent and _proc_ppid(parent) == runner:
            if _stop_watching.wait(poll_s):  # leave_together: this rank is leaving on its own
                return
        try:
            os.kill(parent, signal.SIGTERM)
        except ProcessLookupError:
            pass
        time.sleep(5)
        os.kill(os.getpid(), signal.SIGKILL)

    _watcher = threading.Thread(target=watch, name="clora-launcher-watch", daemon=True)
    _watcher.start()
    return True


_stop_watching = threading.Event()
_watcher: Optional[threading.Thread] = None
LEAVE_TIMEOUT_S = 300.0  # how long a leaving rank waits for the others at the closing barrier


def leave_together(timeout_s: float = LEAVE_TIMEOUT_S) -> bool:
    """Tear this rank down the way every exit must, success or error: meet every rank at a barrier, destroy the
    process group, stop the launcher watcher. True when done; False when the others did not reach the barrier within
    ``timeout_s`` (an error only this rank saw), and the process group is left open.

    Why: a rank that exits with its process group alive, or while another rank still talks to it (rank 0 hosts the
    TCP store), can abort at interpreter shutdown in the backend's threads (``terminate called without an active
    exception``, SIGABRT) after its `error:` line, turning exit status 2 into 134 (or the runner's 250). With a
    barrier that never completes, destroying the group would wait on it (gloo joins its worker threads), so the
    caller must then leave without the interpreter's shutdown (``os._exit``); the launcher stops the other ranks.
    """
    if dist.is_initialized():
        try:
            dist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError:  # timed out: the others are elsewhere (or gone)
            return False
        dist.destroy_process_group()
    _stop_watching.set()
    if _watcher is not None:
        _watcher.join(timeout=10)  # at most one poll; longer only if it is already ending a lost run
    return True


def exit_now(code: int) -> None:
    """Leave with exit status ``code`` without the interpreter's shutdown: streams and log handlers flushed, then
    ``os._exit``. Every error exit takes it, after `leave_together` (or instead of it when the barrier timed out).

    Why: even with the process group destroyed, a rank whose peers have just exited (rank 0 hosts the TCP store) can
    abort in the backend's C++ destructors at interpreter shutdown (``terminate called without an active exception``,
    SIGABRT): CI saw rank 1 of a refused 2-rank resume exit -6 (runner 250) after rank 0's correct `error:` line and
    exit 2. Skipping that shutdown on an error exit loses nothing: metrics.jsonl and DeepSpeed's monitors write each row
    through (flush per row), checkpoints are complete or not made, and nothing else is pending then.
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can reach it
            pass
    os._exit(code)


def default_signal_actions() -> None:
    """SIGINT and SIGTERM end this process at once (no Python handler that waits for a blocking call to return)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
