"""rFID: weights resolution and checks, the metric's behaviour, and the real Inception loading path (offline)."""

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.fid import ReconstructionFID, check_fid_weights, fid_weights_cache_path, resolve_fid_weights


class TinyFeatures(nn.Module):
    """A small fixed random feature network over uint8 images: (B, 3, H, W) -> (B, 16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 16, 5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images.float() / 127.5 - 1))
        return features.mean(dim=(2, 3)).double()


@pytest.fixture
def images(real_images):
    """64 (3, 32, 32) crops in [-1, 1]: the eight photo crops, flipped and shifted."""
    base = torch.from_numpy(np.stack(real_images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    variants = [base, base.flip(-1), base.flip(-2), base.flip(-1, -2)]
    variants += [v.roll(shifts=4, dims=-1) for v in variants]
    return torch.cat(variants)


def fid_of(originals, reconstructions, **kwargs):
    fid = ReconstructionFID(**kwargs)
    for a, b in zip(originals.split(16), reconstructions.split(16)):
        fid.update(a, b)
    return fid.compute()


def test_fid_is_zero_for_perfect_reconstructions_and_grows_with_the_error(images):
    perfect = fid_of(images, images, feature=TinyFeatures())
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    slightly = fid_of(images, (images + 0.05 * noise).clamp(-1, 1), feature=TinyFeatures())
    badly = fid_of(images, (images + 0.5 * noise).clamp(-1, 1), feature=TinyFeatures())
    assert abs(perfect) < 1e-6
    assert 0 < slightly < badly


def test_fid_takes_grayscale_and_refuses_bad_shapes(images):
    gray = images.mean(dim=1, keepdim=True)
    assert abs(fid_of(gray, gray, feature=TinyFeatures())) < 1e-6
    fid = ReconstructionFID(feature=TinyFeatures())
    with pytest.raises(ValueError, match="differ in shape"):
        fid.update(images[:4], images[:3])
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        fid.update(images[:4, :2], images[:4, :2])
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.compute()
    with pytest.raises(ValueError, match="exactly one"):
        ReconstructionFID()


def test_fid_weights_resolution(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert resolve_fid_weights() is None  # nothing cached: rFID is skipped, nothing is downloaded
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05"):
        resolve_fid_weights(tmp_path / "missing.pth")
    cached = fid_weights_cache_path()
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert resolve_fid_weights() == cached


class NotATensor:
    pass


def test_fid_weights_are_checked_before_loading(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt or not a tensors-only state dict"):
        check_fid_weights(corrupt)
    pickled_object = tmp_path / "object.pth"
    torch.save({"fc.weight": NotATensor()}, pickled_object)
    with pytest.raises(ValueError, match="tensors-only"):  # refused by weights_only=True, never unpickled
        check_fid_weights(pickled_object)
    wrong_network = tmp_path / "wrong.pth"
    torch.save(nn.Linear(2, 2).state_dict(), wrong_network)
    with pytest.raises(ValueError, match="not torch-fidelity's FID Inception-v3"):
        check_fid_weights(wrong_network)
    with pytest.raises(ValueError, match="not torch-fidelity's FID Inception-v3"):
        ReconstructionFID(weights=wrong_network)


def test_fid_with_the_inception_network_from_a_local_file(images, fid_weights_file):
    fid = ReconstructionFID(weights=fid_weights_file)
    fid.update(images[:4], images[4:8])
    value = fid.compute()
    assert np.isfinite(value) and value >= 0
