"""The first SIGINT or SIGTERM ends a command within seconds, wherever its threads are blocked.

Why not Python's KeyboardInterrupt: a Python-level handler runs in the main thread, between two
bytecodes. While a command trains or segments, its main thread waits in Prefect's
`as_completed` on a lock, and the kernel hands the signal to whichever thread it likes, so the
wait goes on: the first Ctrl-C took effect only when the task ended (~45 s into training), and a
second one unwound the interpreter while torch's native threads still ran, whose destruction
aborted the process (`terminate called without an active exception`, SIGABRT).

Here the C-level handler's wake-up byte (`signal.set_wakeup_fd`) wakes a watcher thread at once.
It freezes the command's child processes (DataLoader and Dask workers, DDP ranks), runs the
cleanups registered with `on_interrupt` (newest first: cancel the Prefect flow run, mark MLflow
runs KILLED, stop the temporary Prefect server), kills the frozen children, prints one line and
leaves with `os._exit(128 + n)`, skipping the interpreter teardown that aborted. Work in
flight is abandoned, which every stage survives: stages move outputs into place only when
complete, inference journals finished blocks, and training resumes from its last checkpoint.
A second signal, or cleanups running past `DEADLINE_SECONDS`, skips what is left.

The handling is installed by the command line's `main` only (signal dispositions belong to the
process's owner); with none installed, `on_interrupt` does nothing, as for library callers.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from typing import TextIO

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Cleanups and child processes together get this long before the process exits regardless.
DEADLINE_SECONDS = 10.0

#: A cleanup takes the reason, e.g. "interrupted (SIGINT)".
Cleanup = Callable[[str], None]


class Interrupts:
    """Cleanups to run when the process is interrupted, and the watcher that runs them."""

    def __init__(self, stderr: TextIO) -> None:
        self._stderr = stderr
        self._cleanups: list[Cleanup] = []
        self._spared: list[int] = []
        self._lock = threading.Lock()
        self._exiting = False
        self._started = threading.Event()
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # the C handler must never block

    def add(self, cleanup: Cleanup, spare: int | None) -> None:
        with self._lock:
            self._cleanups.append(cleanup)
            if spare is not None:
                self._spared.append(spare)

    def remove(self, cleanup: Cleanup, spare: int | None) -> None:
        with self._lock:
            if cleanup in self._cleanups:
                self._cleanups.remove(cleanup)
            if spare in self._spared:
                self._spared.remove(spare)

    def watch(self) -> None:
        """The watcher thread: the first signal starts the shutdown, a second one (or the
        deadline) finishes it at once."""
        first = self._next_signal(None)
        if first is None:
            return
        self._started.set()
        threading.Thread(target=self._shut_down, args=(first,), daemon=True).start()
        second = self._next_signal(DEADLINE_SECONDS)
        self._exit(first, second or first)

    @property
    def interrupted(self) -> bool:
        """Whether the shutdown has begun (it ends the process)."""
        return self._started.is_set()

    def close(self) -> None:
        """Stop the watcher (unless a shutdown is under way) and release the socket pair."""
        self._reader.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv; close alone does not
        self._writer.close()

    def _next_signal(self, timeout: float | None) -> int | None:
        self._reader.settimeout(timeout)
        while True:
            try:
                data = self._reader.recv(1)
            except TimeoutError:
                return None
            except OSError:  # closed: the command ended
                return None
            if not data:
                return None
            if data[0] in SIGNALS:
                return data[0]

    def _shut_down(self, signum: int) -> None:
        reason = f"interrupted ({signal.Signals(signum).name})"
        with self._lock:
            cleanups = list(reversed(self._cleanups))
            spared = set(self._spared)
        # Frozen first: a DataLoader worker that vanished would make training fail its MLflow
        # run (FAILED) after the cleanup marked it KILLED; frozen, it only keeps training waiting.
        signal_children(signal.SIGSTOP, spared)
        for cleanup in cleanups:
            try:
                cleanup(reason)
            except Exception as exc:  # the others and the exit must still happen
                print(f"segflow: while stopping: {type(exc).__name__}: {exc}", file=self._stderr)
        self._exit(signum, signum)

    def _exit(self, signum: int, latest: int) -> None:
        with self._lock:
            if self._exiting:
                return
            self._exiting = True
        signal_children(signal.SIGKILL, set())
        print(f"segflow: interrupted ({signal.Signals(latest).name})", file=self._stderr)
        self._stderr.flush()
        sys.stdout.flush()
        os._exit(128 + signum)


def signal_children(signum: int, spared: set[int]) -> None:
    """Send `signum` to every descendant process but the `spared` ones and theirs."""
    for child in psutil.Process().children(recursive=True):
        with suppress(psutil.NoSuchProcess):
            if child.pid in spared or spared & {p.pid for p in child.parents()}:
                continue
            child.send_signal(signum)


_installed: ContextVar[Interrupts | None] = ContextVar("segflow_interrupts", default=None)


def _ignore(signum: int, frame: object) -> None:
    """The Python-level handler: nothing; the watcher thread, woken by the wake-up byte, acts.
    (A Python handler must be installed for Python's C handler to write that byte.)"""


@contextmanager
def handling(stderr: TextIO = sys.stderr) -> Iterator[Interrupts | None]:
    """Handle SIGINT and SIGTERM as this module says for the duration of the block (main thread
    that owns the process); the previous handlers and wake-up descriptor come back afterwards.
    Elsewhere (a command called from a worker thread) signals are left as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    interrupts = Interrupts(stderr)
    previous = {signum: signal.signal(signum, _ignore) for signum in SIGNALS}
    previous_fd = signal.set_wakeup_fd(interrupts._writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=interrupts.watch, name="segflow-interrupts", daemon=True)
    watcher.start()
    token = _installed.set(interrupts)
    try:
        yield interrupts
    finally:
        _installed.reset(token)
        if interrupts.interrupted:
            watcher.join()  # the shutdown ends the process; leaving now would race its exit
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        interrupts.close()
        watcher.join()
        interrupts._reader.close()


@contextmanager
def on_interrupt(cleanup: Cleanup, spare: int | None = None) -> Iterator[None]:
    """Run `cleanup(reason)` if the process is interrupted while the block runs (with no
    handling installed, nothing happens). `spare`: a child process (a server the cleanups
    still talk to) that the cleanup ends itself, so it is not frozen before."""
    interrupts = _installed.get()
    if interrupts is None:
        yield
        return
    interrupts.add(cleanup, spare)
    try:
        yield
    finally:
        interrupts.remove(cleanup, spare)
