"""Tests of the tokenizer's training losses (tokenizer/losses). Offline: LPIPS uses a random or fake trunk."""

import copy
import json
import math
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from tokenizer.losses import (
    LeCamRegularizer,
    LPIPSLoss,
    NLayerDiscriminator,
    PerceptualWeightsUnavailableError,
    ReconstructionLoss,
    VQGANLoss,
    VQGANLossConfig,
    adaptive_adversarial_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_trunk_weights,
    lpips_available,
    non_saturating_discriminator_loss,
    non_saturating_generator_loss,
    resolve_trunk_weights,
    trunk_cache_path,
)
from tokenizer.losses import perceptual as perceptual_module
from tokenizer.losses import vqgan_loss as vqgan_loss_module


def _tiny_config(**overrides) -> VQGANLossConfig:
    fields = dict(perceptual_weight=0.0, adversarial_weight=0.5, disc_base_channels=8, disc_layers=2)
    fields.update(overrides)
    return VQGANLossConfig(**fields)


class _TinyDecoder(nn.Module):
    """Stand-in for the tokenizer's decoder: the gradient-bearing last conv is all the losses need."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv_out(latents))


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # These tensors are tiny: on a shared CPU, thread contention costs far more than it brings.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_lpips() -> LPIPSLoss:
    with pytest.warns(UserWarning, match="randomly initialised trunk"):
        return LPIPSLoss(net="vgg", pnet_rand=True)


@pytest.fixture(scope="module")
def fake_vgg16_state() -> dict[str, torch.Tensor]:
    """torchvision VGG16's conv stack with random weights, named as in the ImageNet file (`features.*`)."""
    with torch.device("meta"):  # skip initialising the 120M-parameter classifier, which LPIPS never uses
        vgg16 = torchvision.models.vgg16(weights=None)
    features = vgg16.features.to_empty(device="cpu")
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            module.reset_parameters()
    return features.state_dict(prefix="features.")


# ---------------------------------------------------------------- reconstruction


def test_reconstruction_loss_weights_l1_and_l2():
    target, output = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [2.0, 0.0]]]])
    out = ReconstructionLoss(l1_weight=2.0, l2_weight=0.5)(target, output)
    assert out.l1.item() == pytest.approx(1.0)  # (1 + 1 + 2 + 0) / 4
    assert out.l2.item() == pytest.approx(1.5)  # (1 + 1 + 4 + 0) / 4
    assert out.loss.item() == pytest.approx(2.0 * 1.0 + 0.5 * 1.5)
    with pytest.raises(ValueError, match="l2_weight"):
        ReconstructionLoss(l2_weight=-1.0)
    with pytest.raises(ValueError, match="reconstruction shape"):
        ReconstructionLoss()(target, torch.zeros(1, 1, 2, 3))


# ---------------------------------------------------------------- GAN losses


def test_gan_loss_values_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = [0, 0.5, 2] -> 5/6 ; relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_generator_loss(fake).item() == pytest.approx(1.0 / 3)

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    expected_d = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert non_saturating_discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    expected_g = sum(softplus(-f) for f in fake.tolist()) / 3
    assert non_saturating_generator_loss(fake).item() == pytest.approx(expected_g, rel=1e-6)


def test_gan_losses_reduce_in_float32_from_bf16_logits():
    logits = torch.tensor([0.1, 0.2], dtype=torch.bfloat16)
    assert hinge_discriminator_loss(logits, logits).dtype == torch.float32
    assert non_saturating_generator_loss(logits).dtype == torch.float32


