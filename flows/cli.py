"""The `segflow` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; the stage commands arrive with the flows issue."""
    print(
        "segflow: the stage commands are not built yet.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
