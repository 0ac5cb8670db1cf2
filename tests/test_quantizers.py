"""Tests of tokenizer.quantizers: gradients, loss terms, codebook maintenance, search, FSQ/LFQ, configs."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizers import (
    FiniteScalarQuantizer,
    LookupFreeQuantizer,
    QuantizerConfig,
    VectorQuantizer,
    build_quantizer,
    search,
)
from tokenizer.quantizers.base import rotation_trick
from tokenizer.quantizers.entropy import entropy_penalty
from tokenizer.quantizers.search import nearest_codes

PLAIN = dict(codebook_dim=None, use_ema=False, normalize_codes=False, kmeans_init=False, dead_code_steps=0,
             entropy_weight=0.0)


def plain_vq(embed_dim: int = 8, codebook_size: int = 16, **overrides) -> VectorQuantizer:
    return build_quantizer(QuantizerConfig(codebook_size=codebook_size, **{**PLAIN, **overrides}), embed_dim)


def clustered_latents(num_clusters: int, per_cluster: int, dim: int, spread: float = 0.05):
    """(B=1, D, h=num_clusters, w=per_cluster) latents around well-separated centers, and the centers."""
    centers = torch.eye(num_clusters, dim) * 10.0  # (C, D), pairwise distance ~14
    points = centers.unsqueeze(1) + spread * torch.randn(num_clusters, per_cluster, dim)  # (C, P, D)
    return points.permute(2, 0, 1).unsqueeze(0).contiguous(), centers


# ------------------------------------------------------------------------------ straight-through, losses
@pytest.mark.parametrize("kind", ["vq", "fsq", "lfq"])
def test_straight_through_gradient_is_identity(kind):
    config = {"vq": QuantizerConfig(codebook_size=16, **PLAIN), "fsq": QuantizerConfig(kind="fsq", fsq_levels=(5, 4, 3),
              codebook_size=60), "lfq": QuantizerConfig(kind="lfq", codebook_size=8)}[kind]
    quantizer = build_quantizer(config, embed_dim=3 if kind != "vq" else 8)
    z = torch.randn(2, quantizer.embed_dim, 3, 3, requires_grad=True)
    upstream = torch.randn_like(z)
    (quantizer(z).quantized * upstream).sum().backward()
    if kind == "fsq":  # FSQ's identity is through the bounding tanh: compare with its own derivative
        channels_last = upstream.permute(0, 2, 3, 1) / quantizer.half_width  # (B, h, w, C)
        bounded_grad = torch.autograd.functional.vjp(lambda x: quantizer.bound(x.permute(0, 2, 3, 1)),
                                                     z.detach(), channels_last)[1]
        torch.testing.assert_close(z.grad, bounded_grad)
    else:
        torch.testing.assert_close(z.grad, upstream)


def test_loss_terms_match_formula_and_route_gradients():
    quantizer = plain_vq(commitment_weight=0.3, codebook_weight=0.7)
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = quantizer(z)
    codes = quantizer.codebook[out.indices]  # (B, h, w, D)
    z_tokens = z.permute(0, 2, 3, 1)
    torch.testing.assert_close(out.commit_loss, 0.3 * (z_tokens - codes).pow(2).mean())
    torch.testing.assert_close(out.codebook_loss, 0.7 * (z_tokens - codes).pow(2).mean())
    torch.testing.assert_close(out.loss, out.commit_loss + out.codebook_loss + out.entropy_loss)
    # beta belongs to the commitment term: it moves only the encoder output ...
    commit_grads = torch.autograd.grad(out.commit_loss, [z, quantizer.codebook], retain_graph=True, allow_unused=True)
    assert commit_grads[1] is None or commit_grads[1].abs().max() == 0
    torch.testing.assert_close(commit_grads[0], 0.3 * 2 * (z - codes.permute(0, 3, 1, 2)).detach() / z.numel())
    # ... and the codebook term moves only the codebook.
    codebook_grads = torch.autograd.grad(out.codebook_loss, [z, quantizer.codebook], allow_unused=True)
    assert codebook_grads[0] is None or codebook_grads[0].abs().max() == 0
    assert codebook_grads[1].abs().max() > 0


def test_ema_codebook_has_no_codebook_loss_and_moves_toward_assigned_vectors():
    torch.manual_seed(1)
    quantizer = build_quantizer(QuantizerConfig(codebook_size=4, **{**PLAIN, "use_ema": True}, ema_decay=0.5), 2)
    z, centers = clustered_latents(4, 16, 2)
    before = quantizer.codebook.clone()
    out = quantizer(z)
    assert out.codebook_loss == 0
    assigned = out.indices.unique()
    for code in assigned:
        target = z.permute(0, 2, 3, 1)[out.indices == code].mean(0)
        assert (quantizer.codebook[code] - target).norm() < (before[code] - target).norm()
    unassigned = torch.ones(4, dtype=torch.bool)
    unassigned[assigned] = False
    assert torch.all(quantizer.codebook[unassigned].norm(dim=1) < before[unassigned].norm(dim=1) + 1e-6)


@pytest.mark.parametrize("kmeans_init", [False, True])
def test_a_non_finite_batch_leaves_the_codebook_state_alone(kmeans_init):
    """The trainer skips a non-finite step, but the EMA update and restarts run inside forward: NaN written into the
    codebook there would never leave it."""
    config = QuantizerConfig(codebook_size=8, codebook_dim=4, use_ema=True, dead_code_steps=1, kmeans_init=kmeans_init)
    quantizer = build_quantizer(config, 6)
    z, _ = clustered_latents(6, 20, 6)
    if not kmeans_init:
        quantizer(z)  # one clean step first
    state = {k: v.clone() for k, v in quantizer.state_dict().items()}
    bad = z.clone()
    bad[0, 0, 0, 0] = float("inf")
    quantizer(bad)
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    out = quantizer(z)  # training goes on from the state before the bad batch
    assert all(torch.isfinite(v).all() for v in quantizer.state_dict().values() if v.is_floating_point())
    assert torch.isfinite(out.quantized).all() and bool(quantizer.initialized)


def test_kmeans_init_puts_a_code_on_every_cluster():
    quantizer = build_quantizer(QuantizerConfig(codebook_size=8, **{**PLAIN, "kmeans_init": True}), 6)
    z, centers = clustered_latents(6, 20, 6)
    assert not quantizer.initialized
    quantizer(z)
    assert quantizer.initialized
    nearest = torch.cdist(centers, quantizer.codebook).min(dim=1).values  # (C,)
    assert nearest.max() < 0.5, nearest


def test_dead_code_restarts_recover_a_collapsed_codebook():
    config = QuantizerConfig(codebook_size=16, codebook_dim=None, normalize_codes=False, kmeans_init=False,
                             use_ema=True, dead_code_steps=2, usage_window=4)
    quantizer = build_quantizer(config, 4)
    z, _ = clustered_latents(4, 64, 4, spread=1.0)
    with torch.no_grad():  # collapse: every code at one far-away point, so only code 0 is ever chosen
        quantizer.codebook.fill_(50.0)
        quantizer.ema_embed_sum.fill_(50.0)
    first = quantizer(z)
    assert first.indices.unique().tolist() == [0] and first.stats.usage <= 1 / 16
    restarted = 0
    for _ in range(8):
        out = quantizer(z)
        restarted += int(out.stats.dead_codes)
    assert restarted >= 15
    assert out.stats.usage >= 0.75, out.stats
    assert out.stats.perplexity > 8


def _restart_once(source: str, tokens: torch.Tensor, codebook: torch.Tensor) -> VectorQuantizer:
    """One training step of a plain VQ whose codes 1.. are never chosen, so all of them restart."""
    quantizer = plain_vq(tokens.shape[1], codebook.shape[0], dead_code_steps=1, dead_code_restart=source)
    with torch.no_grad():
        quantizer.codebook.copy_(codebook)
    quantizer(tokens.T.reshape(1, tokens.shape[1], tokens.shape[0], 1))  # (1, D, N, 1): token i at row i
    return quantizer


def test_worst_restarts_move_dead_codes_to_the_worst_fitted_latents():
    outliers = torch.tensor([[5.0, 0.0], [0.0, 6.0], [-7.0, 0.0]])  # 5, 6 and 7 away from code 0
    tokens = torch.cat([torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) * 0.1, outliers])
    codebook = torch.tensor([[0.0, 0.0], [100.0, 100.0], [100.0, 101.0], [101.0, 100.0]])
    quantizer = _restart_once("worst", tokens, codebook)
    torch.testing.assert_close(quantizer.codebook[1:], outliers.flip(0))  # farthest first
    torch.testing.assert_close(quantizer.codebook[0], codebook[0])


def test_worst_restarts_cycle_when_more_codes_are_dead_than_latents():
    tokens = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    codebook = torch.cat([torch.zeros(1, 2), torch.full((6, 2), 100.0)])
    quantizer = _restart_once("worst", tokens, codebook)
    assert quantizer.codebook[1:, 0].tolist() == [3.0, 1.0, 3.0, 1.0, 3.0, 1.0]


def test_dead_code_restart_source_is_checked():
    with pytest.raises(ValueError, match="dead_code_restart"):
        QuantizerConfig(dead_code_restart="farthest")
    assert QuantizerConfig.from_dict({"codebook_size": 8}).dead_code_restart == "random"  # configs saved before it


def test_usage_statistics_and_eval_purity():
    quantizer = build_quantizer(QuantizerConfig(codebook_size=32, codebook_dim=4, usage_window=3), 8)
    z = torch.randn(4, 8, 4, 4)
    out = quantizer(z)
    used = out.indices.unique().numel()
    torch.testing.assert_close(out.stats.usage, torch.tensor(used / 32))
    assert 1 <= out.stats.perplexity <= used + 1e-3
    state = copy.deepcopy(quantizer.state_dict())
    quantizer.eval()
    first, second = quantizer(z), quantizer(z)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.quantized, second.quantized)
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_state_dict_round_trip_resumes_identically():
    config = QuantizerConfig(codebook_size=32, dead_code_steps=1)
    trained = build_quantizer(config, 8)
    for _ in range(3):
        trained(torch.randn(2, 8, 4, 4))
    fresh = build_quantizer(config, 8)
    fresh.load_state_dict(trained.state_dict(), strict=True)
    assert {"initialized", "ema_cluster_size", "ema_embed_sum", "last_used", "usage_step"} <= set(fresh.state_dict())
    z = torch.randn(2, 8, 4, 4)
    a, b = trained(z), fresh(z)  # training steps with restarts: same randomness, same result
    assert torch.equal(a.indices, b.indices) and torch.equal(trained.codebook, fresh.codebook)


@pytest.mark.parametrize("config", [
    QuantizerConfig(codebook_size=64),
    QuantizerConfig(codebook_size=64, **PLAIN),
    QuantizerConfig(kind="fsq", codebook_size=1024),
    QuantizerConfig(kind="lfq", codebook_size=64),
], ids=["vq-default", "vq-plain", "fsq", "lfq"])
def test_indices_to_codes_equals_quantized_in_eval(config):
    quantizer = build_quantizer(config, 12)
    quantizer(torch.randn(2, 12, 4, 4))  # one training step (k-means init, EMA)
    quantizer.eval()
    out = quantizer(torch.randn(3, 12, 5, 2))
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, 5, 2)
    assert torch.equal(quantizer.indices_to_codes(out.indices), out.quantized)


def test_entropy_loss_matches_definition_and_reaches_encoder():
    quantizer = plain_vq(entropy_weight=0.1, entropy_temperature=0.5, entropy_diversity_weight=2.0)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = quantizer(z)
    tokens = z.permute(0, 2, 3, 1).reshape(-1, 8)
    probs = F.softmax(-torch.cdist(tokens, quantizer.codebook).pow(2) / 0.5, dim=1)
    per_token = -(probs * probs.log()).sum(1).mean()
    mean_probs = probs.mean(0)
    expected = 0.1 * (per_token - 2.0 * -(mean_probs * mean_probs.log()).sum())
    torch.testing.assert_close(out.entropy_loss, expected, rtol=1e-4, atol=1e-5)
    out.entropy_loss.backward()
    assert z.grad.abs().max() > 0


def test_entropy_loss_on_a_token_subset_is_bounded_and_pure_in_eval():
    quantizer = plain_vq(entropy_weight=0.1, entropy_max_tokens=8).eval()
    z = torch.randn(2, 8, 4, 4)  # 32 tokens, 8 of them used for the entropies
    first, second = quantizer(z).entropy_loss, quantizer(z).entropy_loss
    assert torch.equal(first, second) and torch.isfinite(first)
    quantizer.config.entropy_max_tokens = 32
    assert not torch.equal(quantizer(z).entropy_loss, first)  # the subset really is a subset
    # An upper bound holds for any subset: per-token entropy <= log K, codebook entropy >= 0.
    assert first <= 0.1 * torch.log(torch.tensor(16.0)) + 1e-6


@pytest.mark.parametrize("overrides", [
    dict(use_ema=True, normalize_codes=False),
    dict(use_ema=False, normalize_codes=False),
    dict(use_ema=False, normalize_codes=True),
], ids=["ema", "gradient", "gradient-cosine"])
def test_backward_after_in_place_codebook_updates(overrides):
    # EMA updates and restarts change the codebook inside forward; backward must still work afterwards.
    config = QuantizerConfig(codebook_size=64, codebook_dim=4, entropy_weight=0.1, dead_code_steps=1,
                             kmeans_init=False, **overrides)
    quantizer = build_quantizer(config, 8)
    for _ in range(3):
        z = torch.randn(2, 8, 2, 2, requires_grad=True)  # 8 tokens for 64 codes: restarts every step
        out = quantizer(z)
        (out.quantized.sum() + out.loss).backward()
        assert out.stats.dead_codes > 0 or quantizer.usage_step == 1
        assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------------------------- search
def test_rotation_trick_keeps_the_codes_and_rotates_the_gradient():
    latents = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    codes = torch.randn(6, 5, dtype=torch.float64)
    upstream = torch.randn(6, 5, dtype=torch.float64)
    out = rotation_trick(codes, latents)
    assert torch.equal(out, codes)
    (out * upstream).sum().backward()
    for z, q, g, grad in zip(latents.detach(), codes, upstream, latents.grad, strict=True):
        u, e = z / z.norm(), q / q.norm()
        w = (u + e) / (u + e).norm()
        rotation = torch.eye(5, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(e, u)
        torch.testing.assert_close(rotation @ u, e)  # R maps the latent's direction onto the code's
        torch.testing.assert_close(grad, q.norm() / z.norm() * rotation.t() @ g)
    # a latent already pointing at its code gets the straight-through gradient, scaled by the norm ratio
    z = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    (rotation_trick(3.0 * z.detach(), z) * upstream[:1]).sum().backward()
    torch.testing.assert_close(z.grad, 3.0 * upstream[:1])


def test_vector_quantizer_gradient_estimator_option():
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 8, 3, 3)
    grads = {}
    for estimator in ("straight_through", "rotation"):
        torch.manual_seed(0)
        quantizer = plain_vq(gradient_estimator=estimator)
        out = quantizer(z)
        (out.quantized * upstream).sum().backward()
        grads[estimator], z.grad = z.grad, None
    assert not torch.allclose(grads["straight_through"], grads["rotation"])
    with pytest.raises(ValueError, match="gradient_estimator"):
        QuantizerConfig(gradient_estimator="identity")


@pytest.mark.parametrize("cosine", [False, True])
def test_chunked_search_equals_unchunked_and_brute_force(cosine):
    latents, codebook = torch.randn(300, 16), torch.randn(1000, 16)
    if cosine:
        latents, codebook = F.normalize(latents, dim=1), F.normalize(codebook, dim=1)
    full = nearest_codes(latents, codebook, cosine=cosine, chunk_size=1000)
    for chunk_size in (13, 128, 999):
        assert torch.equal(nearest_codes(latents, codebook, cosine=cosine, chunk_size=chunk_size), full)
    assert torch.equal(full, torch.cdist(latents.double(), codebook.double()).argmin(dim=1))
    shortlisted = nearest_codes(latents, codebook, cosine=cosine, chunk_size=128, search_dtype=torch.bfloat16)
    assert torch.equal(shortlisted, full)
    # chunks smaller than the shortlist (8 candidates): the merged shortlist grows chunk by chunk
    tiny_chunks = nearest_codes(latents, codebook, cosine=cosine, chunk_size=3, search_dtype=torch.bfloat16)
    assert torch.equal(tiny_chunks, full)


@pytest.mark.parametrize("offset", [10.0, 100.0])
def test_bf16_euclidean_search_far_from_the_origin_still_finds_the_nearest_code(offset):
    """2 z.e - ||e||^2 is large far from the origin, and bf16 (even float32) kept no precision for the differences between codes:
    the bf16 shortlist missed the nearest code for 45% of the latents at offset 10, float32 for 0.7% at 100."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2048, 8, generator=generator) + offset
    codebook = torch.randn(1024, 8, generator=generator) + offset
    expected = torch.cdist(latents.double(), codebook.double()).argmin(dim=1)
    for search_dtype in (torch.float32, torch.bfloat16):
        found = nearest_codes(latents, codebook, chunk_size=256, search_dtype=search_dtype)
        assert (found != expected).sum() == 0, search_dtype