def test_adaptive_weight_matches_hand_computation():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))
    hidden = torch.tensor([3.0, -1.0])
    output = layer(hidden)  # W h = [1, 2.5]
    reconstruction_loss = 0.5 * output.square().sum()  # dL/dW = y h^T
    direction = torch.tensor([0.2, -0.4])
    generator_loss = (direction * output).sum()  # dL/dW = c h^T

    weight = adaptive_adversarial_weight(reconstruction_loss, generator_loss, layer.weight, base_weight=0.5)
    # Frobenius norm of an outer product u v^T is |u| |v|.
    norm_h = math.hypot(3.0, -1.0)
    expected = math.hypot(1.0, 2.5) * norm_h / (math.hypot(0.2, -0.4) * norm_h + 1e-4)
    assert weight.item() == pytest.approx(0.5 * expected, rel=1e-5)
    assert not weight.requires_grad
    # the graphs are kept for the backward pass that follows
    (reconstruction_loss + weight * generator_loss).backward()
    assert layer.weight.grad is not None

    output = layer(hidden)
    clamped = adaptive_adversarial_weight(0.5 * output.square().sum(), (direction * output).sum() * 1e-9,
                                          layer.weight, base_weight=2.0, max_weight=10.0)
    assert clamped.item() == pytest.approx(20.0)


# ---------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size, expected", [(32, 2), (64, 6)])
def test_discriminator_patch_logits_shape(size, expected):
    disc = NLayerDiscriminator(in_channels=3, base_channels=8, n_layers=3)
    logits = disc(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, expected, expected)
    assert disc.output_size(size) == expected


def test_discriminator_init_norm_option_and_errors():
    disc = NLayerDiscriminator(in_channels=1, base_channels=16, n_layers=3, norm="group")
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5  # first conv, 3 normalised convs, logit conv
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules())
    weights = torch.cat([c.weight.flatten() for c in convs[1:]])
    assert abs(weights.mean().item()) < 3e-3 and weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert disc(torch.randn(1, 1, 32, 32)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="too small"):
        disc(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="instance")
    with pytest.raises(ValueError, match="n_layers"):
        NLayerDiscriminator(n_layers=0)


# ---------------------------------------------------------------- LeCam


def test_lecam_penalty_and_ema_state_round_trip():
    lecam = LeCamRegularizer(decay=0.5)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0])
    lecam.update(real, fake)  # first update copies the means
    assert (lecam.ema_real.item(), lecam.ema_fake.item()) == (2.0, -0.5)
    real2, fake2 = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    penalty = lecam(real2, fake2)  # updates first, then penalises against the new EMAs
    ema_real, ema_fake = 0.5 * 2.0 + 0.5 * 0.5, 0.5 * -0.5 + 0.5 * 0.5  # 1.25, 0.0
    assert lecam.ema_real.item() == pytest.approx(ema_real)
    assert lecam.ema_fake.item() == pytest.approx(ema_fake)
    by_hand = ((max(2.0 - ema_fake, 0) ** 2 + max(-1.0 - ema_fake, 0) ** 2) / 2
               + (max(ema_real - 0.0, 0) ** 2 + max(ema_real - 1.0, 0) ** 2) / 2)
    assert by_hand == pytest.approx(2.8125)
    assert penalty.item() == pytest.approx(by_hand)

    restored = LeCamRegularizer(decay=0.5)
    restored.load_state_dict(lecam.state_dict())
    assert restored.num_updates.item() == 2
    assert torch.equal(restored.ema_real, lecam.ema_real) and torch.equal(restored.ema_fake, lecam.ema_fake)


def test_lecam_averages_skip_a_non_finite_batch():
    lecam = LeCamRegularizer(decay=0.5)
    lecam.update(torch.tensor([1.0]), torch.tensor([-1.0]))
    lecam.update(torch.tensor([float("nan")]), torch.tensor([0.0]))  # a batch whose step the guard skips
    assert (lecam.ema_real.item(), lecam.ema_fake.item()) == (1.0, -1.0) and lecam.num_updates.item() == 1
    lecam.update(torch.tensor([3.0]), torch.tensor([1.0]))
    assert (lecam.ema_real.item(), lecam.ema_fake.item()) == (2.0, 0.0)


# ---------------------------------------------------------------- LPIPS


def test_lpips_runs_in_float32_under_bf16_autocast(random_lpips):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    other = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    reference = random_lpips.distances(images, other)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = random_lpips.distances(images.bfloat16(), other.bfloat16())
    # bf16 inputs hold fewer digits; the convs themselves must not run in bf16 (errors of ~1% before)
    torch.testing.assert_close(autocast, random_lpips.distances(images.bfloat16().float(), other.bfloat16().float()),
                               rtol=1e-5, atol=1e-7)
    assert autocast.dtype == torch.float32 and torch.allclose(autocast, reference, rtol=0.02)


