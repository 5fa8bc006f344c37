"""--profile_steps A-B: a torch.profiler trace of those optimizer steps on rank 0; every other step pays nothing."""
from __future__ import annotations

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

