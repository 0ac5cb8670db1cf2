"""VQTokenizer: shapes, the quantized path, gradients, and learning on real images."""

import pytest
import torch

from tokenizer import VQTokenizer, VQTokenizerConfig


def tiny(**overrides) -> VQTokenizer:
    return VQTokenizer.from_preset("tiny", **overrides).eval()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "preset,size,grid",
    [("tiny", 32, 8), ("tiny", 48, 12), ("small-f4", 32, 8)],
)
def test_encode_shapes(preset, size, grid, batch):
    tok = VQTokenizer.from_preset(preset).eval()
    x = torch.rand(batch, 3, size, size) * 2 - 1
    out = tok.encode(x)
    assert out.indices.shape == (batch, grid, grid)
    assert out.indices.dtype == torch.int64
    assert out.quantized.shape == (batch, tok.config.latent_channels, grid, grid)
    assert int(out.indices.max()) < tok.codebook_size
    assert tok.decode(out.indices).shape == x.shape


def test_realistic_presets_downsampling():
    for name, factor, codes in [("f8-16384", 8, 16384), ("f16-16384", 16, 16384)]:
        config = VQTokenizerConfig.from_preset(name)
        assert config.downsample_factor == factor
        assert config.codebook_size == codes
    assert VQTokenizerConfig.from_preset("f16-16384").widths == (128, 128, 256, 256, 512)


def test_f8_preset_encodes():
    tok = VQTokenizer.from_preset("f8-16384", base_channels=32, latent_channels=32).eval()
    with torch.no_grad():
        assert tok.encode(torch.zeros(1, 3, 32, 32)).indices.shape == (1, 4, 4)


def test_decode_of_indices_equals_forward_quantized_path():
    tok = tiny()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        forward = tok(x)
        indices = tok.encode(x).indices
        decoded = tok.decode(indices)
    assert torch.equal(forward.indices, indices)
    torch.testing.assert_close(decoded, forward.reconstruction.clamp(-1, 1), atol=1e-5, rtol=0)


def test_encoder_gets_gradient_through_straight_through_estimator():
    tok = tiny().train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok(x)
    (out.reconstruction - x).abs().mean().backward()
    assert tok.encoder.conv_in.weight.grad is not None
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


def test_codebook_gets_gradient_only_through_codebook_term():
    tok = VQTokenizer.from_preset("tiny", quantizer={"use_ema": False}).train()
    codebook = [p for n, p in tok.quantizer.named_parameters() if "codebook" in n or "embed" in n]
    assert codebook, "gradient-updated quantizer must expose its codebook as a parameter"
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok(x)
    (out.reconstruction - x).abs().mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in codebook)
    tok.zero_grad()
    out = tok(x)
    out.codebook_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in codebook)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean()
    return float(-10 * torch.log10(mse))


def test_tiny_tokenizer_overfits_real_images(real_images):
    torch.manual_seed(0)
    tok = tiny().train()
    x = tok.image_processor.preprocess(real_images)  # (8, 3, 32, 32)
    with torch.no_grad():
        tok.eval()
        before = psnr(tok(x).reconstruction, x)
        tok.train()
    optimizer = torch.optim.Adam(tok.parameters(), lr=4e-3)
    for _ in range(60):
        out = tok(x)
        loss = (out.reconstruction - x).abs().mean() + out.quantizer_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tok.eval()
    with torch.no_grad():
        after = psnr(tok(x).reconstruction, x)
    assert after > before + 6.0, (before, after)
    assert after > 14.0, after


@pytest.mark.parametrize("kind", ["vq", "fsq", "lfq"])
def test_tokenizer_cast_to_bfloat16_encodes_and_decodes(kind):
    quantizer = {"vq": {}, "fsq": {"kind": "fsq", "codebook_size": 256}, "lfq": {"kind": "lfq", "codebook_size": 64}}
    tok = VQTokenizer.from_preset("tiny", quantizer={**quantizer[kind]}).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        reference = tok.encode(images).indices
        half = tok.to(torch.bfloat16)
        encoded = half.encode(images)  # float32 images into bf16 convs
        decoded = half.decode(encoded.indices)
    assert decoded.dtype == torch.bfloat16 and decoded.shape == (2, 3, 16, 16)
    assert (encoded.indices == reference).float().mean() > 0.5  # bf16 rounding flips a few near-ties at most
