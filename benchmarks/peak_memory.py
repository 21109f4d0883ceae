"""What the memory benchmarks share: run one size in a fresh process (so peaks do not carry
over), read its peak resident memory, and judge the large/small ratio against the 25% bar."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Sequence

#: A memory bar: the larger input's peak within this fraction of the smaller's.
RATIO_BAR = 0.25


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: str, arguments: Sequence[str]) -> dict:
    """Run `script` with `arguments` in a new interpreter; the JSON of its last stdout line."""
    command = [sys.executable, script, *arguments]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_ratio(sizes: Sequence[int], peaks: Sequence[int]) -> None:
    """The peaks' ratio, large over small, and whether it is within the bar."""
    ratio = peaks[1] / peaks[0]
    print(f"peak({sizes[1]}) / peak({sizes[0]}) = {ratio:.3f}")
    print(f"within {RATIO_BAR:.0%}: {'yes' if abs(ratio - 1) <= RATIO_BAR else 'no'}")
