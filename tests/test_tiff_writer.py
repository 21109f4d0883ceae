"""Pyramidal TIFF writer: levels are 2x reductions of the tiles it is given, read once each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from segcore.tiff_writer import write_pyramidal_tiff


def _mean2x2(a: np.ndarray) -> np.ndarray:
    """The rounded 2x2 mean over (y, x), odd edges replicated, written out by hand."""
    a = a.astype(np.int64)
    pad = ((0, a.shape[0] % 2), (0, a.shape[1] % 2)) + ((0, 0),) * (a.ndim - 2)
    a = np.pad(a, pad, mode="edge")
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4


def _write(path: Path, level0: np.ndarray, tile: int, method: str) -> tuple[int, list]:
    reads = []

    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        reads.append((y0, x0, h, w))
        return level0[y0 : y0 + h, x0 : x0 + w]

    n_levels = write_pyramidal_tiff(
        path, read, level0.shape, level0.dtype, tile, method, compression="zlib"
    )
    return n_levels, reads


@pytest.mark.parametrize(
    ("shape", "dtype", "method"),
    [((300, 200, 3), np.uint16, "mean"), ((300, 200), np.uint32, "nearest")],
)
def test_levels_are_halvings_of_the_level_above(tmp_path, shape, dtype, method):
    rng = np.random.default_rng(0)
    level0 = rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype)
    n_levels, reads = _write(tmp_path / "p.tif", level0, 64, method)
    # Each level-0 tile is read once, row by row; edge tiles are partial.
    assert reads[:4] == [(0, 0, 64, 64), (0, 64, 64, 64), (0, 128, 64, 64), (0, 192, 64, 8)]
    assert len(reads) == 5 * 4 and reads[-1] == (256, 192, 44, 8)
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    assert n_levels == len(levels) == 4
    assert [lv.shape[:2] for lv in levels] == [(300, 200), (150, 100), (75, 50), (38, 25)]
    np.testing.assert_array_equal(levels[0], level0)
    for big, small in zip(levels, levels[1:], strict=False):
        assert small.dtype == dtype
        expected = _mean2x2(big) if method == "mean" else big[0::2, 0::2]
        np.testing.assert_array_equal(small, expected)
    # The temporary levels are gone.
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]


def test_a_failing_reader_leaves_no_temporary_levels(tmp_path):
    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        if (y0, x0) == (64, 0):
            raise RuntimeError("source gone")
        return np.zeros((h, w), np.uint8)

    with pytest.raises(RuntimeError, match="source gone"):
        write_pyramidal_tiff(tmp_path / "p.tif", read, (200, 100), np.dtype(np.uint8), 64, "mean")
    assert [p.name for p in tmp_path.iterdir()] == ["p.tif"]
