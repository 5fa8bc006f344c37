"""The errors a user's input or settings cause. Every entry point catches ``UserError`` and prints its message as
one ``error:`` line with exit status 2; anything else (a bug, a library's own failure) keeps its traceback.

Each subclass names where the problem lies, and its message says what was wrong and what would be right.
"""
from __future__ import annotations

from typing import List, Sequence


class UserError(ValueError):
    """A problem the user can fix: bad arguments, files, configs or environment."""


class ConfigError(UserError):
    """Arguments, the DeepSpeed config or the environment do not fit together; or an unusable output directory."""


class DataError(UserError):
    """A problem with the user's data, stated with file, line and field."""


class CheckpointError(UserError):
    """A checkpoint, base model or output directory that cannot be used; the message says what and why."""


class CLoRAConfigError(UserError):
    """CLoRA settings that cannot work (for this model); the message lists every problem."""


class OutputExistsError(UserError, FileExistsError):
    """The output directory exists and replacing it was not asked for."""


class RunProblems(ConfigError):
    """Every reason a run cannot start, collected before anything is written (litgpt's validate_args habit)."""

    def __init__(self, problems: Sequence[str], headline: str = "cannot start the run"):
        self.problems: List[str] = list(problems)
        self.headline = headline
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{headline}:\n  - " + "\n  - ".join(self.problems))
