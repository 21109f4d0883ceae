"""Touching objects cut apart: segcore.separation on hand-made shapes, and the chunk-wise
pipelines.components.clean_foreground equal to cutting the whole map at once."""

import numpy as np
import zarr
from scipy import ndimage

from pipelines.components import clean_foreground, label_foreground
from pipelines.inference.outputs import InstanceRule, create_work_group, finish
from pipelines.stage import Identity
from segcore import ngff
from segcore.separation import (
    cut_touching,
    drop_small,
    foreground_classes,
    split_at_boundaries,
)
from segcore.weights import cell_boundaries


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


def test_foreground_threshold_keeps_only_confident_pixels():
    nucleus = np.array([[0.2, 0.45, 0.55, 0.65, 0.9]])
    probabilities = np.stack([1 - nucleus, nucleus])
    argmax = probabilities.argmax(0)
    np.testing.assert_array_equal(foreground_classes(probabilities, 0.5), argmax)
    np.testing.assert_array_equal(foreground_classes(probabilities, 0.6), [[0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(foreground_classes(probabilities, 0.4), [[0, 1, 1, 1, 1]])
    # Three classes: foreground is "not background", then the likelier of interior / boundary.
    three = np.array([[[0.3, 0.5]], [[0.3, 0.1]], [[0.4, 0.4]]])
    np.testing.assert_array_equal(foreground_classes(three, 0.6), [[2, 0]])
    assert foreground_classes(three, 0.6).dtype == np.uint8


def boundary_map(shape, n, seed, width=2):
    """A background / interior / boundary class map of touching discs (no gaps between them:
    only the boundary class says where one ends), and the number of discs left visible."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        labels[disc(shape, rng.uniform(0, shape), rng.uniform(5, 10))] = k
    classes = (labels > 0).astype(np.uint8)
    classes[cell_boundaries(labels, width)] = 2
    return classes


def test_boundary_split_by_hand():
    row = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [2, 1, 1, 2, 2, 1, 1, 2], [0] * 8])
    expected = row > 0
    expected[1, 3] = False  # where the two seeds' regions meet, on the first seed's side
    np.testing.assert_array_equal(split_at_boundaries(row), expected)
    # No interior: the component stays whole; nothing at all: nothing.
    np.testing.assert_array_equal(split_at_boundaries(np.full((3, 3), 2)), np.ones((3, 3), bool))
    assert not split_at_boundaries(np.zeros((4, 4), np.uint8)).any()


def test_boundary_split_gives_each_seed_its_ring():
    shape = (60, 80)
    left, right = disc(shape, (30, 25), 12), disc(shape, (30, 45), 12)  # overlap 4 px
    labels = np.where(right, 2, np.where(left, 1, 0))
    classes = (labels > 0).astype(np.uint8)
    classes[cell_boundaries(labels, 2)] = 2
    assert n_objects(classes > 0) == 1
    split = split_at_boundaries(classes)
    assert n_objects(split) == 2
    # Only a line between the seeds goes; each object is its seed plus its boundary ring.
    assert 0 < (classes > 0).sum() - split.sum() <= 30
    pieces, _ = ndimage.label(split)
    for k in (1, 2):
        assert len(np.unique(ndimage.label(classes == 1)[0][pieces == k])) == 2  # 0 and one seed
    # A lone ring without interior is one object, next to split ones.
    classes[2:5, 2:5] = 2
    assert n_objects(split_at_boundaries(classes)) == 3


def test_chunk_wise_boundary_split_equals_the_whole_map(tmp_path):
    classes = boundary_map((300, 260), 160, seed=4)
    whole = split_at_boundaries(classes)
    assert n_objects(whole) > n_objects(classes > 0) + 10  # there was touching to split
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    src = ngff.create_array(group, "src", classes.shape, "uint8", (64, 64))
    src[...] = classes
    dst = ngff.create_array(group, "split", classes.shape, "uint8", (64, 64))
    clean_foreground(src, dst, halo=40, seeded=True)
    np.testing.assert_array_equal(dst[...] != 0, whole)


def test_finish_builds_instances_from_boundary_seeds(tmp_path):
    classes = boundary_map((256, 192), 90, seed=5)
    classes_named = ("background", "cell", "boundary")
    work = create_work_group(tmp_path / "out", classes.shape, 64, 2, None, 3, None, classes_named)
    label = work.group["labels/segmentation"]
    assert label.attrs["ome"]["image-label"]["properties"] == [
        {"label-value": 1, "class": "cell"},
        {"label-value": 2, "class": "boundary"},
    ]
    label["0"][...] = classes
    identity = Identity(stage="infer", format=2, inputs={}, settings={})
    plain = finish(work, None, 64, 2, None, InstanceRule(), 8, identity).n_components
    assert plain == n_objects(classes > 0)  # class 2 is foreground too
    rule = InstanceRule(cut_halo=48, seeded=True)
    split = finish(work, None, 64, 2, None, rule, 8, identity).n_components
    assert split == n_objects(split_at_boundaries(classes)) > plain + 5
    attrs = work.group["labels/instances"].attrs["segflow"]
    assert attrs["separation"] == "boundary" and attrs["cut_depth"] is None
    instances = work.group["labels/instances/0"][...]
    np.testing.assert_array_equal(instances != 0, split_at_boundaries(classes))
