"""The one user-facing error type.

Everything a user can cause (bad paths, malformed files, inconsistent data, bad options)
raises `DprgbError` with a one-line message that names the file, the episode and the
problem. The CLI prints it as a single line and exits with code 2; `assert` is kept for
internal invariants only.
"""

from __future__ import annotations

from pathlib import Path


class DprgbError(Exception):
    """A problem with the user's input or options, reported as one line."""

    def __init__(self, problem: str, *, path: str | Path | None = None, episode: int | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.episode = episode
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
        if self.episode is not None:
            where.append(f"episode {self.episode}")
        prefix = ", ".join(where)
        message = f"{prefix}: {self.problem}" if prefix else self.problem
        return " ".join(message.split())  # always one line
