"""Vector quantizer with a learned codebook (VQ-VAE, van den Oord et al. 2017) and its usual remedies
for codebook collapse: EMA updates, a low-dimensional cosine lookup space, k-means initialization,
dead-code restarts and an entropy penalty, each switched by `QuantizerConfig`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed
from .base import (
    CodebookStats,
    Float32Linear,
    Quantizer,
    QuantizerOutput,
    from_tokens,
    make_output,
    rotation_trick,
    straight_through,
    to_tokens,
    zero_loss,
)
from .config import QuantizerConfig
from .entropy import entropy_penalty
from .kmeans import kmeans
from .search import nearest_codes


class VectorQuantizer(Quantizer):
    """Nearest-code quantizer over a (codebook_size, codebook_dim) codebook.

    Latents (B, D, h, w) are projected to the lookup space (ViT-VQGAN's factorized codes), optionally
    l2-normalized, matched to their nearest code, and projected back. All arithmetic is float32, even
    under autocast. Side effects (EMA, k-means init, restarts, usage) happen only in training mode.
    """

    def __init__(self, config: QuantizerConfig, embed_dim: int) -> None:
        if config.kind != "vq":
            raise ValueError(f"config.kind={config.kind!r}; VectorQuantizer expects kind='vq'")
        super().__init__(embed_dim, config.codebook_size, config.usage_window, config.dead_code_steps)
        self.config = config
        self.codebook_dim = config.codebook_dim or embed_dim
        needs_projection = self.codebook_dim != embed_dim
        self.project_in = Float32Linear(embed_dim, self.codebook_dim) if needs_projection else nn.Identity()
        self.project_out = Float32Linear(self.codebook_dim, embed_dim) if needs_projection else nn.Identity()
        initial = torch.randn(config.codebook_size, self.codebook_dim)  # (K, d)
        if config.normalize_codes:
            initial = F.normalize(initial, dim=1)
        if config.use_ema:
            # EMA state (van den Oord et al. 2017, app. A.1): smoothed cluster sizes N_k and sums m_k.
            self.register_buffer("codebook", initial)
            self.register_buffer("ema_cluster_size", torch.ones(config.codebook_size))
            self.register_buffer("ema_embed_sum", initial.clone())
        else:
            self.codebook = nn.Parameter(initial)
        # False until k-means has run on a training batch; persistent so resuming does not re-run it.
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        self._search_dtype = torch.bfloat16 if config.search_dtype == "bfloat16" else torch.float32

    def codebook_vectors(self) -> Tensor:
        """(K, d) codes as used for lookup: unit-norm when `normalize_codes`."""
        # A differentiable copy: EMA updates and restarts later overwrite the stored codebook in place,
        # and autograd must still see the values this forward pass used.
        codebook = self.codebook.float().clone()  # (K, d)
        return F.normalize(codebook, dim=1) if self.config.normalize_codes else codebook

    def forward(self, z: Tensor) -> QuantizerOutput:
        """(B, D, h, w) latents -> codes with straight-through gradient, indices, losses and stats."""
        self.check_latents(z)
        if self.training and self.config.use_ema and self.codebook.dtype != torch.float32:
            raise RuntimeError(
                f"the codebook is {self.codebook.dtype}: its EMA updates need float32 state, so a tokenizer cast with "
                ".to(dtype) can encode and decode but not train; train in float32 under autocast instead "
                "(--mixed_precision bf16, or torch.autocast)")
        batch, _, height, width = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            latents = self._project_in(to_tokens(z))  # (N, d)
            # A non-finite batch (on any process) leaves the codebook state alone: the trainer skips its step,
            # and NaN written into the EMA statistics or the codebook would never leave them.
            learn = self.training and distributed.all_finite(latents.detach())
            if learn and not bool(self.initialized):
                self._kmeans_init(latents.detach())
            codebook = self.codebook_vectors()  # (K, d)
            indices = self._search(latents, codebook)  # (N,)
            codes = F.embedding(indices, codebook)  # (N, d)
            commit_loss = self.config.commitment_weight * F.mse_loss(latents, codes.detach())
            codebook_loss = self._codebook_loss(latents, codes)
            entropy_loss = self._entropy_loss(latents, codebook)
            estimator = rotation_trick if self.config.gradient_estimator == "rotation" else straight_through
            quantized = self.project_out(estimator(codes, latents))  # (N, D)
            stats = self._track(latents.detach(), indices, learn)
        return make_output(quantized, indices, (batch, height, width), stats, commit_loss=commit_loss,
                           codebook_loss=codebook_loss, entropy_loss=entropy_loss)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 -> (B, D, h, w); equals `quantized` for the same indices in eval mode."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        with torch.autocast(device_type=indices.device.type, enabled=False):
            codes = F.embedding(indices.reshape(-1), self.codebook_vectors())  # (N, d)
            return from_tokens(self.project_out(codes), batch, height, width)

    def _project_in(self, tokens: Tensor) -> Tensor:
        latents = self.project_in(tokens)  # (N, d)
        return F.normalize(latents, dim=1) if self.config.normalize_codes else latents

    def _search(self, latents: Tensor, codebook: Tensor) -> Tensor:
        return nearest_codes(
            latents.detach(),
            codebook.detach(),
            cosine=self.config.normalize_codes,
            chunk_size=self.config.search_chunk_size,
            search_dtype=self._search_dtype,
            candidates=self.config.search_candidates,
        )

    def _codebook_loss(self, latents: Tensor, codes: Tensor) -> Tensor:
        if self.config.use_ema:
            return zero_loss(latents)  # codes move by EMA, not by gradient
        return self.config.codebook_weight * F.mse_loss(latents.detach(), codes)

    def _entropy_loss(self, latents: Tensor, codebook: Tensor) -> Tensor:
        """MaskGIT/MAGVIT-v2 entropy penalty: confident per-token choices, uniform use of the codebook.

        Estimated on n = min(N, entropy_max_tokens) tokens, in chunks (see entropy.py): memory stays at a few
        blocks of soft assignments whatever n and K.
        """
        if self.config.entropy_weight == 0.0:
            return zero_loss(latents)
        if latents.shape[0] > self.config.entropy_max_tokens:
            # A random subset bounds the (N, K) cost; both entropies are then estimated from it.
            picks = torch.randperm(latents.shape[0], generator=self._step_generator(salt=1))
            latents = latents[picks[: self.config.entropy_max_tokens].to(latents.device)]
        penalty = entropy_penalty(latents, codebook, temperature=self.config.entropy_temperature,
                                  diversity=self.config.entropy_diversity_weight)
        return self.config.entropy_weight * penalty

    def _track(self, latents: Tensor, indices: Tensor, learn: bool) -> CodebookStats:
        """With `learn`: usage bookkeeping, EMA update and dead-code restarts; otherwise only this batch's stats."""
        counts = self.code_counts(indices)  # (K,)
        if not learn:
            return self.codebook_stats(counts)
        self.update_usage(counts)
        if self.config.use_ema:
            self._ema_update(latents, indices, counts)
        restarted = self._restart_dead_codes(latents) if self.config.dead_code_steps > 0 else None
        return self.codebook_stats(counts, restarted)

    def _step_generator(self, salt: int) -> torch.Generator:
        """CPU generator seeded by (seed, step, salt): a resumed run draws the same random numbers
        without saving generator state, and eval-mode forward stays a pure function."""
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + int(self.usage_step)) * 4 + salt)

    @torch.no_grad()
    def _kmeans_init(self, latents: Tensor) -> None:
        samples = distributed.gather_rows(latents)  # (world * n, d)
        centroids = torch.empty_like(self.codebook)
        if distributed.rank() == 0:
            centroids = kmeans(
                samples,
                self.codebook_size,
                iters=self.config.kmeans_iters,
                seeding=self.config.kmeans_seeding,
                cosine=self.config.normalize_codes,
                generator=torch.Generator().manual_seed(self.config.seed),
                chunk_size=self.config.search_chunk_size,
            ).to(self.codebook.dtype)
        distributed.broadcast_(centroids)
        self.codebook.data.copy_(centroids)
        if self.config.use_ema:
            self.ema_cluster_size.fill_(1.0)
            self.ema_embed_sum.copy_(centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, latents: Tensor, indices: Tensor, counts: Tensor) -> None:
        """N_k <- g N_k + (1-g) n_k; m_k <- g m_k + (1-g) sum z; e_k = m_k / smoothed N_k."""
        decay = self.config.ema_decay
        embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, latents)  # (K, d)
        distributed.all_reduce_sum_(embed_sum)  # counts were already summed by code_counts
        self.ema_cluster_size.lerp_(counts, 1.0 - decay)
        self.ema_embed_sum.lerp_(embed_sum, 1.0 - decay)
        # Laplace smoothing keeps never-assigned codes finite (Sonnet's VectorQuantizerEMA).
        total = self.ema_cluster_size.sum()
        eps = self.config.ema_epsilon
        smoothed = (self.ema_cluster_size + eps) / (total + self.codebook_size * eps) * total
        codebook = self.ema_embed_sum / smoothed.unsqueeze(1)  # (K, d)
        if self.config.normalize_codes:
            codebook = F.normalize(codebook, dim=1)
        self.codebook.copy_(codebook)

    @torch.no_grad()
    def _restart_dead_codes(self, latents: Tensor) -> int:
        """Re-seed dead codes from latents of this batch (random or worst-fitted), chosen on rank 0 and broadcast."""
        dead = self.find_dead_codes().nonzero().squeeze(1)  # (n_dead,)
        if dead.numel() == 0:
            return 0
        if self.config.dead_code_restart == "worst":
            picks = self._worst_fitted(latents, dead.numel())
        else:
            picks = torch.randint(latents.shape[0], (dead.numel(),), generator=self._step_generator(salt=0))
        samples = latents[picks.to(latents.device)].to(self.codebook.dtype)  # (n_dead, d)
        distributed.broadcast_(samples)
        self.codebook.data[dead] = samples
        if self.config.use_ema:
            # Fresh statistics: the code counts as one assignment at the sampled latent.
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = samples
        self.last_active[dead] = self.usage_step
        return int(dead.numel())

    def _worst_fitted(self, latents: Tensor, count: int) -> Tensor:
        """(count,) rows of `latents` (N, d), farthest from their nearest code first; cycles when count > N."""
        codebook = self.codebook_vectors()  # (K, d), after this step's EMA update
        nearest = F.embedding(self._search(latents, codebook), codebook)  # (N, d)
        order = (latents - nearest).pow(2).sum(1).argsort(descending=True, stable=True)  # (N,)
        return order[torch.arange(count, device=order.device) % order.numel()]