@pytest.mark.parametrize("search_dtype", [torch.float32, torch.bfloat16])
def test_search_tiled_over_latents_equals_one_block(monkeypatch, search_dtype):
    latents, codebook = torch.randn(300, 16), torch.randn(1000, 16)
    expected = torch.cdist(latents.double(), codebook.double()).argmin(dim=1)
    monkeypatch.setattr(search, "BLOCK_ELEMENTS", 7 * 128)  # tiles of 7 latents against chunks of 128 codes
    assert torch.equal(nearest_codes(latents, codebook, chunk_size=128, search_dtype=search_dtype), expected)


@pytest.mark.parametrize("temperature", [0.5, 0.01])
def test_chunked_entropy_penalty_matches_autograd_of_the_formula(temperature):
    latents = F.normalize(torch.randn(70, 8, dtype=torch.float64), dim=1).float().requires_grad_()
    codebook = F.normalize(torch.randn(50, 8), dim=1).requires_grad_()
    logits = -torch.cdist(latents, codebook).pow(2) / temperature  # softmax(-||z - e||^2 / T)
    log_probs = F.log_softmax(logits, dim=1)
    probs = log_probs.exp()
    mean_probs = probs.mean(0)
    expected = -(probs * log_probs).sum(1).mean() - 1.5 * -(mean_probs * mean_probs.log()).sum()
    expected_grads = torch.autograd.grad(expected, (latents, codebook))
    value = entropy_penalty(latents, codebook, temperature=temperature, diversity=1.5, chunk_size=16)
    grads = torch.autograd.grad(value, (latents, codebook))
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        scale = expected_grad.abs().max()
        torch.testing.assert_close(grad / scale, expected_grad / scale, rtol=0, atol=1e-3)


