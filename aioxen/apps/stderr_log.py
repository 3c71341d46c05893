"""A log handler for services that never blocks the event loop on stderr.

Theory of operation
-------------------
A service's stderr may be a pipe nobody reads (a supervisor that hung, ``2>&1 | slow``), or
a terminal stopped with Ctrl-S.  ``logging.StreamHandler`` writes in the logging thread --
the event loop's -- so once the pipe is full the next log line blocks the whole service
forever, SIGTERM included (the write is retried after the signal handler ran).  And log
lines are something other users can cause: every connection to a bridge whose target is
down logs a warning, so 64 KiB of them froze a TCP bridge for everyone.

[`StderrLogHandler`][] formats records in the caller's thread and appends the bytes to a
queue holding at most ``limit`` bytes; a daemon thread writes the queue to the descriptor
with plain ``os.write`` calls (no Python stream, so no lock that interpreter shutdown could
find held).  Records that do not fit are dropped and counted; once the queue has drained,
one line says how many were lost.  [`flush`][StderrLogHandler.flush] waits -- bounded --
for the queue to drain, so a command's last log lines come out before its exit message.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections import deque

DEFAULT_LIMIT = 256 * 1024
"""Bytes of log lines queued for stderr before further lines are dropped."""

FLUSH_SECONDS = 2.0
"""How long [`StderrLogHandler.flush`][] waits for stderr to take the queued lines."""


class StderrLogHandler(logging.Handler):
    """Log lines to stderr (descriptor 2 unless ``fd``) from a writer thread; the caller
    never blocks.  Lines beyond ``limit`` queued bytes are dropped and counted."""

    def __init__(
        self, fd: int | None = None, *, limit: int = DEFAULT_LIMIT, level: int = logging.NOTSET
    ) -> None:
        super().__init__(level)
        if fd is None:
            try:
                fd = sys.stderr.fileno() if sys.stderr is not None else 2
            except (AttributeError, OSError, ValueError):
                fd = 2
        self.fd = fd
        self.limit = limit
        self.dropped = 0
        """Lines dropped so far because stderr did not keep up."""
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._unreported = 0
        self._cond = threading.Condition()
        self._busy = False  # the writer holds a chunk it has not written yet
        self._closed = False
        self._thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
        except Exception:
            self.handleError(record)
            return
        with self._cond:
            if self._closed:
                return
            if self._queued + len(data) > self.limit:
                self.dropped += 1
                self._unreported += 1
                return
            self._queue.append(data)
            self._queued += len(data)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="aioxen stderr log", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._unreported and not self._closed:
                    self._cond.wait()
                if not self._queue and not self._unreported:
                    return  # closed and drained
                if self._queue:
                    data = self._queue.popleft()
                    self._queued -= len(data)
                else:
                    lost, self._unreported = self._unreported, 0
                    data = f"aioxen: {lost} log lines dropped: stderr is not being read\n".encode()
                self._busy = True
            try:
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(self.fd, view) :]
                    except BlockingIOError:  # an inherited non-blocking stderr: wait here
                        select.select([], [self.fd], [])
            except OSError:
                pass  # stderr gone (EPIPE, EBADF): the line is lost, as a print's would be
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def queued_lines(self) -> int:
        """Lines waiting for the writer (not counting one it is writing)."""
        with self._cond:
            return len(self._queue)

    def flush(self, timeout: float = FLUSH_SECONDS) -> None:
        """Wait until the queued lines are written, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._queue or self._busy or self._unreported) and self._thread is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def close(self) -> None:
        """Flush (bounded), then stop the writer thread once it is idle."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        super().close()


__all__ = ["DEFAULT_LIMIT", "FLUSH_SECONDS", "StderrLogHandler"]