def test_lpips_random_trunk_distances_and_frozen(random_lpips):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert random_lpips(images, images).item() == pytest.approx(0.0, abs=1e-6)
    other = (images + 0.3 * torch.randn_like(images)).clamp(-1, 1)
    assert random_lpips(images, other).item() > 0
    assert all(not p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.lpips.training  # dropout in the linear layers stays off
    gray = images[:, :1]
    assert random_lpips(gray, gray.flip(-1)).item() > 0  # one channel is repeated to three
    assert random_lpips.state_dict() == {}  # frozen weights are never checkpointed
    random_lpips.load_state_dict({})
    with pytest.raises(ValueError, match="1 or 3 channels"):
        random_lpips(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32))


def test_evaluation_lpips_is_the_mean_over_images_not_over_batches(random_lpips):
    from pipelines.evaluate import evaluate_tokenizer
    from tokenizer import VQTokenizer, VQTokenizerConfig

    tokenizer = VQTokenizer(VQTokenizerConfig.from_preset("tiny")).eval()  # eval: no codebook updates
    images = torch.rand(10, 3, 16, 16) * 2 - 1
    batches = [{"pixel_values": chunk} for chunk in images.split(4)]  # 4 + 4 + 2 images: unequal batches
    metrics, _ = evaluate_tokenizer(tokenizer, batches, perceptual=random_lpips)
    with torch.no_grad():
        per_batch = [random_lpips.distances(tokenizer(b["pixel_values"]).reconstruction.clamp(-1, 1),
                                            b["pixel_values"]) for b in batches]
    assert [d.shape for d in per_batch] == [(4,), (4,), (2,)]
    mean_over_images = torch.cat(per_batch).mean().item()
    mean_over_batches = sum(d.mean().item() for d in per_batch) / len(per_batch)
    assert metrics["lpips"] == pytest.approx(mean_over_images, rel=1e-5)
    assert metrics["lpips"] != pytest.approx(mean_over_batches, rel=1e-5)


def test_lpips_gradient_reaches_input(random_lpips):
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    output = (images + 0.1 * torch.randn_like(images)).requires_grad_(True)
    random_lpips(output, images).backward()
    assert output.grad is not None and output.grad.abs().sum() > 0


def test_lpips_offline_error_names_file_location_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, destination):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(perceptual_module, "_download_trunk", offline)
    assert not lpips_available("vgg")
    with pytest.raises(PerceptualWeightsUnavailableError) as raised:
        LPIPSLoss(net="vgg")
    message = str(raised.value)
    expected_path = tmp_path / "checkpoints" / "vgg16-397923af.pth"
    for part in ("vgg16-397923af.pth", str(expected_path), "--lpips_weights PATH", "--perceptual_weight 0",
                 "Name or service not known"):
        assert part in message
    assert raised.value.expected_path == expected_path


def test_lpips_uses_cached_trunk_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def must_not_download(url, destination):
        raise AssertionError("the cached file should be used without any download")

    monkeypatch.setattr(perceptual_module, "_download_trunk", must_not_download)
    cached = trunk_cache_path("alex")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"placeholder")
    assert lpips_available("alex")
    assert resolve_trunk_weights("alex") == cached
    with pytest.raises(FileNotFoundError, match="trunk_weights="):
        resolve_trunk_weights("vgg", tmp_path / "nowhere.pth")


def test_lpips_loads_local_trunk_strictly(tmp_path, fake_vgg16_state):
    path = tmp_path / "vgg16.pth"
    torch.save({**fake_vgg16_state, "classifier.6.bias": torch.zeros(1000)}, path)  # head is ignored
    loss = LPIPSLoss(net="vgg", trunk_weights=path)
    loaded = loss.lpips.net.state_dict()
    assert len(loaded) == 26  # 13 convs x (weight, bias)
    for name, value in loaded.items():
        source = "features." + name.split(".", 1)[1]
        assert torch.equal(value, fake_vgg16_state[source]), name

    incomplete = {k: v for k, v in fake_vgg16_state.items() if k != "features.28.weight"}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    trunk = copy.deepcopy(loss.lpips.net)
    with pytest.raises(ValueError, match=r"missing keys \['features.28.weight'\]"):
        load_trunk_weights(trunk, tmp_path / "incomplete.pth")
    reshaped = {**fake_vgg16_state, "features.0.weight": torch.zeros(64, 1, 3, 3)}
    torch.save(reshaped, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match="does not match the LPIPS trunk"):
        load_trunk_weights(trunk, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match="pnet_rand"):
        LPIPSLoss(net="vgg", trunk_weights=path, pnet_rand=True)


