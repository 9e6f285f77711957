"""A tiny progress bar on stderr, no dependency.

Drawn only when asked (``enabled=True``, the CLI's ``--progress``) or when
``stream`` is a terminal; it rewrites one line with ``\\r`` and ends it on
:meth:`Progress.close`. Nothing is written otherwise, so piped output and
``--json`` stay clean.
"""

from __future__ import annotations

import sys

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, "fusing") as bar: bar.update()`` draws ``fusing [#####.....] 5/10``.

    Parameters
    ----------
    total : int
        Number of steps.
    label : str
    enabled : bool or None
        ``None``: draw only when ``stream`` is a TTY.
    stream : file, optional
        Default ``sys.stderr``.
    width : int
        Bar width in characters.
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool | None = None, stream=None,
                 width: int = 30) -> None:
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = bool(enabled)
        self.total = max(int(total), 0)
        self.label = label
        self.width = int(width)
        self.done = 0
        self._drawn = False

    def __enter__(self) -> "Progress":
        self._draw()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, steps: int = 1, label: str | None = None) -> None:
        self.done = min(self.done + int(steps), self.total)
        if label is not None:
            self.label = label
        self._draw()

    def set(self, done: int, total: int | None = None) -> None:
        """Jump to ``done`` steps (of ``total``, when given): the form of a library's
        ``progress(done, total)`` callback."""
        if total is not None:
            self.total = max(int(total), 0)
        self.done = min(max(int(done), 0), self.total)
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