def test_search_breaks_ties_toward_the_lowest_index_across_chunks():
    codebook = torch.randn(10, 4).repeat(3, 1)  # codes k, k+10, k+20 identical
    latents = codebook[:10] + 0.01 * torch.randn(10, 4)
    for chunk_size in (3, 10, 30):
        assert torch.equal(nearest_codes(latents, codebook, chunk_size=chunk_size), torch.arange(10))


def test_training_a_bf16_cast_codebook_is_refused_clearly():
    quantizer = build_quantizer(QuantizerConfig(codebook_size=16, codebook_dim=4), 8).to(torch.bfloat16)
    z = torch.randn(2, 8, 4, 4)
    assert quantizer.eval()(z).indices.shape == (2, 4, 4)  # encoding works
    with pytest.raises(RuntimeError, match="EMA updates need float32 state"):
        quantizer.train()(z)
    learned = build_quantizer(QuantizerConfig(codebook_size=16, codebook_dim=4, use_ema=False), 8).to(torch.bfloat16)
    assert learned.train()(z).indices.shape == (2, 4, 4)  # a codebook learned by gradient has no EMA state


def test_quantizer_runs_in_float32_under_bf16_autocast():
    quantizer = build_quantizer(QuantizerConfig(codebook_size=64, search_chunk_size=16), 8)
    quantizer.eval()
    z = torch.randn(2, 8, 4, 4).bfloat16().float()  # values representable in bf16
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z.bfloat16())
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, reference.indices)
    assert torch.equal(out.quantized, reference.quantized)


