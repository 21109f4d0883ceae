from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from segcore.augment import (
    AugmentConfig,
    AugmentInputError,
    augment_batch,
    coarse_displacements,
    displacement_field,
    elastic_deform,
    stain_jitter,
)
from segcore.stain import hed_to_rgb, rgb_to_hed

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STILL = AugmentConfig(elastic=False, flips=False, rot90=False, gray_jitter=0.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_batch(n=3, c=2, h=40, w=40, labels=(0, 1), seed=0):
    g = _gen(seed)
    image = torch.rand(n, c, h, w, generator=g)
    choice = torch.randint(0, len(labels), (n, h, w), generator=g)
    target = torch.tensor(labels)[choice]
    weight = torch.rand(n, h, w, generator=g) * 10
    return image, target, weight


def _isbi_cell_ids(n: int) -> np.ndarray:
    tifffile = pytest.importorskip("tifffile")
    path = DATA / "isbi2012_em" / "train-labels.tif"
    if not path.exists():
        pytest.skip(f"{path} absent")
    labels = tifffile.imread(path, key=range(n))
    return np.stack([ndimage.label(s == 255)[0] for s in labels])  # 255 = cell interior


def _dihedral(t: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of the last two axes of a square tensor."""
    turns = [torch.rot90(t, k, dims=(-2, -1)) for k in range(4)]
    return turns + [x.flip(-1) for x in turns]


def test_labels_stay_in_their_label_set():
    image, target, weight = _random_batch(labels=(0, 3, 7))
    _, out, _ = augment_batch(image, target, weight, AugmentConfig(elastic_sigma=15), _gen())
    assert out.dtype == target.dtype
    assert set(out.unique().tolist()) <= {0, 3, 7}
    assert not torch.equal(out, target)


def test_zero_displacement_is_the_identity():
    # Odd, non-square sides; the resampling path still runs (sigma 0, not elastic=False).
    image, target, weight = _random_batch(n=2, c=3, h=96, w=81, labels=(0, 1, 2))
    config = AugmentConfig(elastic_sigma=0.0, flips=False, rot90=False, gray_jitter=0.0)
    out_image, out_target, out_weight = augment_batch(image, target, weight, config, _gen())
    assert torch.equal(out_target, target)
    torch.testing.assert_close(out_image, image, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_weight / 10, weight / 10, rtol=0, atol=1e-5)
    bilinear = AugmentConfig(
        elastic_sigma=0.0, image_mode="bilinear", flips=False, rot90=False, gray_jitter=0.0
    )
    out_image, _, _ = augment_batch(image, target, None, bilinear, _gen())
    torch.testing.assert_close(out_image, image, rtol=0, atol=1e-5)
    still = augment_batch(image, target, weight, STILL, _gen())
    assert torch.equal(still[0], image) and torch.equal(still[1], target)


def test_same_seed_same_output_and_other_seed_other_output():
    image, target, weight = _random_batch()
    config = AugmentConfig()
    a = augment_batch(image, target, weight, config, _gen(5))
    b = augment_batch(image, target, weight, config, _gen(5))
    c = augment_batch(image, target, weight, config, _gen(6))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])


def test_coarse_displacements_have_the_configured_spread():
    config = AugmentConfig(elastic_sigma=10.0)
    coarse = coarse_displacements(4000, config, _gen(1))
    assert coarse.shape == (4000, 2, 3, 3)
    assert coarse.std().item() == pytest.approx(10.0, rel=0.02)
    assert abs(coarse.mean().item()) < 0.1
    # The bicubic field passes through the nodes: corners, and the centre for odd sides.
    field = displacement_field(coarse[:8], 65, 49)
    assert field.shape == (8, 2, 65, 49)
    for (i, j), (y, x) in {(0, 0): (0, 0), (2, 2): (64, 48), (1, 1): (32, 24)}.items():
        torch.testing.assert_close(field[:, :, y, x], coarse[:8, :, i, j])


def test_field_channels_are_x_then_y_in_pixels():
    image, target, weight = _random_batch(n=1, c=1, h=20, w=30, labels=(0, 1, 2))
    field = torch.zeros(1, 2, 20, 30)
    field[:, 0] = 3.0  # output pixel (y, x) reads input pixel (y, x + 3)
    field[:, 1] = -2.0  # ... and (y - 2, x + 3)
    out_image, out_target, out_weight = elastic_deform(image, target, weight, field)
    torch.testing.assert_close(out_image[..., 2:, :-3], image[..., :-2, 3:], rtol=0, atol=1e-4)
    assert torch.equal(out_target[..., 2:, :-3], target[..., :-2, 3:])
    torch.testing.assert_close(out_weight[..., 2:, :-3], weight[..., :-2, 3:], rtol=0, atol=1e-4)


def test_augment_batch_moves_pixels_by_sigma_pixels():
    # A coordinate ramp (channel 0 = x, channel 1 = y) records where each output pixel came
    # from; bicubic interpolation reproduces a ramp exactly, so the centre pixel's value minus
    # its position is the displacement of the centre node of the coarse grid: N(0, sigma).
    n, side = 512, 97
    ys, xs = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    image = torch.stack((xs, ys))[None].expand(n, 2, side, side).contiguous()
    target = torch.zeros(n, side, side, dtype=torch.long)
    config = AugmentConfig(elastic_sigma=10.0, flips=False, rot90=False, gray_jitter=0.0)
    out, _, _ = augment_batch(image, target, None, config, _gen(2))
    centre = side // 2
    moved = out[:, :, centre, centre] - centre
    assert moved.std().item() == pytest.approx(10.0, rel=0.1)
    assert abs(moved.mean().item()) < 1.5


def test_image_target_and_weight_move_together_on_isbi_cells():
    ids = torch.from_numpy(_isbi_cell_ids(4)).long()[:, :256, :256]
    assert ids.max() > 20
    # A label-coloured image and weight: away from label edges they must still show the colour
    # of the label that lands on the same pixel.
    color = torch.stack(((ids % 13).float() / 13, (ids * 7 % 17).float() / 17), dim=1)
    weight = (ids % 5).float() + 1
    config = AugmentConfig(gray_jitter=0.0)
    out_image, out_ids, out_weight = augment_batch(color, ids, weight, config, _gen(3))
    assert set(out_ids.unique().tolist()) <= set(ids.unique().tolist())
    assert not torch.equal(out_ids, ids)
    # Interior: the 7 x 7 neighbourhood holds one label (it covers the bicubic support after a
    # smooth deformation that stretches far less than 2x) and lies inside the tile (near the
    # border the support reaches mirrored pixels that the output does not show).
    ids_np = out_ids.numpy()
    interior = (ndimage.maximum_filter(ids_np, size=(1, 7, 7)) == ids_np) & (
        ndimage.minimum_filter(ids_np, size=(1, 7, 7), mode="constant", cval=-1) == ids_np
    )
    assert interior.mean() > 0.3
    expected = torch.stack(((out_ids % 13).float() / 13, (out_ids * 7 % 17).float() / 17), 1)
    mask = torch.from_numpy(interior)
    diff = (out_image - expected).abs().amax(dim=1)[mask]
    assert diff.max().item() < 1e-4
    assert (out_weight - ((out_ids % 5).float() + 1)).abs()[mask].max().item() < 1e-4


def test_flips_and_rotations_are_shared_exact_permutations():
    n, side = 64, 6
    grid = torch.arange(side * side).view(side, side)
    image = grid.float()[None, None].expand(n, 1, side, side).contiguous()
    target = grid[None].expand(n, side, side).contiguous()
    weight = grid.float()[None].expand(n, side, side).contiguous() * 2
    config = AugmentConfig(elastic=False, gray_jitter=0.0)
    out_image, out_target, out_weight = augment_batch(image, target, weight, config, _gen(4))
    variants = _dihedral(grid)
    seen = set()
    for i in range(n):
        k = next(k for k, v in enumerate(variants) if torch.equal(out_target[i], v))
        seen.add(k)
        assert torch.equal(out_image[i, 0], variants[k].float())
        assert torch.equal(out_weight[i], variants[k].float() * 2)
    assert seen == set(range(8))
    # Flips alone never transpose.
    flips_only = AugmentConfig(elastic=False, rot90=False, gray_jitter=0.0)
    _, out_target, _ = augment_batch(image, target, None, flips_only, _gen(4))
    allowed = [grid, grid.flip(-1), grid.flip(-2), grid.flip(-1).flip(-2)]
    assert all(any(torch.equal(t, a) for a in allowed) for t in out_target)
    # Rotations alone never mirror.
    turns_only = AugmentConfig(elastic=False, flips=False, gray_jitter=0.0)
    _, out_target, _ = augment_batch(image, target, None, turns_only, _gen(4))
    kinds = {next(k for k, v in enumerate(variants) if torch.equal(t, v)) for t in out_target}
    assert kinds == {0, 1, 2, 3}


def test_rotations_keep_non_square_shapes():
    image, target, weight = _random_batch(n=8, h=24, w=40)
    out = augment_batch(image, target, weight, AugmentConfig(), _gen())
    assert out[0].shape == image.shape and out[1].shape == target.shape
    assert out[2].shape == weight.shape


def test_gray_jitter_touches_only_the_image_and_keeps_the_order_of_gray_values():
    image, target, weight = _random_batch(n=6, c=1)
    config = AugmentConfig(elastic=False, flips=False, rot90=False, gray_jitter=0.2)
    out_image, out_target, out_weight = augment_batch(image, target, weight, config, _gen(7))
    assert torch.equal(out_target, target) and torch.equal(out_weight, weight)
    assert not torch.allclose(out_image, image, atol=1e-3)
    for src, dst in zip(image.flatten(1), out_image.flatten(1), strict=True):
        assert (torch.diff(dst[torch.argsort(src)]) >= -1e-6).all()  # a monotone map
    flat = torch.full((1, 1, 8, 8), 0.5)
    jittered = augment_batch(flat, torch.zeros(1, 8, 8, dtype=torch.long), None, config, _gen())
    assert torch.isfinite(jittered[0]).all()


def test_bad_inputs_raise_one_clear_error():
    image, target, weight = _random_batch()
    with pytest.raises(AugmentInputError, match="target shape"):
        augment_batch(image, target[:, 1:], weight, AugmentConfig(), _gen())
    with pytest.raises(AugmentInputError, match="weight shape"):
        augment_batch(image, target, weight[:1], AugmentConfig(), _gen())
    with pytest.raises(AugmentInputError, match="N x C x H x W"):
        augment_batch(image[0], target, weight, AugmentConfig(), _gen())
    with pytest.raises(AugmentInputError, match="floating point"):
        augment_batch((image * 255).byte(), target, weight, AugmentConfig(), _gen())
    with pytest.raises(AugmentInputError, match="integer class ids"):
        augment_batch(image, target.float(), weight, AugmentConfig(), _gen())
    with pytest.raises(AugmentInputError, match="elastic_sigma"):
        AugmentConfig(elastic_sigma=-1)


def _stained(n: int = 4, h: int = 16, w: int = 20, seed: int = 0) -> torch.Tensor:
    """RGB on [0, 1] with known concentrations: H 0.1..0.8, E 0.1..0.5, D 0.05 (all > 0)."""
    g = _gen(seed)
    hed = torch.stack(
        [
            0.1 + 0.7 * torch.rand(n, h, w, generator=g),
            0.1 + 0.4 * torch.rand(n, h, w, generator=g),
            torch.full((n, h, w), 0.05),
        ],
        dim=1,
    )
    return hed_to_rgb(hed.double()).float()


def test_stain_jitter_at_zero_strength_is_the_identity_within_one_grey_level():
    pixels = torch.arange(256, dtype=torch.float32) / 255  # every uint8 value, 0 and 255 too
    image = pixels[torch.randperm(256 * 3, generator=_gen()) % 256].view(1, 3, 16, 16)
    out = stain_jitter(image, 0.0, 0.0, _gen())
    assert (out - image).abs().max() * 255 < 1
    # Switched off in the config, the batch goes through untouched and bit for bit.
    image, target, weight = _random_batch(c=3)
    config = AugmentConfig(elastic=False, flips=False, rot90=False, gray_jitter=0.0)
    assert torch.equal(augment_batch(image, target, weight, config, _gen())[0], image)


def test_stain_jitter_scales_and_shifts_each_stain_by_one_draw_per_sample():
    image = _stained().double()
    hed = rgb_to_hed(image)
    scaled = rgb_to_hed(stain_jitter(image, 0.2, 0.0, _gen(1)))
    alpha = scaled / hed  # one factor per sample and stain, the same at every pixel
    per_sample = alpha.flatten(2)
    assert (per_sample.amax(-1) - per_sample.amin(-1)).max() < 1e-4  # computed in float32
    assert ((per_sample[..., 0] - 1).abs() <= 0.2).all()
    assert per_sample[..., 0].std() > 0.02  # samples and stains draw their own factors
    shifted = rgb_to_hed(stain_jitter(image, 0.0, 0.1, _gen(2)))
    beta = (shifted - hed).flatten(2)
    assert (beta.amax(-1) - beta.amin(-1)).max() < 1e-5
    assert (beta[..., 0].abs() <= 0.1).all() and beta[..., 0].std() > 0.01


def test_stain_jitter_is_seeded_and_touches_only_the_image():
    image = _stained()
    _, target, weight = _random_batch(n=4, c=3, h=16, w=20)
    config = AugmentConfig(
        elastic=False, flips=False, rot90=False, gray_jitter=0.0, stain_sigma=0.1, stain_bias=0.05
    )
    a = augment_batch(image, target, weight, config, _gen(5))
    b = augment_batch(image, target, weight, config, _gen(5))
    c = augment_batch(image, target, weight, config, _gen(6))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[0], c[0], atol=1e-3)
    assert torch.equal(a[1], target) and torch.equal(a[2], weight)
    assert a[0].dtype == image.dtype and a[0].min() >= 0 and a[0].max() <= 1
    assert not torch.allclose(a[0], image, atol=1e-3)


def test_stain_jitter_needs_rgb_and_says_so():
    image, target, weight = _random_batch(c=1)
    config = AugmentConfig(stain_sigma=0.1)
    with pytest.raises(AugmentInputError, match="needs RGB images, got 1 channel"):
        config.check_channels(1)
    with pytest.raises(AugmentInputError, match="needs RGB images, got 1 channel"):
        augment_batch(image, target, weight, config, _gen())
    config.check_channels(3)
    AugmentConfig().check_channels(1)  # off: any channel count
    augment_batch(image, target, weight, AugmentConfig(), _gen())
    with pytest.raises(AugmentInputError, match="stain_sigma"):
        AugmentConfig(stain_sigma=1.0)
    with pytest.raises(AugmentInputError, match="stain_bias"):
        AugmentConfig(stain_bias=-0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_for_the_same_seed():
    image, target, weight = _random_batch(n=4, h=64, w=64, labels=(0, 1, 2))
    config = AugmentConfig()
    cpu = augment_batch(image, target, weight, config, _gen(9))
    gpu = augment_batch(image.cuda(), target.cuda(), weight.cuda(), config, _gen(9))
    stained = AugmentConfig(stain_sigma=0.1, stain_bias=0.05)
    image3 = _stained(n=4, h=64, w=64)
    cpu3 = augment_batch(image3, target, weight, stained, _gen(3))[0]
    gpu3 = augment_batch(image3.cuda(), target.cuda(), weight.cuda(), stained, _gen(3))[0]
    assert gpu3.device.type == "cuda"
    torch.testing.assert_close(gpu3.cpu(), cpu3, rtol=0, atol=1e-4)
    assert all(t.device.type == "cuda" for t in gpu)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=0, atol=1e-3)
    assert (gpu[1].cpu() == cpu[1]).float().mean() > 0.999
