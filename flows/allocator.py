"""glibc's allocator tuned for segflow's own processes: the `segflow` command re-executes
itself once with these settings when the user has set none of their own.

A U-Net forward pass allocates and frees activations of tens to hundreds of MB per batch.
glibc serves allocations that large with fresh `mmap`s and gives them back at `free`, so every
batch pays page faults for memory it just returned; measured with `benchmarks/infer.py`, the
settings below roughly doubled CPU inference throughput. They must be in the environment when
the process starts (glibc reads them once, before `main` runs), hence the re-execution rather
than a runtime call. Dask worker processes started by the command inherit them (Dask's nanny
sets its own MALLOC_TRIM_THRESHOLD_ for its workers).

    MALLOC_ARENA_MAX=1               one arena: freed memory is reused by every thread
    MALLOC_MMAP_MAX_=0               large blocks come from the heap, not a fresh mmap each
    MALLOC_TRIM_THRESHOLD_=10^11     freed heap memory is kept for the next batch

The cost is memory: what the largest batch needed stays mapped until the process ends.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

TUNED_ENVIRONMENT = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "100000000000",
}
#: Set to "0" to keep glibc's defaults; set by the re-executed process so it runs once.
SWITCH = "SEGFLOW_TUNE_MALLOC"


def tuned_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do: not glibc,
    already tuned, switched off, or any MALLOC_* the user chose is left alone.

    Example: {"PATH": "/usr/bin"} -> {"PATH": "/usr/bin", "MALLOC_ARENA_MAX": "1", ...,
    "SEGFLOW_TUNE_MALLOC": "0"}; {"MALLOC_ARENA_MAX": "4"} -> None.
    """
    if platform.libc_ver()[0] != "glibc" or env.get(SWITCH) == "0":
        return None
    if any(name.startswith("MALLOC_") for name in env):
        return None
    return {**env, **TUNED_ENVIRONMENT, SWITCH: "0"}


def reexecute_tuned(argv: Sequence[str]) -> None:
    """Replace this process by the same command under `tuned_environment` (returns only when
    there is nothing to do). `argv` is the command as started (`sys.argv`)."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    script = argv[0] if argv else ""
    if os.path.isfile(script) and os.access(script, os.X_OK) and not script.endswith(".py"):
        os.execve(script, list(argv), env)  # the installed `segflow` script
    os.execve(sys.executable, [sys.executable, "-m", "flows.cli", *argv[1:]], env)
