"""GPT-style Transformer prior over the raster-flattened grid, built on `transformers`' GPT-2 (from a config,
never downloaded), sampled with a KV-cached decoding loop over the same weights (prior/gpt2_decoding.py).

Token ids: codes are 0..K-1, class tokens K..K+num_classes (the last one is the null class), then one start
token. A sequence is [class-or-start token] + codes, so the logits at position t predict code t from the first
token and codes < t. The output head is a Linear over the K codes only: special tokens cannot be sampled.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, GPT2Config, GPT2Model

from .base import Prior
from .configuration import TransformerPriorConfig
from .gpt2_decoding import GPT2StepDecoder

ATTENTION_NAME = "vqstack_grid_causal"


def grid_causal_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Causal self-attention of the prior's GPT-2 blocks, registered in `transformers`' AttentionInterface.

    Grids are never padded, so no mask tensor is needed: a full sequence (training, scoring, the no-cache loop)
    uses SDPA's built-in causal mask instead of a materialized (T, T) mask, and one cached query (e.g.
    `generate()` with a DynamicCache, which holds exactly the written entries) attends to every key.
    query/key/value: (B, H, T, D); returns (B, T, H, D).
    """
    if attention_mask is not None:
        raise ValueError(f"{ATTENTION_NAME} takes no attention mask (grids are never padded), got one")
    query_length, key_length = query.shape[2], key.shape[2]
    if query_length > 1 and query_length != key_length:
        raise ValueError(
            f"{ATTENTION_NAME} supports full sequences or one cached query at a time, got {query_length} "
            f"queries against {key_length} keys"
        )
    output = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=query_length > 1
    )
    return output.transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, grid_causal_attention)


class TransformerPrior(Prior):
    """Causal Transformer (GPT-2 blocks from `transformers`) over [class-or-start token] + codes.

    For faster sampling the whole prior can be cast, e.g. `prior.to(torch.bfloat16)`: weights and the KV cache
    then take half the memory traffic (and CPUs with AMX run bf16 matmuls natively), while logit filtering,
    guidance and sampling stay float32.
    """

    prior_type = "transformer"
    config_class = TransformerPriorConfig

    def __init__(self, config: TransformerPriorConfig) -> None:
        super().__init__(config)
        self.backbone = GPT2Model(self.gpt2_config())
        # (D -> K) over the codes only; bias-free like GPT-2's lm_head, so an identical GPT2LMHeadModel exists.
        self.head = nn.Linear(config.hidden_size, config.codebook_size, bias=False)

    def gpt2_config(self) -> GPT2Config:
        """The `transformers` config of the backbone (also used to build an identical `GPT2LMHeadModel`)."""
        config = self.config
        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.num_tokens,  # [first token] + codes[:-1]: h*w inputs predict h*w codes
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            # GPT-2's tanh-approximated GELU as one fused kernel instead of "gelu_new"'s seven elementwise ops.
            activation_function="gelu_pytorch_tanh",
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            bos_token_id=config.start_token_id,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=False,
            attn_implementation=ATTENTION_NAME,
        )

    # ----------------------------------------------------------------------------------------------------------
    def _first_tokens(self, class_ids: Tensor | None, batch_size: int) -> Tensor:
        """(N,) class tokens K + class_id, or the start token when the prior is unconditional."""
        if class_ids is None:
            return torch.full((batch_size,), self.config.start_token_id, dtype=torch.long, device=self._device())
        return class_ids + self.config.codebook_size

    def _corrupt_inputs(self, indices: Tensor) -> Tensor:
        """pkeep: replace each input code by a uniformly random one with prob 1 - pkeep (Esser et al. 2021,
        taming-transformers' Net2NetTransformer); the targets stay the true codes."""
        if self.config.pkeep >= 1.0:
            return indices
        keep = torch.rand(indices.shape, device=indices.device) < self.config.pkeep
        random_codes = torch.randint_like(indices, self.config.codebook_size)
        return torch.where(keep, indices, random_codes)

    def _logits(self, inputs: Tensor, class_ids: Tensor | None) -> Tensor:
        batch_size = inputs.shape[0]
        first = self._first_tokens(class_ids, batch_size)
        input_ids = torch.cat([first[:, None], inputs.flatten(1)[:, :-1]], dim=1)  # (B, h*w)
        hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, h*w, D)
        return self.head(hidden).view(batch_size, *self.config.grid_shape, -1)  # (B, h, w, K)

    # ----------------------------------------------------------------------------------------------------------
    def _logit_stream(
        self, class_ids: Tensor | None, batch_size: int, use_cache: bool
    ) -> Generator[Tensor, Tensor, None]:
        first = self._first_tokens(class_ids, batch_size)
        if use_cache:
            return self._cached_stream(first)
        return self._naive_stream(first)

    def _naive_stream(self, first: Tensor) -> Generator[Tensor, Tensor, None]:
        """Reference: re-run the whole prefix at every step (no KV cache)."""
        input_ids = first[:, None]  # (N, 1)
        for _ in range(self.config.num_tokens):
            hidden = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state[:, -1]  # (N, D)
            token = yield self.head(hidden).float()
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)

    def _cached_stream(self, first: Tensor) -> Generator[Tensor, Tensor, None]:
        """KV-cached decoding: feed the first token, then one token per step.

        The loop runs `GPT2StepDecoder`, the backbone's arithmetic on its own weights with one preallocated
        key/value buffer, instead of `GPT2Model.forward` with a `transformers` cache or `generate()`: at these
        model and batch sizes most of a step's time there goes to per-module overhead (measured in
        scripts/benchmarks/bench_prior_sampling.py). Its logits equal the full forward's (tests).
        """
        decoder = GPT2StepDecoder(self.backbone, batch_size=first.shape[0], max_length=self.config.num_tokens)
        token = first  # (N,)
        for _ in range(self.config.num_tokens):
            token = yield self.head(decoder.step(token)).float()  # (N, K) -> next token (N,)
