"""Shared sampling machinery of the priors: logit filter, categorical sampler, guidance, the `sample` loop,
exact log-likelihoods and input validation (run on both prior types)."""

import math

import pytest
import torch

from prior import (
    PixelCNNConfig,
    PixelCNNPrior,
    TransformerPrior,
    TransformerPriorConfig,
    filter_logits,
    guide_logits,
    sample_from_logits,
)

PRIORS = {
    "pixelcnn": lambda **kw: PixelCNNPrior(PixelCNNConfig.from_preset("tiny", **kw)).eval(),
    "transformer": lambda **kw: TransformerPrior(TransformerPriorConfig.from_preset("tiny", **kw)).eval(),
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(params=sorted(PRIORS))
def make_prior(request):
    return PRIORS[request.param]


# ------------------------------------------------------------------------------------------------ filter_logits
def test_filter_temperature_divides_and_returns_float32():
    logits = torch.tensor([[2.0, 1.0, -1.0]], dtype=torch.bfloat16)
    filtered = filter_logits(logits, temperature=0.5)
    assert filtered.dtype == torch.float32
    # The same distribution as logits / 0.5, shifted so that the row's maximum is 0.
    torch.testing.assert_close(filtered, (logits.float() - 2.0) / 0.5)
    torch.testing.assert_close(filtered.softmax(-1), (logits.float() / 0.5).softmax(-1))


def test_tiny_temperature_tends_to_argmax_instead_of_overflowing():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -7.0, -6.0]])
    filtered = filter_logits(logits, temperature=1e-40)  # logits / 1e-40 alone would overflow to +-inf
    assert not torch.isnan(filtered).any()
    tokens = sample_from_logits(filtered, torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1, 0]


def test_filter_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    filtered = filter_logits(logits, top_k=2)
    kept = torch.isfinite(filtered)
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    torch.testing.assert_close(filtered[kept], logits[kept])
    assert torch.isfinite(filter_logits(logits, top_k=99)).all()  # k > K keeps everything


