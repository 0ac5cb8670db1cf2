"""The parameter-free shortcuts of the encoder and decoder (resampling and latent), and their config fields."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenizer import VQTokenizer, VQTokenizerConfig
from tokenizer.blocks import Downsample, Upsample, channel_shortcut


def zero_(conv: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def test_channel_shortcut_averages_or_repeats():
    x = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    torch.testing.assert_close(channel_shortcut(x, 2), torch.stack([x[:, 0:2].mean(1), x[:, 2:4].mean(1)], dim=1))
    repeated = channel_shortcut(x, 8)
    assert repeated.shape == (2, 8, 3, 3)
    for channel in range(8):
        assert torch.equal(repeated[:, channel], x[:, channel // 2])
    assert torch.equal(channel_shortcut(x, 4), x)


def test_resampling_shortcuts_are_pooling_and_nearest_upsampling_beside_the_conv():
    x = torch.randn(2, 8, 6, 6)
    down, up = Downsample(8, shortcut=True), Upsample(8, shortcut=True)
    plain_down, plain_up = Downsample(8), Upsample(8)
    plain_down.load_state_dict(down.state_dict())
    plain_up.load_state_dict(up.state_dict())
    torch.testing.assert_close(down(x), plain_down(x) + F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), plain_up(x) + F.interpolate(x, scale_factor=2.0, mode="nearest"))
    zero_(down.conv), zero_(up.conv)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_latent_shortcuts_carry_the_features_past_zeroed_convs():
    tok = VQTokenizer.from_preset("tiny", latent_shortcuts=True).eval()  # last width 32, latent 16
    zero_(tok.encoder.conv_out)
    zero_(tok.decoder.conv_in)
    features, decoder_inputs = {}, {}
    tok.encoder.middle.register_forward_hook(lambda module, args, out: features.setdefault("h", out))
    tok.decoder.middle.register_forward_pre_hook(lambda module, args: decoder_inputs.setdefault("h", args[0]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        latents = tok.encoder(x)
        tok.decoder(z)
    torch.testing.assert_close(latents, channel_shortcut(features["h"], 16))
    torch.testing.assert_close(decoder_inputs["h"], z.repeat_interleave(2, dim=1))


def test_shortcuts_add_no_parameters_and_keep_the_weight_layout():
    plain = VQTokenizer.from_preset("tiny")
    with_shortcuts = VQTokenizer.from_preset("tiny", resample_shortcuts=True, latent_shortcuts=True)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in with_shortcuts.state_dict().items()
    }
    with_shortcuts.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert not torch.equal(plain.eval()(x).reconstruction, with_shortcuts.eval()(x).reconstruction)


def test_small_f4_preset_uses_both_shortcuts_and_configs_without_the_fields_do_not():
    config = VQTokenizerConfig.from_preset("small-f4")
    assert config.resample_shortcuts and config.latent_shortcuts
    data = config.to_dict()
    assert VQTokenizerConfig.from_dict(json.loads(json.dumps(data))) == config
    del data["resample_shortcuts"], data["latent_shortcuts"]  # a config.json saved before the fields existed
    legacy = VQTokenizerConfig.from_dict(data)
    assert not legacy.resample_shortcuts and not legacy.latent_shortcuts


def test_shortcut_round_trip_through_save_pretrained(tmp_path):
    tok = VQTokenizer.from_preset("tiny", resample_shortcuts=True, latent_shortcuts=True).eval()
    tok.save_pretrained(tmp_path / "tok")
    loaded = VQTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == tok.config
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok(x).reconstruction, loaded(x).reconstruction)


def test_latent_shortcuts_need_divisible_widths():
    with pytest.raises(ValueError, match="latent_shortcuts needs latent_channels=24 and the last level's width 32"):
        VQTokenizerConfig.from_preset("tiny", latent_channels=24, latent_shortcuts=True)
    VQTokenizerConfig.from_preset("tiny", latent_channels=24)  # fine without the shortcut
    VQTokenizerConfig.from_preset("tiny", latent_channels=64, latent_shortcuts=True)  # repeat the other way