def test_lpips_linear_heads_are_the_calibrated_ones_and_checked(tmp_path, random_lpips):
    import lpips

    with pytest.warns(UserWarning):  # lpips' own loader, for reference
        reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    heads = {k: v for k, v in random_lpips.lpips.state_dict().items() if k.startswith(("lin0", "lin1", "lin2", "lin3", "lin4"))}
    assert len(heads) == 5
    for name, value in heads.items():
        assert torch.equal(value, reference.state_dict()[name]), name
    torch.save({k: v for k, v in heads.items() if k != "lin4.model.1.weight"}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"missing keys \['lin4.model.1.weight'\]"):
        perceptual_module.load_linear_weights(copy.deepcopy(random_lpips.lpips), tmp_path / "short.pth")
    torch.save({**heads, "lin0.model.1.weight": torch.zeros(1, 3, 1, 1)}, tmp_path / "reshaped.pth")
    with pytest.raises(ValueError, match="does not match the network"):
        perceptual_module.load_linear_weights(copy.deepcopy(random_lpips.lpips), tmp_path / "reshaped.pth")


# ---------------------------------------------------------------- VQGANLoss


def _step_inputs(decoder: _TinyDecoder, size: int = 32):
    pixel_values = torch.rand(2, 3, size, size) * 2 - 1
    reconstruction = decoder(torch.randn(2, 4, size, size))
    return pixel_values, reconstruction, torch.tensor(0.25)


def test_generator_loss_before_and_after_disc_start():
    decoder = _TinyDecoder()
    loss_fn = VQGANLoss(_tiny_config(disc_start=5, quantizer_weight=2.0))
    assert loss_fn.perceptual is None and loss_fn.uses_discriminator
    pixel_values, reconstruction, quantizer_loss = _step_inputs(decoder)

    loss, logs = loss_fn.generator_loss(pixel_values, reconstruction, quantizer_loss, decoder.conv_out.weight, 4)
    assert logs["gan"] == 0.0 and logs["adaptive_weight"] == 0.0
    assert loss.item() == pytest.approx(logs["rec"] + 2.0 * 0.25, rel=1e-6)
    loss.backward(retain_graph=True)
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # not even run

    loss, logs = loss_fn.generator_loss(pixel_values, reconstruction, quantizer_loss, decoder.conv_out.weight, 5)
    assert logs["adaptive_weight"] > 0 and logs["gan"] != 0.0
    assert loss.item() == pytest.approx(logs["rec"] + 0.5 + logs["adaptive_weight"] * logs["gan"], rel=1e-5)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(pixel_values, reconstruction, quantizer_loss, None, 5)


