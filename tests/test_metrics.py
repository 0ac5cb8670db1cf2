"""Reconstruction metrics against an independent implementation (scikit-image), and their input checks."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipelines.metrics import CodeHistogram, json_ready, psnr, ssim


def _pairs(channels: int, height: int, width: int):
    generator = torch.Generator().manual_seed(channels * 1000 + height)
    target = torch.rand(3, channels, height, width, generator=generator) * 2 - 1
    noisy = (target + 0.2 * torch.randn(target.shape, generator=generator)).clamp(-1, 1)
    return noisy, target


@pytest.mark.parametrize("channels, height, width", [(3, 32, 32), (1, 33, 47), (3, 31, 64)])
def test_psnr_and_ssim_match_scikit_image(channels, height, width):
    noisy, target = _pairs(channels, height, width)
    for i in range(len(target)):
        a, b = ((x[i].permute(1, 2, 0).double().numpy() + 1) / 2 for x in (noisy, target))
        assert psnr(noisy, target)[i].item() == pytest.approx(peak_signal_noise_ratio(b, a, data_range=1), abs=1e-4)
        expected = structural_similarity(b, a, data_range=1, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False)
        assert ssim(noisy, target)[i].item() == pytest.approx(expected, abs=1e-4)
    # per image: a batch gives what its images give one by one
    assert torch.allclose(psnr(noisy, target), torch.cat([psnr(noisy[i:i + 1], target[i:i + 1]) for i in range(3)]))


def test_metrics_refuse_inputs_they_would_score_wrong():
    noisy, target = _pairs(3, 16, 16)
    to_uint8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    for metric in (psnr, ssim):
        with pytest.raises(TypeError, match="float tensor"):  # uint8 would clamp to a perfect score
            metric(to_uint8(noisy), to_uint8(target))
        with pytest.raises(ValueError, match=r"must lie in \[-1, 1\], but \|max\| is 255"):
            metric(to_uint8(noisy).float(), to_uint8(target).float())
        with pytest.raises(ValueError, match="differ in shape"):  # would broadcast
            metric(noisy, target[:1, :1])
        with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
            metric(noisy[0], target[0])
    # a diverged reconstruction is scored NaN, not refused: the caller reports it
    assert torch.isnan(psnr(torch.full_like(target, float("nan")), target)).all()


def test_json_ready_replaces_non_finite_numbers_and_names_them():
    cleaned, bad = json_ready({"psnr": float("nan"), "ssim": 0.5, "prior": {"bits": float("inf"), "n": 3}})
    assert cleaned == {"psnr": None, "ssim": 0.5, "prior": {"bits": None, "n": 3}}
    assert bad == ["psnr", "prior.bits"]


def test_code_histogram_usage_and_perplexity():
    histogram = CodeHistogram(8)
    histogram.update(torch.tensor([[0, 1], [2, 3]]))
    histogram.update(torch.tensor([0, 1, 2, 3]))
    assert histogram.usage() == 0.5
    assert histogram.perplexity() == pytest.approx(4.0)  # uniform over 4 codes
    p = np.array([3, 1]) / 4
    histogram = CodeHistogram(4)
    histogram.update(torch.tensor([0, 0, 0, 1]))
    assert histogram.perplexity() == pytest.approx(math.exp(-(p * np.log(p)).sum()))