def test_filter_top_p_keeps_smallest_nucleus_and_always_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_filter_order_is_temperature_then_top_k_then_top_p():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    # Alone, top_p=0.5 needs two tokens (0.4 < 0.5); after top_k=2 renormalises to (0.57, 0.43), one suffices.
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_k=2, top_p=0.5)).sum() == 1
    # A low temperature sharpens the distribution before top-p: the best token alone then exceeds 0.5.
    assert torch.isfinite(filter_logits(logits, temperature=0.2, top_p=0.5)).sum() == 1
    assert torch.isfinite(filter_logits(logits, temperature=5.0, top_p=0.5)).sum() == 2


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": math.nan}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"top_k": True}, TypeError, "top_k"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
    ],
)
def test_filter_rejects_bad_arguments(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        filter_logits(torch.zeros(1, 4), **kwargs)


# ------------------------------------------------------------------------------------- sampler and guidance
def test_sample_from_logits_follows_softmax_and_never_picks_removed_tokens():
    logits = torch.tensor([0.7, 0.3, 0.0]).log().expand(20000, 3)  # third token has probability 0
    tokens = sample_from_logits(logits, torch.Generator().manual_seed(0))
    assert tokens.shape == (20000,) and tokens.dtype == torch.long
    assert not (tokens == 2).any()
    assert abs((tokens == 0).float().mean().item() - 0.7) < 0.02
    again = sample_from_logits(logits, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sample_from_logits_rejects_non_finite_rows(bad):
    # searchsorted on a NaN distribution would return K, an index outside the codebook.
    logits = torch.tensor([[1.0, 0.0, 1.0], [1.0, bad, 1.0]])
    with pytest.raises(ValueError, match=r"rows \[1\] contain NaN or \+inf"):
        sample_from_logits(logits)


def test_guide_logits_formula():
    cond, uncond = torch.randn(3, 8), torch.randn(3, 8)
    cond_lp, uncond_lp = cond.log_softmax(-1), uncond.log_softmax(-1)
    torch.testing.assert_close(guide_logits(cond, uncond, 1.0), cond_lp)
    torch.testing.assert_close(guide_logits(cond, uncond, 0.0), uncond_lp)
    torch.testing.assert_close(guide_logits(cond, uncond, 3.0), uncond_lp + 3.0 * (cond_lp - uncond_lp))


# ------------------------------------------------------------------------------------------- Prior.sample
def reference_sample(prior, labels, guidance_scale, top_k, generator):
    """Slow reference: full forward passes per position, separate conditional and null-class batches."""
    batch_size = len(labels)
    grid = torch.zeros(batch_size, *prior.config.grid_shape, dtype=torch.long)
    null = [prior.config.null_class_id] * batch_size
    for position in range(prior.config.num_tokens):
        row, col = divmod(position, prior.config.grid_shape[1])
        with torch.no_grad():
            cond = prior._logits(grid, torch.tensor(labels))[:, row, col]
            if guidance_scale != 1.0:
                uncond = prior._logits(grid, torch.tensor(null))[:, row, col]
                cond = uncond.log_softmax(-1) + guidance_scale * (cond.log_softmax(-1) - uncond.log_softmax(-1))
        grid[:, row, col] = sample_from_logits(filter_logits(cond, top_k=top_k), generator)
    return grid


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
def test_sample_matches_reference_with_and_without_guidance(make_prior, guidance_scale):
    prior = make_prior(num_classes=3)
    labels = [0, 2, 1]
    sampled = prior.sample(3, labels=labels, top_k=8, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(7))
    expected = reference_sample(prior, labels, guidance_scale, 8, torch.Generator().manual_seed(7))
    assert torch.equal(sampled, expected)


def test_guidance_changes_samples(make_prior):
    prior = make_prior(num_classes=3)
    plain = prior.sample(4, labels=[0, 1, 2, 0], generator=torch.Generator().manual_seed(1))
    guided = prior.sample(4, labels=[0, 1, 2, 0], guidance_scale=4.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(plain, guided)


def test_sample_deterministic_under_seeded_generator(make_prior):
    prior = make_prior()
    first = prior.sample(3, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(3))
    second = prior.sample(3, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(3))
    other = prior.sample(3, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(4))
    assert first.shape == (3, 4, 4) and first.dtype == torch.long
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() < 16


def test_top_k_one_is_greedy(make_prior):
    prior = make_prior()
    grid = prior.sample(2, top_k=1, generator=torch.Generator().manual_seed(0))
    logits = prior(grid).logits  # teacher forcing reproduces the logits seen while sampling
    assert torch.equal(logits.argmax(-1), grid)


# ------------------------------------------------------------------------------------ likelihood and loss
def test_cached_and_naive_sampling_agree(make_prior):
    prior = make_prior(num_classes=3, grid_shape=(3, 5))
    kwargs = dict(labels=[0, 1, 2], top_k=10, top_p=0.9, guidance_scale=1.5)
    cached = prior.sample(3, generator=torch.Generator().manual_seed(5), **kwargs)
    naive = prior.sample(3, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs)
    assert cached.shape == (3, 3, 5)
    assert torch.equal(cached, naive)


def test_overfits_a_few_grids(make_prior):
    torch.manual_seed(0)
    prior = make_prior(num_classes=2, label_dropout=0.0).train()
    grids = torch.randint(0, 16, (4, 4, 4))
    labels = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-2)
    for _ in range(60):
        optimizer.zero_grad()
        prior(grids, labels).loss.backward()
        optimizer.step()
    prior.eval()
    assert prior.bits_per_token(grids, labels).item() < 0.25 * math.log2(16)


def test_log_prob_is_sum_of_forward_token_log_probs(make_prior):
    prior = make_prior(num_classes=2)
    indices, labels = torch.randint(0, 16, (3, 4, 4)), torch.tensor([0, 1, 1])
    output = prior(indices, labels)
    token_log_probs = output.logits.log_softmax(-1).gather(-1, indices[..., None]).squeeze(-1)
    log_prob = prior.log_prob(indices, labels)
    assert log_prob.shape == (3,) and log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, token_log_probs.sum(dim=(1, 2)))
    torch.testing.assert_close(output.loss, -token_log_probs.mean())
    torch.testing.assert_close(prior.bits_per_token(indices, labels), output.loss / math.log(2))


def test_log_prob_is_exact_in_training_mode_too():
    """Dropout would make an 'exact' likelihood random: log_prob runs the network in eval mode, then restores."""
    prior = PRIORS["transformer"](num_classes=2, dropout=0.5).train()
    indices, labels = torch.randint(0, 16, (3, 4, 4)), torch.tensor([0, 1, 1])
    first = prior.log_prob(indices, labels)
    assert first.requires_grad and prior.training
    torch.testing.assert_close(prior.log_prob(indices, labels), first)
    torch.testing.assert_close(prior.eval().log_prob(indices, labels), first)


def test_label_dropout_only_in_training(make_prior):
    prior = make_prior(num_classes=2, label_dropout=1.0)
    indices, labels = torch.randint(0, 16, (2, 4, 4)), [1, 0]
    null_logits = prior(indices).logits  # a conditional prior without labels uses the null class
    conditioned = prior(indices, labels).logits
    assert not torch.allclose(conditioned, null_logits)
    prior.train()
    torch.testing.assert_close(prior(indices, labels).logits, null_logits)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "indices, labels, error, fragment",
    [
        (torch.randint(0, 16, (2, 4, 4)).float(), None, TypeError, "dtype"),
        ([[0]], None, TypeError, "Tensor"),
        (torch.randint(0, 16, (4, 4)), None, ValueError, "rank 2"),
        (torch.randint(0, 16, (2, 4, 5)), None, ValueError, r"grid shape \(4, 4\)"),
        (torch.zeros(0, 4, 4, dtype=torch.long), None, ValueError, "empty"),
        (torch.full((1, 4, 4), 16), None, ValueError, r"\[0, 16\)"),
        (torch.full((1, 4, 4), -1), None, ValueError, r"\[0, 16\)"),
        (torch.zeros(2, 4, 4, dtype=torch.long), [0, 3], ValueError, r"labels must lie in \[0, 3\)"),
        (torch.zeros(2, 4, 4, dtype=torch.long), [0], ValueError, "length"),
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([0.0, 1.0]), TypeError, "labels"),
        (torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), ValueError, "labels"),
        (torch.zeros(2, 4, 4, dtype=torch.long), "ab", TypeError, "labels"),
    ],
)
def test_forward_rejects_bad_inputs(make_prior, indices, labels, error, fragment):
    prior = make_prior(num_classes=3)
    with pytest.raises(error, match=fragment):
        prior(indices, labels)


