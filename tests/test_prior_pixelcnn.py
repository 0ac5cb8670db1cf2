"""Gated PixelCNN prior: masks, causality, no blind spot, cached sampling parity, overfitting."""


import pytest
import torch

from prior import PixelCNNConfig, PixelCNNPrior
from prior.pixelcnn import causal_mask

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**overrides) -> PixelCNNPrior:
    return PixelCNNPrior(PixelCNNConfig.from_preset("tiny", **overrides)).eval()


def test_masks():
    assert causal_mask(3, "vertical", "A").tolist() == [[1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert causal_mask(3, "vertical", "B").tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert causal_mask(5, "horizontal", "A").tolist() == [[1, 1, 0, 0, 0]]
    assert causal_mask(5, "horizontal", "B").tolist() == [[1, 1, 1, 0, 0]]


def test_masks_are_buffers_and_weights_are_never_mutated():
    prior = tiny()
    conv = prior.layers[0].vertical_conv
    assert "mask" in dict(conv.named_buffers()) and not any("mask" in name for name in prior.state_dict())
    before = conv.weight.detach().clone()
    assert (before * (1 - conv.mask)).abs().sum() > 0  # masked-out taps still hold their (unused) values
    prior(torch.randint(0, 16, (2, 4, 4))).loss.backward()
    assert torch.equal(conv.weight.detach(), before)
    assert (conv.weight.grad * (1 - conv.mask)).abs().sum() == 0  # masked taps get no gradient


@pytest.mark.parametrize("num_classes", [0, 3])
def test_causality(num_classes):
    prior = tiny(num_classes=num_classes)
    labels = [1, 2] if num_classes else None
    indices = torch.randint(0, 16, (2, 4, 4))
    logits = prior(indices, labels).logits.flatten(1, 2)  # (B, 16, K)
    for position in range(16):
        changed = indices.clone().flatten(1)
        changed[:, position] = (changed[:, position] + 5) % 16
        new_logits = prior(changed.view(2, 4, 4), labels).logits.flatten(1, 2)
        torch.testing.assert_close(new_logits[:, : position + 1], logits[:, : position + 1], rtol=0, atol=0)
        if position < 15:
            assert not torch.allclose(new_logits[:, position + 1], logits[:, position + 1])


def test_no_blind_spot():
    """The logits at each position depend on every earlier position and on no later one."""
    prior = tiny()
    indices = torch.randint(0, 16, (1, 4, 4))
    for position in range(16):
        embedded = prior.code_embedding(indices).detach().requires_grad_(True)  # (1, 4, 4, C)
        original = prior.code_embedding.forward
        prior.code_embedding.forward = lambda _ids, e=embedded: e
        try:
            logits = prior(indices).logits.flatten(1, 2)  # (1, 16, K)
        finally:
            prior.code_embedding.forward = original
        (gradient,) = torch.autograd.grad(logits[0, position].sum(), embedded)
        influence = gradient.abs().sum(-1).flatten()  # (16,)
        assert (influence[:position] > 0).all(), (position, influence)
        assert (influence[position:] == 0).all(), (position, influence)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_cached_stream_matches_forward_and_naive_stream(num_classes):
    prior = tiny(num_classes=num_classes, kernel_size=5)
    indices = torch.randint(0, 16, (3, 4, 4))
    class_ids = torch.tensor([0, 3, 2]) if num_classes else None  # 3 = the null class
    expected = prior._logits(indices, class_ids).flatten(1, 2)  # (B, 16, K)
    for use_cache in (True, False):
        stream = prior._logit_stream(class_ids, 3, use_cache)
        streamed = [next(stream)] + [stream.send(indices.flatten(1)[:, t]) for t in range(15)]
        torch.testing.assert_close(torch.stack(streamed, 1), expected, rtol=1e-5, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        PixelCNNConfig(kernel_size=4)
    with pytest.raises(TypeError, match="hidden_channels must be an int"):
        PixelCNNConfig(hidden_channels=1.5)
    with pytest.raises(TypeError, match="config must be a PixelCNNConfig"):
        PixelCNNPrior({"hidden_channels": 8})
