"""Child processes of the demo (trainer, publisher, worker) and the Ctrl-C flag they all respect.

The signal handler only sets a flag (SIGINT, SIGTERM); every wait in the demo is a short poll that checks
it and raises :class:`Interrupted`, so the ``ExitStack`` in ``__main__`` unwinds and cleans up in order.
Children run in their own session: a Ctrl-C in the terminal reaches the demo alone, which then stops each
child itself (SIGTERM, then SIGKILL after a grace period) rather than racing them all to exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived: unwind and clean up."""


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None

    def handle(self, signum: int, _frame) -> None:
        self.signal = signum

    def check(self) -> None:
        if self.signal is not None:
            raise Interrupted(signal.Signals(self.signal).name)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        self.check()

    def install(self) -> Callable[[], None]:
        """Route SIGINT/SIGTERM to the flag; returns the function that restores the previous handlers."""
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def spawn(argv: Sequence[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """Start a child in its own session, its output appended to ``log``."""
    with open(log, "ab") as out:
        return _popen(argv, env, out)


def _popen(argv: Sequence[str], env: Mapping[str, str], out) -> subprocess.Popen:
    return subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> int:
    """SIGTERM, wait up to ``grace_s`` for a clean exit, then SIGKILL. Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _output_channel(terminal: bool) -> tuple[int, int]:
    """(read end, write end) for a child's output. On a terminal, a pseudo-terminal of the same size: the
    child then draws its progress bars (tqdm hides them when its output is not a terminal)."""
    if not terminal:
        return os.pipe()
    read_end, write_end = pty.openpty()
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(write_end, termios.TIOCSWINSZ, size)
    return read_end, write_end


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # a pseudo-terminal whose child has exited reports EIO: the end of its output
        return b""


def run_streamed(argv: Sequence[str], env: Mapping[str, str], log: Path, flag: StopFlag, *,
                 echo: bool) -> int:
    """Run a child to completion, copying its output to ``log`` and (``echo``) to our stdout as it comes,
    carriage returns included, so progress bars draw in place. Ctrl-C stops the child before unwinding."""
    read_end, write_end = _output_channel(echo and sys.stdout.isatty())
    try:
        proc = _popen(argv, env, write_end)
    finally:
        os.close(write_end)  # ours; the child has its own copy, so EOF comes when the child exits
    try:
        with open(log, "ab") as sink:
            while True:
                flag.check()
                ready, _, _ = select.select([read_end], [], [], 0.2)
                if not ready:
                    continue
                chunk = _read(read_end)
                if not chunk:
                    return proc.wait()
                sink.write(chunk)
                if echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
    finally:
        stop(proc)
        os.close(read_end)


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
