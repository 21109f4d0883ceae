import math

import torch
from torch import nn

from segcore.model import UNet, UNetConfig


def test_paper_network_shapes_and_channels():
    model = UNet(1, 2)  # the paper's: base 64, depth 5
    widths = [block[0].out_channels for block in model.down]
    assert widths == [64, 128, 256, 512, 1024]
    assert model.margin == 92
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.zeros(1, 1, 188, 188)
    assert model(x).shape == (1, 2, 4, 4)


def test_he_normal_init():
    torch.manual_seed(0)
    model = UNet(1, 2, base_channels=64, depth=3)
    conv = model.down[1][2]  # 128 -> 128, 3x3: N = 9 * 128
    assert abs(conv.weight.std().item() - math.sqrt(2 / (9 * 128))) < 0.05 * math.sqrt(
        2 / (9 * 128)
    )
    assert torch.count_nonzero(conv.bias) == 0


def test_batch_norm_option_and_config_roundtrip():
    model = UNet(3, 4, base_channels=4, depth=3, batch_norm=True, padding="same")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    clone = UNet.from_config(model.config.to_dict())
    assert clone.config == model.config == UNetConfig(3, 4, 4, 3, "same", True, 0.5)
    assert sum(p.numel() for p in clone.parameters()) == sum(p.numel() for p in model.parameters())


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = UNet(1, 2, base_channels=4, depth=3)
    x = torch.randn(1, 1, 44, 44)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
