"""label_foreground: chunked connected components equal whole-array scipy labels up to renaming."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage

from pipelines.cluster import ClusterConfig, dask_client
from pipelines.components import ComponentsError, label_foreground


def _arrays(tmp_path, data: np.ndarray, chunks, shards=None, dst_chunks=None):
    src = zarr.create_array(
        store=tmp_path / "src.zarr", shape=data.shape, chunks=chunks, dtype="uint8"
    )
    src[...] = data
    dst = zarr.create_array(
        store=tmp_path / "dst.zarr",
        shape=data.shape,
        chunks=dst_chunks or chunks,
        shards=shards,
        dtype="uint32",
    )
    return src, dst


def _assert_same_partition(ours: np.ndarray, reference: np.ndarray) -> None:
    """Same background, and a one-to-one map between our ids and the reference ids."""
    np.testing.assert_array_equal(ours == 0, reference == 0)
    fg = reference != 0
    pairs = np.unique(np.stack([ours[fg], reference[fg]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def _blobs(shape, seed: int, density: float = 0.45) -> np.ndarray:
    """Random class map (classes 0..2) with structures of many sizes crossing chunk faces."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    mask = noise > np.quantile(noise, 1 - density)
    return (mask * rng.integers(1, 3, size=shape)).astype(np.uint8)


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("chunks", [(16, 16), (7, 13), (64, 5)])
def test_equals_whole_array_labels(tmp_path, connectivity, chunks):
    data = _blobs((61, 83), seed=sum(chunks) + connectivity)
    src, dst = _arrays(tmp_path, data, chunks)
    report = label_foreground(src, dst, connectivity=connectivity)
    n = report.n_components
    structure = ndimage.generate_binary_structure(2, connectivity)
    reference, n_ref = ndimage.label(data != 0, structure=structure)
    assert n == n_ref
    ours = dst[...]
    _assert_same_partition(ours, reference)
    assert set(np.unique(ours)) == set(range(n + 1))
    # The seam report, from the whole-array labels: which components span several chunks,
    # and the largest.
    rows, cols = np.nonzero(reference)
    chunk_of = (rows // chunks[0]) * 1000 + cols // chunks[1]
    pairs = np.unique(np.stack([reference[rows, cols], chunk_of]), axis=1)
    _, n_chunks = np.unique(pairs[0], return_counts=True)
    assert report.crossing == int((n_chunks > 1).sum())
    # A piece is a component of one chunk on its own; an object of k pieces merges k - 1.
    n_pieces = 0
    for y in range(0, data.shape[0], chunks[0]):
        for x in range(0, data.shape[1], chunks[1]):
            block = data[y : y + chunks[0], x : x + chunks[1]] != 0
            n_pieces += ndimage.label(block, structure=structure)[1]
    assert report.merged_pieces == n_pieces - n
    assert report.largest == int(np.bincount(reference.ravel())[1:].max())


def test_cell_cut_by_chunk_borders_gets_one_id(tmp_path):
    data = np.zeros((40, 40), dtype=np.uint8)
    data[5:35, 18:22] = 1  # vertical bar crossing the horizontal faces at rows 10, 20, 30
    data[18:22, 5:35] = 1  # horizontal bar crossing the vertical faces: a cross over 4 chunks
    data[2:4, 2:4] = 1  # a separate small cell
    data[9, 29] = data[10, 30] = 1  # diagonal contact across a chunk corner (rows/cols 10)
    src, dst = _arrays(tmp_path, data, (10, 10))
    assert label_foreground(src, dst, connectivity=1).n_components == 4
    out = dst[...]
    assert len(np.unique(out[data == 1][out[data == 1] != 0])) == 4
    assert len(np.unique(out[5:35, 18:22])) == 1
    assert out[9, 29] != out[10, 30]
    assert label_foreground(src, dst, connectivity=2).n_components == 3
    assert dst[9, 29] == dst[10, 30]


def test_ids_follow_raster_order_of_chunks(tmp_path):
    data = np.array([[1, 1, 0, 1, 0, 1]], dtype=np.uint8)
    src, dst = _arrays(tmp_path, data, (1, 3))
    assert label_foreground(src, dst).n_components == 3
    np.testing.assert_array_equal(dst[...], [[1, 1, 0, 2, 0, 3]])
    src[0, 2] = 1
    assert label_foreground(src, dst).n_components == 2
    np.testing.assert_array_equal(dst[...], [[1, 1, 1, 1, 0, 2]])


def test_dask_client_and_shards_give_identical_ids(tmp_path):
    data = _blobs((90, 70), seed=3)
    src, dst = _arrays(tmp_path, data, (8, 8), shards=(16, 24), dst_chunks=(8, 8))
    local = tmp_path / "local"
    local.mkdir()
    src_l, dst_l = _arrays(local, data, (16, 24))
    with dask_client(ClusterConfig(n_workers=1, threads_per_worker=2, processes=False)) as client:
        n = label_foreground(src, dst, client=client, max_in_flight=3)
    assert n == label_foreground(src_l, dst_l)
    # Same write grid (16 x 24) in both: ids must agree exactly, not just up to renaming.
    np.testing.assert_array_equal(dst[...], dst_l[...])
    _assert_same_partition(dst[...], ndimage.label(data != 0)[0])


def test_empty_and_full_maps(tmp_path):
    src, dst = _arrays(tmp_path, np.zeros((20, 30), np.uint8), (8, 8))
    assert label_foreground(src, dst).n_components == 0
    assert not dst[...].any()
    src[...] = 1
    assert label_foreground(src, dst).n_components == 1
    assert (dst[...] == 1).all()


def test_mismatched_arrays_are_refused(tmp_path):
    src, _ = _arrays(tmp_path, np.zeros((20, 30), np.uint8), (8, 8))
    wrong = zarr.create_array(store=tmp_path / "w.zarr", shape=(20, 31), chunks=(8, 8), dtype="u4")
    with pytest.raises(ComponentsError, match="does not match"):
        label_foreground(src, wrong)
    signed = zarr.create_array(store=tmp_path / "s.zarr", shape=(20, 30), chunks=(8, 8), dtype="i4")
    with pytest.raises(ComponentsError, match="unsigned"):
        label_foreground(src, signed)


def test_seam_report_counts_crossings_once_and_objects_ending_on_a_face(tmp_path):
    """10 x 10 chunks: faces run along rows and columns 9|10, 19|20, 29|30."""
    data = np.zeros((40, 40), dtype=np.uint8)
    data[4:16, 4:8] = 1  # crosses the face 9|10: one object in two pieces (48 px)
    data[12:20, 24:30] = 1  # ends on the faces 19|20 and 29|30, nothing facing it there
    data[22:26, 12:14] = 1  # inside one chunk, away from every face
    data[30:38, 30:38] = 1  # starts on the faces 29|30 of its chunk: the largest (64 px)
    src, dst = _arrays(tmp_path, data, (10, 10))
    report = label_foreground(src, dst)
    assert report.n_components == 4 == len(np.unique(dst[...])) - 1
    assert (report.crossing, report.merged_pieces, report.largest) == (1, 1, 64)
    assert report.ending_at_faces == 2
    # Joined once, not twice: the crossing object has one id on both sides of the face.
    assert len(np.unique(dst[4:16, 4:8])) == 1