# ------------------------------------------------------------------------------------------- FSQ, LFQ
def test_fsq_indices_are_a_bijection_with_the_grid():
    quantizer = FiniteScalarQuantizer(QuantizerConfig(kind="fsq", codebook_size=60, fsq_levels=(5, 4, 3)), 3)
    assert quantizer.codebook_size == 60 and not any("codebook" in name for name in quantizer.state_dict())
    grid = quantizer.implicit_codebook()  # (60, 3)
    assert grid.unique(dim=0).shape[0] == 60 and grid.abs().max() <= 1
    all_indices = torch.arange(60).reshape(1, 6, 10)
    torch.testing.assert_close(quantizer.indices_to_codes(all_indices).permute(0, 2, 3, 1).reshape(60, 3), grid)
    out = quantizer(torch.randn(4, 3, 8, 8) * 3)
    assert torch.equal(out.quantized.permute(0, 2, 3, 1), grid[out.indices])
    assert out.indices.unique().numel() > 40  # the bounded range reaches (almost) every level


def test_fsq_codebook_size_from_recommended_levels():
    quantizer = build_quantizer(QuantizerConfig(kind="fsq", codebook_size=1024), 16)
    assert quantizer.levels == (8, 5, 5, 5) and quantizer.codebook_size == 1000
    from tokenizer import VQTokenizerConfig

    config = VQTokenizerConfig.from_preset("tiny", quantizer={"kind": "fsq", "codebook_size": 1024})
    assert config.codebook_size == 1000  # what the tokenizer emits, not the requested size


