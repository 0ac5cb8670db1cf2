"""One-token-at-a-time decoding over a `transformers` GPT2Model's own weights, for the Transformer prior's sampler.

The GPT2Model stays the definition of the network (training, scoring and prefill run its forward). At batch
sizes of a few dozen rows a decoding step is mostly framework overhead: `GPT2Model.forward` builds masks and
position ids, dispatches through the cache object and the attention interface, and each block calls several
modules, about ten Python frames per layer for a handful of small matmuls. `GPT2StepDecoder` runs the same
arithmetic as plain tensor calls on the same parameter tensors (no copies, so it follows in-place weight
updates and `.to(dtype)` casts made before it is built), with the keys and values of every layer in one
preallocated buffer. Tests check its logits against the GPT2Model forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GPT2Model


class GPT2StepDecoder:
    """Cached decoding for `batch_size` sequences of at most `max_length` tokens.

    `step(token_ids)` feeds one token per sequence at the next position and returns the final hidden state
    (N, D) of that position (after `ln_f`), exactly what `GPT2Model(...).last_hidden_state[:, -1]` gives for the
    same prefix. Only the configuration the prior builds is supported (self-attention blocks without cross
    attention); anything else raises.
    """

    def __init__(self, model: GPT2Model, batch_size: int, max_length: int) -> None:
        config = model.config
        if config.add_cross_attention:
            raise ValueError("GPT2StepDecoder supports self-attention blocks only (add_cross_attention=False)")
        if max_length > config.n_positions:
            raise ValueError(f"max_length={max_length} exceeds the model's n_positions={config.n_positions}")
        self.model = model
        self.max_length = max_length
        self.position = 0
        parameter = model.wte.weight
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        # keys/values of layer l: cache[l, 0] / cache[l, 1], each (N, H, T, head_dim)
        self.cache = torch.empty(
            config.n_layer, 2, batch_size, self.num_heads, max_length, self.head_dim,
            dtype=parameter.dtype, device=parameter.device,
        )

    @torch.no_grad()
    def step(self, token_ids: Tensor) -> Tensor:
        """Feed `token_ids` (N,) at the next position; returns the hidden states (N, D) of that position."""
        position = self.position
        if position >= self.max_length:
            raise RuntimeError(f"GPT2StepDecoder is full: all {self.max_length} positions have been fed")
        model = self.model
        batch_size = token_ids.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        hidden = F.embedding(token_ids, model.wte.weight) + model.wpe.weight[position]  # (N, D)
        for layer, block in enumerate(model.h):
            attention, mlp = block.attn, block.mlp
            normed = F.layer_norm(hidden, block.ln_1.normalized_shape, block.ln_1.weight, block.ln_1.bias,
                                  block.ln_1.eps)
            qkv = torch.addmm(attention.c_attn.bias, normed, attention.c_attn.weight)  # (N, 3D), Conv1D layout
            query, key, value = qkv.view(batch_size, 3, heads, head_dim).unbind(1)  # each (N, H, head_dim)
            keys, values = self.cache[layer, 0], self.cache[layer, 1]  # (N, H, T, head_dim)
            keys[:, :, position] = key
            values[:, :, position] = value
            context = F.scaled_dot_product_attention(
                query[:, :, None], keys[:, :, : position + 1], values[:, :, : position + 1],
                scale=attention.scaling,
            )  # (N, H, 1, head_dim)
            hidden = torch.addmm(hidden, context.view(batch_size, heads * head_dim), attention.c_proj.weight)
            hidden += attention.c_proj.bias
            normed = F.layer_norm(hidden, block.ln_2.normalized_shape, block.ln_2.weight, block.ln_2.bias,
                                  block.ln_2.eps)
            inner = mlp.act(torch.addmm(mlp.c_fc.bias, normed, mlp.c_fc.weight))  # (N, intermediate)
            hidden = torch.addmm(hidden, inner, mlp.c_proj.weight)
            hidden += mlp.c_proj.bias
        self.position = position + 1
        ln_f = model.ln_f
        return F.layer_norm(hidden, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps)
