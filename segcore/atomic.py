"""Writing a file so that readers see the old one or the new one, never half of one.

Every file segflow writes in place of another goes through `replacing`: the content goes to a
private hidden sibling named after the final path, the writing process and a random suffix,

    out/.model.pt.tmp-4242-9f1c2ab0      being written by process 4242

which is renamed over the final path once complete (an atomic rename on one file system) and
removed if writing fails. `pipelines.storage` names its temporary folders by the same rule.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def sibling(final: Path, kind: str = "tmp") -> Path:
    """A fresh hidden path beside `final`, owned by this process: `.<name>.<kind>-<pid>-<hex>`."""
    return final.with_name(f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def replacing(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write `final`'s new content to; on leaving the block it
    replaces `final`, or is removed when the block raised."""
    final = Path(final)
    tmp = sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
