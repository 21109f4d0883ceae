"""Input/output geometry of a U-Net: which tile sizes are valid and how much context they eat.

A valid-padding U-Net of depth d applies, per level on the way down, two 3x3 convs (-4 px) and
a 2x2 pool (/2, the side must be even); at the bottom two convs (-4 px); on the way up a 2x2
up-conv (x2) and two convs (-4 px). Worked example, depth 5 (the paper):
572 -> 568 -> 284 -> 280 -> 140 -> 136 -> 68 -> 64 -> 32 -> 28 -> 56 -> 52 -> 104 -> 100
-> 200 -> 196 -> 392 -> 388, so the output is 388 and the margin is (572 - 388) / 2 = 92 px.

The network is translation-equivariant only for shifts that are multiples of its pooling grid
2^(d-1) (16 for depth 5): tile origins must sit on that grid for tiles to agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Padding = Literal["valid", "same"]


@dataclass(frozen=True)
class UNetGeometry:
    depth: int = 5
    padding: Padding = "valid"

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {self.padding!r}")

    @property
    def pool_factor(self) -> int:
        """Total downsampling 2^(depth-1): tile origins must be multiples of it."""
        return 2 ** (self.depth - 1)

    @property
    def margin(self) -> int:
        """Context in px per side that one output pixel needs (92 for the paper's depth 5).

        For a same-padded network this is the margin of the equivalent valid network: the
        tiler crops it from each tile so that zero padding never reaches a kept pixel.
        """
        # Each conv pair at level l (0 = top) eats 4 px at that level's scale: 2 * 2^l per side,
        # on the way down (levels 0..d-1) and on the way up (levels 0..d-2).
        down = sum(2 * 2**level for level in range(self.depth))
        up = sum(2 * 2**level for level in range(self.depth - 1))
        return down + up

    def _valid_output_size(self, n: int) -> int | None:
        """Output side of the valid network for input side n, or None when n is not valid."""
        for _ in range(self.depth - 1):
            n -= 4
            if n <= 0 or n % 2:
                return None
            n //= 2
        n -= 4
        if n <= 0:
            return None
        for _ in range(self.depth - 1):
            n = 2 * n - 4
        return n

    def is_valid_input_size(self, n: int) -> bool:
        if self.padding == "same":
            return n > 2 * self.margin and n % self.pool_factor == 0
        return self._valid_output_size(n) is not None

    def output_size(self, n: int) -> int:
        """Side of the kept output for input side n (after cropping the margin when same-padded)."""
        if not self.is_valid_input_size(n):
            raise ValueError(
                f"input size {n} is not valid for a {self.padding} U-Net of depth {self.depth}; "
                f"nearest valid below: {self.valid_input_size_at_most(n)}"
            )
        return n - 2 * self.margin

    def valid_input_size(self, min_output: int) -> int:
        """Smallest valid input side whose output is at least min_output px."""
        n = max(int(min_output), 1) + 2 * self.margin
        while not self.is_valid_input_size(n):
            n += 1
        return n

    def valid_input_size_at_most(self, n: int) -> int | None:
        """Largest valid input side <= n, or None when no input that small is valid."""
        smallest = self.valid_input_size(1)
        while n >= smallest:
            if self.is_valid_input_size(n):
                return n
            n -= 1
        return None
