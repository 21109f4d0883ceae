import pytest
import torch

from segcore.geometry import UNetGeometry
from segcore.model import UNet


def test_paper_geometry():
    g = UNetGeometry(depth=5)
    assert g.margin == 92
    assert g.pool_factor == 16
    assert g.output_size(572) == 388
    assert g.valid_input_size(388) == 572
    assert g.output_size(2236) == 2052


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_geometry_matches_the_network(depth):
    model = UNet(1, 2, base_channels=2, depth=depth).eval()
    g = model.geometry
    smallest = g.valid_input_size(1)
    for n in range(smallest, smallest + 3 * g.pool_factor + 1):
        if g.is_valid_input_size(n):
            with torch.no_grad():
                out = model(torch.zeros(1, 1, n, n))
            assert out.shape[-1] == g.output_size(n) == n - 2 * g.margin
        else:
            with pytest.raises(ValueError, match="not valid"):
                g.output_size(n)


def test_valid_sizes_round_down_and_up():
    g = UNetGeometry(depth=4)
    assert g.valid_input_size_at_most(g.valid_input_size(1) - 1) is None
    t = g.valid_input_size_at_most(1000)
    assert g.is_valid_input_size(t) and t <= 1000
    assert not any(g.is_valid_input_size(n) for n in range(t + 1, 1001))
    assert g.output_size(g.valid_input_size(300)) >= 300


def test_same_padding_keeps_size_and_crops_margin():
    g = UNetGeometry(depth=3, padding="same")
    model = UNet(1, 2, base_channels=2, depth=3, padding="same")
    n = g.valid_input_size(10)
    assert n % g.pool_factor == 0
    assert g.output_size(n) == n - 2 * g.margin
    assert model(torch.zeros(1, 1, n, n)).shape[-1] == n