def test_discriminator_not_updated_before_disc_start():
    decoder = _TinyDecoder()
    loss_fn = VQGANLoss(_tiny_config(disc_start=3))
    optimizer = torch.optim.AdamW(loss_fn.discriminator.parameters(), lr=1e-2, weight_decay=0.1)
    before = {k: v.clone() for k, v in loss_fn.discriminator.state_dict().items()}  # params + BN stats
    pixel_values, reconstruction, _ = _step_inputs(decoder)

    def training_step(step: int) -> torch.Tensor:
        loss, _ = loss_fn.discriminator_loss(pixel_values, reconstruction, step)
        optimizer.zero_grad()
        if loss_fn.discriminator_active(step):  # a constant has no graph to backward through
            loss.backward()
        optimizer.step()  # even stepping every time (AdamW with weight decay) leaves it unchanged
        return loss

    for step in range(3):
        loss = training_step(step)
        assert loss.item() == 0.0 and not loss.requires_grad
    after = loss_fn.discriminator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    loss = training_step(3)
    assert loss.item() > 0 and decoder.conv_out.weight.grad is None  # reconstruction was detached
    after = loss_fn.discriminator.state_dict()
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_vqgan_loss_bf16_autocast_lecam_and_resume_state(random_lpips, monkeypatch):
    decoder = _TinyDecoder()
    config = _tiny_config(perceptual_weight=1.0, lpips_pnet_rand=True, lecam_weight=0.1, disc_loss="non_saturating")
    built_with = []

    def shared_lpips(*args):  # reuse the module's LPIPS instead of building VGG16 again
        built_with.append(args)
        return random_lpips

    monkeypatch.setattr(vqgan_loss_module, "LPIPSLoss", shared_lpips)
    loss_fn = VQGANLoss(config)
    assert built_with == [("vgg", None, True)]
    pixel_values, reconstruction, quantizer_loss = _step_inputs(decoder)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = loss_fn.generator_loss(pixel_values, reconstruction, quantizer_loss,
                                            decoder.conv_out.weight, 0)
        d_loss, d_logs = loss_fn.discriminator_loss(pixel_values, reconstruction, 0)
    assert loss.dtype == torch.float32 and d_loss.dtype == torch.float32
    assert math.isfinite(loss.item()) and logs["perceptual"] > 0
    assert d_loss.item() == pytest.approx(d_logs["disc_loss"] + 0.1 * d_logs["lecam"], rel=1e-5)
    loss.backward()
    assert decoder.conv_out.weight.grad is not None

    state = loss_fn.state_dict()
    assert {"lecam.ema_real", "lecam.ema_fake", "lecam.num_updates"} <= set(state)
    assert not any(key.startswith("perceptual.") for key in state)  # LPIPS stays out of checkpoints
    restored = VQGANLoss(config)
    restored.load_state_dict(state)  # strict
    assert all(torch.equal(state[k], v) for k, v in restored.state_dict().items())


def test_vqgan_loss_without_discriminator_and_config_errors():
    loss_fn = VQGANLoss(_tiny_config(adversarial_weight=0.0))
    assert loss_fn.discriminator is None and not loss_fn.uses_discriminator
    decoder = _TinyDecoder()
    pixel_values, reconstruction, quantizer_loss = _step_inputs(decoder)
    loss, logs = loss_fn.generator_loss(pixel_values, reconstruction, quantizer_loss, None, 100)
    assert "gan" not in logs and loss.item() == pytest.approx(logs["rec"] + 0.25, rel=1e-6)
    assert loss_fn.discriminator_loss(pixel_values, reconstruction, 100)[0].item() == 0.0
    with pytest.raises(ValueError, match="disc_loss"):
        VQGANLossConfig(disc_loss="wasserstein")
    with pytest.raises(ValueError, match="perceptual_weight"):
        VQGANLossConfig(perceptual_weight=-1.0)
    with pytest.raises(TypeError, match="disc_layers"):
        VQGANLossConfig(disc_layers="3")
    config = _tiny_config(lecam_weight=0.1)
    assert VQGANLossConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="global_step"):
        loss_fn.discriminator_active(-1)
    with pytest.raises(TypeError, match="quantizer_loss"):
        loss_fn.generator_loss(pixel_values, reconstruction, torch.zeros(3), None, 0)


def test_lpips_refuses_images_its_trunk_cannot_take(random_lpips):
    """Under 16 px the VGG trunk pools the image away: a raw "output size is too small" error came from deep inside."""
    small = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="vgg trunk needs images of at least 16x16 pixels, got \\(8, 8\\)"):
        random_lpips(small, small)
    assert random_lpips(torch.zeros(1, 3, 16, 20), torch.zeros(1, 3, 16, 20)).shape == ()


def test_discriminator_channels_are_checked_against_the_images():
    loss = VQGANLoss(_tiny_config())  # image_channels=3 by default; a grayscale tokenizer needs 1
    gray = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match="1 channel\\(s\\), but the discriminator was built for 3"):
        loss.discriminator_loss(gray, gray, global_step=10)
