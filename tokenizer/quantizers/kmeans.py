"""k-means in float32 for codebook initialization (seeding + Lloyd iterations).

Initializing codes at k-means centroids of the first encoder outputs instead of at random points puts
every code where the data is, so few codes start dead (Zeghidour et al. 2021, SoundStream; Dhariwal et
al. 2020, Jukebox use the same idea).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .search import nearest_codes


@torch.no_grad()
def kmeans(
    samples: Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    seeding: str = "kmeans++",
    cosine: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
) -> Tensor:
    """(N, d) samples -> (num_clusters, d) float32 centroids.

    With cosine=True the samples are expected unit-norm and centroids are renormalized (spherical
    k-means). Clusters that end up empty keep their previous centroid; dead-code restarts move them later.
    """
    samples = samples.detach().float()
    if seeding == "kmeans++":
        centroids = kmeans_plusplus_seeds(samples, num_clusters, generator=generator)
    elif seeding == "random":
        centroids = random_seeds(samples, num_clusters, generator=generator)
    else:
        raise ValueError(f"seeding={seeding!r}; expected 'kmeans++' or 'random'")
    for _ in range(iters):
        assignment = nearest_codes(samples, centroids, cosine=cosine, chunk_size=chunk_size)  # (N,)
        centroids = _cluster_means(samples, assignment, centroids)
        if cosine:
            centroids = F.normalize(centroids, dim=1)
    return centroids


def random_seeds(samples: Tensor, num_clusters: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Distinct random samples as seeds (with replacement only when there are fewer samples than seeds)."""
    count = samples.shape[0]
    if count >= num_clusters:
        picks = torch.randperm(count, generator=generator, device="cpu")[:num_clusters]
    else:
        picks = torch.randint(count, (num_clusters,), generator=generator, device="cpu")
    return samples[picks.to(samples.device)].clone()


def kmeans_plusplus_seeds(samples: Tensor, num_clusters: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each seed drawn with probability ~ D(x)^2.

    O(num_clusters * N * d); once every sample is a seed (N < num_clusters), seeds repeat uniformly.
    """
    count = samples.shape[0]
    sample_sq_norms = samples.pow(2).sum(dim=1)  # (N,)

    def sq_dist_to(index: int) -> Tensor:  # (N,) ||x - x_index||^2 as one matrix-vector product
        return (sample_sq_norms - 2.0 * samples @ samples[index] + sample_sq_norms[index]).clamp_min(0.0)

    seeds = torch.empty(num_clusters, dtype=torch.long)
    seeds[0] = torch.randint(count, (1,), generator=generator)
    nearest_sq_dist = sq_dist_to(int(seeds[0])).double()  # (N,)
    # Pre-drawn uniforms make the loop free of per-step generator calls.
    uniforms = torch.rand(num_clusters, generator=generator, dtype=torch.float64).to(samples.device)
    for k in range(1, num_clusters):
        cumulative = nearest_sq_dist.cumsum(0)
        if cumulative[-1] > 0:
            pick = int(torch.searchsorted(cumulative, uniforms[k] * cumulative[-1]).clamp_max(count - 1))
        else:
            pick = int(uniforms[k] * count)  # every sample is already a seed
        seeds[k] = pick
        torch.minimum(nearest_sq_dist, sq_dist_to(pick).double(), out=nearest_sq_dist)
    return samples[seeds.to(samples.device)].clone()


def _cluster_means(samples: Tensor, assignment: Tensor, previous: Tensor) -> Tensor:
    counts = torch.bincount(assignment, minlength=previous.shape[0]).float()  # (K,)
    sums = torch.zeros_like(previous).index_add_(0, assignment, samples)  # (K, d)
    means = sums / counts.clamp_min(1.0).unsqueeze(1)
    return torch.where(counts.unsqueeze(1) > 0, means, previous)
