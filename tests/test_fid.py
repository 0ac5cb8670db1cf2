"""rFID: weights resolution and checks, the metric's behaviour, and the real Inception loading path (offline)."""

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.fid import (
    FIDInceptionV3,
    ReconstructionFID,
    fid_weights_cache_path,
    load_fid_weights,
    resolve_fid_weights,
)


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


class RecordingFeatures(TinyFeatures):
    """TinyFeatures that keeps every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.inputs.append(images.clone())
        return super().forward(images)


def test_fid_feeds_the_network_uint8_rgb_over_the_full_range(images):
    feature = RecordingFeatures()
    fid = ReconstructionFID(feature=feature)
    feature.inputs.clear()
    corners = torch.full((2, 3, 8, 8), -1.0)
    corners[1] = 1.0
    fid.update(corners, corners)
    seen = feature.inputs[0]
    assert seen.dtype == torch.uint8 and seen.shape == (2, 3, 8, 8)
    assert int(seen[0].max()) == 0 and int(seen[1].min()) == 255  # [-1, 1] -> [0, 255]
    gray = images[:4].mean(dim=1, keepdim=True)
    fid.update(gray, gray)
    seen = feature.inputs[-1]
    assert seen.shape == (4, 3, 32, 32)
    assert torch.equal(seen[:, 0], seen[:, 1]) and torch.equal(seen[:, 1], seen[:, 2])  # gray repeated


class DuplicatingAccelerator:
    """Stands in for two processes that each hold the same batch: gather_for_metrics returns it twice."""

    def gather_for_metrics(self, tensor):
        return torch.cat([tensor, tensor])


def test_fid_gathers_features_across_processes(images):
    noisy = (images + 0.1 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    gathered = ReconstructionFID(feature=TinyFeatures())
    for a, b in zip(images.split(16), noisy.split(16)):
        gathered.update(a, b, accelerator=DuplicatingAccelerator())
    assert gathered.num_images == 2 * images.shape[0]
    expected = fid_of(torch.cat([images, images]), torch.cat([noisy, noisy]), feature=TinyFeatures())
    assert gathered.compute() == pytest.approx(expected, rel=1e-6)


def test_fid_takes_grayscale_and_refuses_bad_shapes(images):
    gray = images.mean(dim=1, keepdim=True)
    assert abs(fid_of(gray, gray, feature=TinyFeatures())) < 1e-6
    fid = ReconstructionFID(feature=TinyFeatures())
    with pytest.raises(ValueError, match="differ in shape"):
        fid.update(images[:4], images[:3])
    with pytest.raises(ValueError, match=r"\(B, 1 or 3, H, W\)"):
        fid.update(images[:4, :2], images[:4, :2])
    with pytest.raises(TypeError, match="float tensor"):  # uint8 would clamp to 1: an rFID near 0 for anything
        fid.update((images[:4] * 127.5 + 127.5).to(torch.uint8), images[:4])
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        fid.update(images[:4] * 127.5 + 127.5, images[:4])
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


class LeavesAMark:
    """Unpickling it would create the file `marker`: the test shows that never happens."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_fid_weights_are_checked_before_loading(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt or not a tensors-only state dict"):
        load_fid_weights(corrupt)
    marker = tmp_path / "unpickled"
    pickled_object = tmp_path / "object.pth"
    torch.save({"fc.weight": LeavesAMark(marker)}, pickled_object)
    with pytest.raises(ValueError, match="tensors-only"):
        load_fid_weights(pickled_object)
    with pytest.raises(ValueError, match="tensors-only"):
        ReconstructionFID(weights=pickled_object)
    assert not marker.exists()  # refused by weights_only=True: the object was never built
    wrong_network = tmp_path / "wrong.pth"
    torch.save(nn.Linear(2, 2).state_dict(), wrong_network)
    with pytest.raises(ValueError, match="not torch-fidelity's FID Inception-v3"):
        load_fid_weights(wrong_network)
    with pytest.raises(ValueError, match="not torch-fidelity's FID Inception-v3"):
        ReconstructionFID(weights=wrong_network)


def test_fid_weights_of_the_wrong_shapes_are_refused(tmp_path, fid_weights_file):
    state = torch.load(fid_weights_file, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    misfit = tmp_path / "misfit.pth"
    torch.save(state, misfit)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="do not fit the network"):
        ReconstructionFID(weights=misfit)


def test_fid_with_the_inception_network_from_a_local_file(images, fid_weights_file):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with pytest.warns(UserWarning, match="not the published FID Inception-v3 file"):  # random weights, not the real ones
        fid = ReconstructionFID(weights=fid_weights_file)
    assert isinstance(fid.feature, FIDInceptionV3)
    # torch-fidelity's own network, with its TF1-style resize (not an antialiased one), strictly loaded
    assert type(fid.feature.network) is FeatureExtractorInceptionV3
    saved = torch.load(fid_weights_file, weights_only=True)
    assert all(torch.equal(saved[name], value) for name, value in fid.feature.network.state_dict().items())
    fid.feature.train()
    assert not fid.feature.network.training and not any(p.requires_grad for p in fid.feature.parameters())
    fid.update(images[:4], images[4:8])
    value = fid.compute()
    assert np.isfinite(value) and value > 0


def test_fid_weights_with_the_published_hash_load_without_a_warning(fid_weights_file, monkeypatch):
    import hashlib
    import warnings

    import pipelines.fid as fid_module

    digest = hashlib.sha256(fid_weights_file.read_bytes()).hexdigest()
    monkeypatch.setattr(fid_module, "fid_weights_sha256_prefix", lambda: digest[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_fid_weights(fid_weights_file)
    assert "Mixed_7c.branch_pool.conv.weight" in state
    monkeypatch.setattr(fid_module, "fid_weights_sha256_prefix", lambda: "00000000" if digest[:8] != "00000000" else "11111111")
    with pytest.warns(UserWarning, match="not comparable with published ones"):
        load_fid_weights(fid_weights_file)
