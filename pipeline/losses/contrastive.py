"""Contrastive image-text losses with the feature gather across ranks (the one collective a loss owns).

Gradient scaling: DeepSpeed averages parameter gradients over ranks. With ``gather_with_grad`` the gather's
backward sums every rank's gradient into the local features, so after that average the gradients equal those
of a single process computing the loss on the whole global batch:

* full CLIP loss: every rank computes the same global loss L; features receive W * dL/df, averaged -> dL/dθ.
* local CLIP / SigLIP loss: rank r computes L_r with mean_r L_r = L; features receive sum_r dL_r/df,
  averaged over W -> d(mean_r L_r)/dθ = dL/dθ.

Without ``gather_with_grad`` (open_clip's default), remote features are constants and only local features carry
gradient, which is exact for the full loss up to a factor 1/W after DeepSpeed's average.

Shapes: image_features, text_features (n, D) per rank, L2-normalised, n equal on every rank (N = n * W);
logit_scale, logit_bias: scalar tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and keeps the local slice.

    The backward is an all-reduce (supported by every backend, gloo included) rather than a reduce-scatter:
    features are small (N x D), so the extra traffic does not matter and no deprecated helper is needed.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.world_size = rank, world_size
        parts = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(parts, features.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        n = total.shape[0] // ctx.world_size
        return total[ctx.rank * n:(ctx.rank + 1) * n], None, None


def gather_features(features: torch.Tensor, *, rank: int, world_size: int, with_grad: bool) -> torch.Tensor:
    """(n, D) per rank -> (n * world_size, D), rank-ordered. Without grad, the local slice keeps its graph."""
    if world_size == 1:
        return features
    if with_grad:
        return _GatherWithGrad.apply(features, rank, world_size)
    parts = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(parts, features.detach().contiguous())
    parts[rank] = features
    return torch.cat(parts, dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, *,
              rank: int = 0, world_size: int = 1, local_loss: bool = False,
              gather_with_grad: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: mean of image->text and text->image cross-entropy.

    With `local_loss`, rank r scores only its own n rows against all N columns (memory O(n * N) instead of
    O(N^2)); the mean over ranks of these per-rank losses equals the global loss.
    """
    n = image_features.shape[0]
    all_images = gather_features(image_features, rank=rank, world_size=world_size, with_grad=gather_with_grad)
    all_texts = gather_features(text_features, rank=rank, world_size=world_size, with_grad=gather_with_grad)
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_texts.T  # (n, N)
        logits_per_text = logit_scale * text_features @ all_images.T  # (n, N)
        labels = torch.arange(n, device=image_features.device) + rank * n
    else:
        logits_per_image = logit_scale * all_images @ all_texts.T  # (N, N)
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_images.shape[0], device=image_features.device)
    return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, *, rank: int = 0, world_size: int = 1,
                gather_with_grad: bool = True) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss: -(1/N) * sum_ij log sigmoid(z_ij * (scale * <x_i, y_j> + bias)).

    z_ij = +1 for matching pairs, -1 otherwise. Rank r scores its n images against all N texts; the mean over
    ranks equals the single-process loss on the global batch.
    """
    n = image_features.shape[0]
    all_texts = gather_features(text_features, rank=rank, world_size=world_size, with_grad=gather_with_grad)
    logits = logit_scale * image_features @ all_texts.T + logit_bias  # (n, N)
    signs = -torch.ones_like(logits)
    signs[torch.arange(n), torch.arange(n) + rank * n] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n
