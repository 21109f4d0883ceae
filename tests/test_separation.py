"""Touching objects cut apart: segcore.separation on hand-made shapes, and the chunk-wise
pipelines.components.clean_foreground equal to cutting the whole map at once."""

import numpy as np
import zarr
from scipy import ndimage

from pipelines.components import clean_foreground, label_foreground
from pipelines.inference.outputs import InstanceRule, create_work_group, finish
from pipelines.stage import Identity
from segcore import ngff
from segcore.separation import cut_touching, drop_small


def disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def n_objects(mask):
    return ndimage.label(mask)[1]


def test_two_touching_discs_become_two_objects():
    pair = disc((60, 80), (30, 25), 12) | disc((60, 80), (30, 45), 12)  # overlap 4 px
    assert n_objects(pair) == 1
    cut = cut_touching(pair)
    assert n_objects(cut) == 2
    # Only a thin line goes: about the neck's height, no more.
    removed = pair & ~cut
    assert 0 < removed.sum() <= 2 * 15 and set(np.unique(np.nonzero(removed)[1])) <= {34, 35, 36}


def test_lone_and_tiny_objects_are_kept_whole():
    shape = (40, 40)
    mask = disc(shape, (20, 20), 9)
    mask[2, 2] = mask[2, 3] = True  # too shallow for any marker
    np.testing.assert_array_equal(cut_touching(mask), mask)
    assert not cut_touching(np.zeros(shape, bool)).any()


def random_nuclei(shape, n, seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for _ in range(n):
        mask |= disc(shape, rng.uniform(0, shape), rng.uniform(4, 10))
    return mask


def test_chunk_wise_cut_equals_the_whole_map(tmp_path):
    mask = random_nuclei((300, 260), 160, seed=0)
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    src = ngff.create_array(group, "src", mask.shape, "uint8", (64, 64))
    src[...] = mask.astype(np.uint8) * 2  # any non-zero class is foreground
    dst = ngff.create_array(group, "cut", mask.shape, "uint8", (64, 64))
    clean_foreground(src, dst, halo=40)
    whole = cut_touching(mask)
    np.testing.assert_array_equal(dst[...] != 0, whole)
    assert n_objects(whole) > n_objects(mask) + 10  # there was touching to cut
    ids = ngff.create_array(group, "ids", mask.shape, "uint32", (64, 64))
    assert label_foreground(dst, ids).n_components == n_objects(whole)


def test_finish_builds_instances_from_the_cut_map(tmp_path):
    mask = random_nuclei((256, 192), 90, seed=1)
    work = create_work_group(tmp_path / "out", mask.shape, 64, 2, None, 2, None)
    work.group["labels/segmentation/0"][...] = mask.astype(np.uint8)
    identity = Identity(stage="infer", format=2, inputs={}, settings={})
    plain = finish(work, None, 64, 2, None, InstanceRule(), 8, identity).n_components
    assert plain == n_objects(mask)
    rule = InstanceRule(cut_depth=2.0, cut_halo=48)
    cut = finish(work, None, 64, 2, None, rule, 8, identity).n_components
    instances = work.group["labels/instances/0"][...]
    assert cut == n_objects(cut_touching(mask)) > plain + 5
    assert work.group["labels/instances"].attrs["segflow"]["cut_depth"] == 2.0
    np.testing.assert_array_equal(instances != 0, cut_touching(mask))


def test_specks_are_dropped_but_objects_a_window_cuts_are_not(tmp_path):
    shape = (40, 40)
    mask = disc(shape, (20, 20), 6)
    mask[2, 2] = mask[2, 3] = True  # a 2 px speck
    kept = drop_small(mask, 10, (False,) * 4)
    np.testing.assert_array_equal(kept, disc(shape, (20, 20), 6))
    # The same speck on a window side that is not the slide's: it may go on beyond, kept.
    assert drop_small(mask[2:, :], 10, (True, False, False, False))[0, 2]


def test_chunk_wise_cleaning_equals_the_whole_map(tmp_path):
    mask = random_nuclei((300, 260), 160, seed=2)
    rng = np.random.default_rng(3)
    specks = rng.random(mask.shape) < 0.002
    mask |= specks
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    src = ngff.create_array(group, "src", mask.shape, "uint8", (64, 64))
    src[...] = mask.astype(np.uint8)
    dst = ngff.create_array(group, "clean", mask.shape, "uint8", (64, 64))
    clean_foreground(src, dst, halo=40, cut_depth=2.0, min_size=20)
    whole = drop_small(cut_touching(mask), 20, (False,) * 4)
    np.testing.assert_array_equal(dst[...] != 0, whole)
    assert n_objects(whole) < n_objects(cut_touching(mask)) - 20  # specks were there to drop
