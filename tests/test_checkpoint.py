import pytest
import torch

from segcore.checkpoint import CheckpointError, load_unet, save_unet, unet_state_dict
from segcore.model import UNet


def test_roundtrip_is_exact(tmp_path):
    model = UNet(3, 2, base_channels=4, depth=3, batch_norm=True)
    save_unet(model, tmp_path / "m.pt", extra={"normalization": {"mean": [0.5]}})
    loaded = load_unet(tmp_path / "m.pt")
    assert loaded.config == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))


def test_lightning_style_checkpoint(tmp_path):
    """The wrapped U-Net's weights are found beside the Lightning module's other state."""
    model = UNet(1, 2, base_channels=4, depth=2)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["normalizer.mean"] = torch.zeros(1)  # the module's own state, not the U-Net's
    payload = {"state_dict": state, "hyper_parameters": {"unet_config": model.config.to_dict()}}
    torch.save(payload, tmp_path / "last.ckpt")
    loaded = load_unet(tmp_path / "last.ckpt")
    assert loaded.config == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert unet_state_dict(model.state_dict()).keys() == model.state_dict().keys()


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt: model file not found"):
        load_unet(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="garbage.pt: not a loadable model file"):
        load_unet(garbage)
    mismatched = tmp_path / "mismatched.pt"
    model = UNet(1, 2, base_channels=4, depth=2)
    torch.save(
        {
            "unet_config": {**model.config.to_dict(), "base_channels": 8},
            "state_dict": model.state_dict(),
        },
        mismatched,
    )
    with pytest.raises(CheckpointError, match="mismatched.pt: weights do not match"):
        load_unet(mismatched)


def test_code_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"unet_config": {}, "state_dict": {}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a loadable model file"):
        load_unet(path)
