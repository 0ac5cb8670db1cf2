"""GPT-style Transformer prior: token layout, causality, KV-cached sampling parity, pkeep, overfitting."""


import pytest
import torch
from transformers import GPT2Model

from prior import TransformerPrior, TransformerPriorConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(**overrides) -> TransformerPrior:
    return TransformerPrior(TransformerPriorConfig.from_preset("tiny", **overrides)).eval()


def test_token_layout_and_head_cover_only_codes():
    prior = tiny(num_classes=3)
    config = prior.config
    assert isinstance(prior.backbone, GPT2Model)
    assert config.vocab_size == 16 + 3 + 1 + 1 == prior.backbone.config.vocab_size
    assert config.start_token_id == 20 and config.null_class_id == 3
    assert prior.head.out_features == 16
    assert prior.backbone.config.n_positions == 16  # [first token] + 15 codes


def test_special_tokens_never_sampled():
    prior = tiny(num_classes=3)
    grids = prior.sample(8, labels=[0, 1, 2, 0, 1, 2, 0, 1], temperature=3.0, guidance_scale=2.0,
                         generator=torch.Generator().manual_seed(0))
    assert grids.min() >= 0 and grids.max() < 16


@pytest.mark.parametrize("num_classes", [0, 3])
def test_causality(num_classes):
    prior = tiny(num_classes=num_classes)
    labels = [2, 0] if num_classes else None
    indices = torch.randint(0, 16, (2, 4, 4))
    logits = prior(indices, labels).logits.flatten(1, 2)  # (B, 16, K)
    for position in range(16):
        changed = indices.clone().flatten(1)
        changed[:, position] = (changed[:, position] + 7) % 16
        new_logits = prior(changed.view(2, 4, 4), labels).logits.flatten(1, 2)
        torch.testing.assert_close(new_logits[:, : position + 1], logits[:, : position + 1], rtol=1e-6, atol=1e-6)
        if position < 15:
            assert not torch.allclose(new_logits[:, position + 1 :], logits[:, position + 1 :])


def test_label_conditions_every_position():
    prior = tiny(num_classes=3)
    indices = torch.randint(0, 16, (1, 4, 4))
    first, second = prior(indices, [0]).logits, prior(indices, [1]).logits
    assert not torch.isclose(first, second).all(dim=-1).any()


@pytest.mark.parametrize("num_classes", [0, 3])
def test_cached_stream_matches_forward_and_naive_stream(num_classes):
    prior = tiny(num_classes=num_classes)
    indices = torch.randint(0, 16, (3, 4, 4))
    class_ids = torch.tensor([0, 3, 2]) if num_classes else None
    expected = prior._logits(indices, class_ids).flatten(1, 2)  # (B, 16, K)
    for use_cache in (True, False):
        stream = prior._logit_stream(class_ids, 3, use_cache)
        streamed = [next(stream)] + [stream.send(indices.flatten(1)[:, t]) for t in range(15)]
        torch.testing.assert_close(torch.stack(streamed, 1), expected, rtol=1e-5, atol=1e-5)


def test_step_decoder_follows_weights_and_refuses_overflow():
    from prior.gpt2_decoding import GPT2StepDecoder

    prior = tiny()
    tokens = torch.randint(0, 16, (2, 16))
    decoder = GPT2StepDecoder(prior.backbone, batch_size=2, max_length=16)
    with torch.no_grad():
        prior.backbone.h[1].mlp.c_fc.weight.mul_(3.0)  # in-place update after construction: still followed
        expected = prior.backbone(input_ids=tokens).last_hidden_state  # (2, 16, D)
    hidden = torch.stack([decoder.step(tokens[:, t]) for t in range(16)], dim=1)
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="full"):
        decoder.step(tokens[:, 0])
    with pytest.raises(ValueError, match="n_positions"):
        GPT2StepDecoder(prior.backbone, batch_size=2, max_length=17)


def test_bf16_cast_prior_samples_with_float32_logits():
    prior = tiny()
    indices = torch.randint(0, 16, (2, 4, 4))
    reference = prior(indices).logits
    prior.to(torch.bfloat16)
    stream = prior._logit_stream(None, 2, use_cache=True)
    streamed = [next(stream)] + [stream.send(indices.flatten(1)[:, t]) for t in range(15)]
    assert streamed[0].dtype == torch.float32  # filters, guidance and sampling run in float32
    torch.testing.assert_close(torch.stack(streamed, 1).view_as(reference), reference, rtol=0.1, atol=0.1)
    grids = prior.sample(2, top_k=4, generator=torch.Generator().manual_seed(0))
    assert grids.shape == (2, 4, 4) and grids.max() < 16


def test_pkeep_corrupts_inputs_only_in_training():
    prior = tiny(pkeep=0.5)
    indices = torch.randint(0, 16, (64, 4, 4))
    assert not torch.equal(prior._corrupt_inputs(indices), indices)
    replaced = (prior._corrupt_inputs(indices) != indices).float().mean().item()
    assert 0.35 < replaced < 0.6  # 1 - pkeep, minus random codes that happen to equal the true one
    eval_output = prior(indices)
    torch.testing.assert_close(prior(indices).logits, eval_output.logits)  # eval: deterministic
    prior.train()
    train_output = prior(indices)
    assert not torch.allclose(train_output.logits, eval_output.logits)
    # Targets stay the true codes: the loss is the NLL of `indices` under the (corrupted-input) logits.
    nll = -train_output.logits.log_softmax(-1).gather(-1, indices[..., None]).mean()
    torch.testing.assert_close(train_output.loss, nll)


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads must divide hidden_size=32"):
        TransformerPriorConfig(hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match=r"pkeep must lie in \(0, 1\]"):
        TransformerPriorConfig(pkeep=0.0)
    with pytest.raises(ValueError, match="preset must be one of"):
        TransformerPriorConfig.from_preset("huge")