def test_unsigned_index_and_label_dtypes_are_range_checked(make_prior):
    prior = make_prior(num_classes=3).eval()
    indices = torch.randint(0, 16, (2, 4, 4))
    labels = torch.tensor([0, 2])
    expected = prior.log_prob(indices, labels)
    torch.testing.assert_close(prior.log_prob(indices.to(torch.uint16), labels.to(torch.uint32)), expected)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 16\)"):
        prior(torch.full((1, 4, 4), 16, dtype=torch.uint16))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        prior(indices[:1], torch.tensor([3], dtype=torch.uint8))


def test_labels_for_unconditional_prior_rejected(make_prior):
    prior = make_prior()
    with pytest.raises(ValueError, match="unconditional"):
        prior(torch.zeros(1, 4, 4, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="unconditional"):
        prior.sample(1, labels=[0])


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"batch_size": 2, "temperature": 0.0}, ValueError, "temperature"),
        ({"batch_size": 2, "labels": [0, 1], "guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"batch_size": 2, "guidance_scale": 2.0}, ValueError, "guidance_scale=2.0 needs"),
        ({"batch_size": 2, "labels": [0, 1, 2]}, ValueError, "length"),
    ],
)
def test_sample_rejects_bad_arguments(make_prior, kwargs, error, fragment):
    prior = make_prior(num_classes=3)
    with pytest.raises(error, match=fragment):
        prior.sample(**kwargs)


def test_sampling_runs_without_dropout_and_keeps_the_training_mode():
    prior = TransformerPrior(TransformerPriorConfig.from_preset("tiny", dropout=0.5, num_classes=3)).train()
    samples = [prior.sample(2, labels=[0, 1], use_cache=use_cache, generator=torch.Generator().manual_seed(1))
               for use_cache in (True, False)]
    assert torch.equal(*samples)  # with dropout active the full recompute would diverge from the cached path
    assert prior.training and all(module.training for module in prior.modules())
    eval_sample = prior.eval().sample(2, labels=[0, 1], generator=torch.Generator().manual_seed(1))
    assert torch.equal(eval_sample, samples[0]) and not prior.training


def test_per_row_generators_make_each_grid_independent_of_its_batch(make_prior):
    prior = make_prior(grid_shape=(4, 4), codebook_size=16, num_classes=3)
    seeds = [11, 12, 13]
    batch = prior.sample(3, labels=[0, 1, 2], top_k=6, guidance_scale=2.0,
                         generator=[torch.Generator().manual_seed(s) for s in seeds])
    for row, (seed, label) in enumerate(zip(seeds, [0, 1, 2])):
        alone = prior.sample(1, labels=[label], top_k=6, guidance_scale=2.0,
                             generator=[torch.Generator().manual_seed(seed)])
        assert torch.equal(alone[0], batch[row])
    with pytest.raises(ValueError, match="one per sample: got 2 for 3 samples"):
        prior.sample(3, labels=[0, 1, 2], generator=[torch.Generator(), torch.Generator()])
    logits = torch.randn(4, 10)
    tokens = sample_from_logits(logits, [torch.Generator().manual_seed(i) for i in range(4)])
    assert tokens.shape == (4,) and torch.equal(
        tokens[2:], sample_from_logits(logits[2:], [torch.Generator().manual_seed(i) for i in (2, 3)]))
