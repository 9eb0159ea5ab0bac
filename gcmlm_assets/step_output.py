"""Route what third-party code prints during a step into the step's log, and pace progress lines.

Plain Python (no Dagster): the asset steps pass `context.log.debug` / `context.log.info`.

`stdout_to_log(log)` sends everything written to standard output inside the
block to `log`, one call per line: Python-level writes (`print`, `sys.stdout`)
as they happen, and writes straight to file descriptor 1 (native code, spawned
worker processes such as nnU-Net's preprocessing pool) when the block ends.
In the Dagster UI those lines then sit in the structured event log instead of
the raw compute log. Standard error (warnings, logging) is left alone.

`sys.stdout` and descriptor 1 belong to the whole process: this is meant for a
step of the in-process executor, where one step runs at a time, and both are
restored when the block ends, also on an error.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

from gcmlm_assets.settings import scoped_environment

LineLog = Callable[[str], None]


class LineWriter(io.TextIOBase):
    """A text stream that hands each completed line to `log`.

    Carriage returns end a line too, so a progress bar redrawn in place (tqdm) arrives as
    separate lines rather than one huge one; blank lines are dropped. In a process forked
    from the one that made it (a DataLoader worker), it writes to descriptor 1 instead: a
    logger of the parent must not be called from a child.
    """

    def __init__(self, log: LineLog):
        super().__init__()
        self._log = log
        self._pending = ""
        self._owner_pid = os.getpid()
        self._forwarding = False
        # stdout is the process's: a library's threads may print while the step's thread does.
        self._lock = threading.RLock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if os.getpid() != self._owner_pid:
            os.write(1, text.encode(errors="replace"))
            return len(text)
        with self._lock:
            self._pending += text.replace("\r\n", "\n").replace("\r", "\n")
            *lines, self._pending = self._pending.split("\n")
            for line in lines:
                self._emit(line)
        return len(text)

    def flush(self) -> None:
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            if self._pending:
                line, self._pending = self._pending, ""
                self._emit(line)

    def _emit(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip():
            return
        if self._forwarding:
            # The log itself printed (a handler on stdout): let it through rather than recurse.
            sys.__stderr__.write(line + "\n")
            return
        self._forwarding = True
        try:
            self._log(line)
        finally:
            self._forwarding = False


@contextlib.contextmanager
def _descriptor_1_to_file() -> Iterator[object | None]:
    """Point descriptor 1 at a temporary file for the block; yield that file (None if 1 is unusable)."""
    for stream in (sys.stdout, sys.__stdout__):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (a detached process): nothing to divert
        yield None
        return
    captured = tempfile.TemporaryFile()
    try:
        os.dup2(captured.fileno(), 1)
        try:
            yield captured
        finally:
            with contextlib.suppress(Exception):
                sys.__stdout__.flush()
            os.dup2(saved, 1)
    finally:
        os.close(saved)
        captured.close()


@contextlib.contextmanager
def stdout_to_log(log: LineLog) -> Iterator[None]:
    """Inside the block, standard output goes to `log` line by line (see the module docstring)."""
    writer = LineWriter(log)
    # tqdm reads TQDM_DISABLE when it is imported: this silences bars in worker processes
    # spawned inside the block; in this process our calls pass their own disable flags.
    with scoped_environment({"TQDM_DISABLE": "1"}), _descriptor_1_to_file() as raw:
        try:
            with contextlib.redirect_stdout(writer):
                yield
        finally:
            writer.flush()
            if raw is not None:
                # What C code or workers wrote to descriptor 1, read back line by line (a long
                # training's output is not held in memory at once).
                with contextlib.suppress(Exception):
                    sys.__stdout__.flush()
                raw.flush()
                raw.seek(0)
                leftover = LineWriter(log)
                for line in io.TextIOWrapper(raw, errors="replace", newline=""):
                    leftover.write(line)
                leftover.flush()


class ProgressPacer:
    """Says when a counter of `total` items deserves a progress line: at every `fraction` of the
    total, at most every `seconds` in between, and always at the end."""

    def __init__(self, total: int, *, fraction: float = 0.1, seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total = int(total)
        self._step = max(1, int(self.total * fraction))
        self._seconds = seconds
        self._clock = clock
        self.started = clock()
        self._last_time = self.started
        self._next_count = self._step
        self._ended = False

    def due(self, done: int) -> bool:
        """True when a line should be logged now that `done` items are finished."""
        if self._ended:
            return False
        now = self._clock()
        if done >= self.total:
            self._ended = True
        elif done < self._next_count and now - self._last_time < self._seconds:
            return False
        self._last_time = now
        while self._next_count <= done:
            self._next_count += self._step
        return True

    def elapsed(self) -> float:
        return self._clock() - self.started