@pytest.mark.parametrize("levels", [(1001,), (1024, 8), (2000, 3)])
def test_fsq_indices_stay_in_range_with_many_levels(levels):
    """Rounding the bounded latents reaches one value past each end once L > 1000 unless it is clamped."""
    config = QuantizerConfig(kind="fsq", codebook_size=math.prod(levels), fsq_levels=levels)
    quantizer = FiniteScalarQuantizer(config, len(levels)).eval()
    out = quantizer(torch.randn(8, len(levels), 8, 8) * 50)  # saturate the bound at both ends
    assert int(out.indices.min()) == 0 and int(out.indices.max()) == config.codebook_size - 1
    torch.testing.assert_close(quantizer.indices_to_codes(out.indices), out.quantized)  # no digit carried over


@pytest.mark.parametrize("levels", [(514,), (2000, 3)])
def test_fsq_on_a_bf16_cast_tokenizer_gives_the_float32_indices(levels):
    """Its level constants were float buffers, rounded by .to(bf16) (514 // 2 -> 256): wrong or out-of-range ids."""
    config = QuantizerConfig(kind="fsq", codebook_size=math.prod(levels), fsq_levels=levels)
    quantizer = FiniteScalarQuantizer(config, len(levels)).eval()
    latents = torch.randn(4, len(levels), 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    expected = quantizer(latents).indices
    assert torch.equal(quantizer.to(torch.bfloat16)(latents).indices, expected)


def test_fsq_nan_latents_give_a_nan_loss_not_a_crash():
    """A NaN step must reach the trainer's non-finite guard (which skips it): bincount raised on the NaN index."""
    config = QuantizerConfig(kind="fsq", codebook_size=64, fsq_levels=(4, 4, 4))
    quantizer = FiniteScalarQuantizer(config, 6).train()
    latents = torch.randn(2, 6, 4, 4)
    quantizer(latents)
    step = int(quantizer.usage_step)
    latents[0, 0, 0, 0] = float("nan")
    out = quantizer(latents)
    assert not torch.isfinite(out.quantized).all() and 0 <= int(out.indices.min()) <= int(out.indices.max()) < 64
    assert int(quantizer.usage_step) == step  # the bad batch is not counted as a step of codebook usage


def test_lfq_round_trip_and_entropy_loss():
    quantizer = LookupFreeQuantizer(QuantizerConfig(kind="lfq", codebook_size=32, entropy_weight=0.1), 5)
    indices = torch.arange(32).reshape(2, 4, 4)
    codes = quantizer.indices_to_codes(indices)  # (2, 5, 4, 4) of +-1
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(quantizer(codes).indices, indices)
    z = torch.randn(2, 5, 4, 4, requires_grad=True)
    out = quantizer(z)
    assert out.entropy_loss != 0 and out.codebook_loss == 0
    torch.testing.assert_close(out.commit_loss, 0.25 * (z - z.sign()).pow(2).mean())
    out.loss.backward()
    assert z.grad.abs().max() > 0


# --------------------------------------------------------------------------------------------- configs
def test_config_json_round_trip():
    for config in (QuantizerConfig(), QuantizerConfig(kind="fsq", codebook_size=60, fsq_levels=(5, 4, 3)),
                   QuantizerConfig(kind="lfq", codebook_size=256, entropy_weight=0.1)):
        assert QuantizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("data, error, message", [
    ({"codebook_sise": 8}, ValueError, "codebook_sise"),
    ({"codebook_size": "8"}, TypeError, "codebook_size"),
    ({"use_ema": 1}, TypeError, "use_ema"),
    ({"codebook_size": True}, TypeError, "codebook_size"),
    ({"kind": "rq"}, ValueError, "kind"),
    ({"codebook_size": 0}, ValueError, "codebook_size"),
    ({"ema_decay": 1.0}, ValueError, "ema_decay"),
    ({"kind": "lfq", "codebook_size": 1000}, ValueError, "power of 2"),
    ({"kind": "fsq", "codebook_size": 64, "fsq_levels": [5, 4, 3]}, ValueError, "prod"),
    ({"kind": "fsq", "codebook_size": 100}, ValueError, "fsq_levels"),
    ({"search_dtype": "float16"}, ValueError, "search_dtype"),
    ({"commitment_weight": float("nan")}, ValueError, "commitment_weight=nan must be a finite number"),
    ({"ema_epsilon": float("nan")}, ValueError, "ema_epsilon"),
    ({"entropy_temperature": float("inf")}, ValueError, "entropy_temperature"),
    ({"seed": 2**40}, ValueError, "seed"),
])
def test_bad_configs_raise_clear_errors(data, error, message):
    with pytest.raises(error, match=message):
        QuantizerConfig.from_dict(data)


def test_bad_inputs_raise_clear_errors():
    quantizer = plain_vq()
    with pytest.raises(ValueError, match=r"z must be .*\(B, 8, h, w\)"):
        quantizer(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
        quantizer.indices_to_codes(torch.full((1, 2, 2), 16))
    with pytest.raises(ValueError, match="int64"):
        quantizer.indices_to_codes(torch.zeros(1, 2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="QuantizerConfig"):
        build_quantizer({"kind": "vq"}, 8)


def test_lfq_nan_latents_leave_the_usage_statistics_alone():
    """VQ and FSQ skipped a NaN batch (the step the trainer skips); LFQ counted it and marked code 0 as used."""
    quantizer = LookupFreeQuantizer(QuantizerConfig(kind="lfq", codebook_size=32), 5).train()
    latents = torch.randn(2, 5, 4, 4)
    quantizer(latents)
    before = {name: tensor.clone() for name, tensor in quantizer.state_dict().items()}
    latents[0, 0, 0, 0] = float("nan")
    quantizer(latents)
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(tensor, before[name]), name
