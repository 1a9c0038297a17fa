"""Atomic writes: outputs appear complete or not at all.

Every stage writes to a temporary sibling and renames it into place, so an error
half-way leaves no half-written file or directory behind. Ctrl-C (KeyboardInterrupt)
and SIGTERM (``Terminated``, raised while a write is under way) clean up the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator


class Terminated(SystemExit):
    """SIGTERM arrived during an atomic write; exits with 143 (128 + SIGTERM) once cleaned up."""


class _SigtermGuard:
    """While entered (main thread only), SIGTERM raises Terminated if armed, else waits until
    the guard is armed or left; on leaving, the previous handler is back and gets a waiting one.

    Does nothing outside the main thread or where SIGTERM is ignored or not handled by Python."""

    def __init__(self):
        self.armed, self.pending, self.previous = False, False, None

    def __enter__(self):
        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread() and previous not in (None, signal.SIG_IGN):
            self.previous = previous
            signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.armed:
            self.armed = False  # once: a second SIGTERM must not break the clean-up of the first
            raise Terminated(128 + signum)
        self.pending = True

    def arm(self, on: bool) -> None:
        """Let SIGTERM raise (on) or wait (off); arming raises a SIGTERM that came while off."""
        self.armed = on
        if on and self.pending:
            self.pending, self.armed = False, False
            raise Terminated(128 + signal.SIGTERM)

    def __exit__(self, *exc):
        self.armed = False
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            if self.pending:
                if self.previous == signal.SIG_DFL:
                    raise Terminated(128 + signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)
        return False


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    Works for files and directories (the caller decides what to create there).
    On an exception the temporary path is removed and ``path`` is left untouched;
    SIGTERM raises Terminated during the caller's write, so it is cleaned up like Ctrl-C.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _SigtermGuard() as sigterm:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        target = tmp / path.name
        try:
            sigterm.arm(True)
            yield target
            sigterm.arm(False)  # from here on a SIGTERM waits until path is in place
            if not target.exists():
                raise RuntimeError(f"{path}: nothing was written")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            os.replace(target, path)
        finally:
            sigterm.arm(False)
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
