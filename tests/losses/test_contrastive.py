"""Contrastive losses: fp64 references, and 2-rank (gloo) runs equal to one process on the global batch."""
from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.losses.contrastive import clip_loss, siglip_loss

N, D, WORLD = 8, 6, 2


def make_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(math.exp(1.7), dtype=torch.float64)
    bias = torch.tensor(-2.5, dtype=torch.float64)
    return images, texts, scale, bias


def reference_clip(images, texts, scale):
    """Straight from the definition: mean over samples of -log softmax of the matching pair, both directions."""
    logits = scale * images @ texts.T
    i2t = -torch.stack([logits[i].log_softmax(0)[i] for i in range(len(images))]).mean()
    t2i = -torch.stack([logits[:, j].log_softmax(0)[j] for j in range(len(images))]).mean()
    return (i2t + t2i) / 2


def reference_siglip(images, texts, scale, bias):
    total = 0.0
    for i in range(len(images)):
        for j in range(len(texts)):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale * images[i] @ texts[j] + bias))
    return total / len(images)


def test_single_process_losses_match_fp64_reference():
    images, texts, scale, bias = make_inputs(0)
    torch.testing.assert_close(clip_loss(images, texts, scale), reference_clip(images, texts, scale))
    torch.testing.assert_close(clip_loss(images, texts, scale, local_loss=True), reference_clip(images, texts, scale))
    torch.testing.assert_close(siglip_loss(images, texts, scale, bias), reference_siglip(images, texts, scale, bias))


def test_loss_prefers_matching_pairs():
    images, _, scale, bias = make_inputs(1)
    shuffled = images[torch.randperm(N, generator=torch.Generator().manual_seed(2))]
    assert clip_loss(images, images, scale) < clip_loss(images, shuffled, scale)
    assert siglip_loss(images, images, scale, bias) < siglip_loss(images, shuffled, scale, bias)


def _loss(kind: str, images, texts, scale, bias, rank, world, with_grad):
    if kind == "siglip":
        return siglip_loss(images, texts, scale, bias, rank=rank, world_size=world, gather_with_grad=with_grad)
    return clip_loss(images, texts, scale, rank=rank, world_size=world, local_loss=(kind == "local"),
                     gather_with_grad=with_grad)


CASES = [(kind, with_grad) for kind in ("full", "local", "siglip") for with_grad in (True, False)]


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind, with_grad in CASES:
            images, texts, scale, bias = make_inputs(7)
            n = N // WORLD
            local_images = images[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            local_texts = texts[rank * n:(rank + 1) * n].clone().requires_grad_(True)
            scale = scale.clone().requires_grad_(True)
            loss = _loss(kind, local_images, local_texts, scale, bias, rank, WORLD, with_grad)
            loss.backward()
            # What DeepSpeed does with gradients and the trainer with logged losses: average over ranks.
            grads = torch.cat([local_images.grad, local_texts.grad])
            scale_grad = scale.grad.clone()
            dist.all_reduce(scale_grad)
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            gathered = [torch.empty_like(grads) for _ in range(WORLD)]
            dist.all_gather(gathered, grads)
            results[f"{kind}-{with_grad}"] = {"loss": mean_loss / WORLD, "grads": gathered,
                                              "scale_grad": scale_grad / WORLD}
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), out_file), nprocs=WORLD, join=True)
        return torch.load(out_file, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind, with_grad", CASES)
def test_two_ranks_equal_one_process_on_global_batch(kind, with_grad, two_rank_results):
    images, texts, scale, bias = make_inputs(7)
    images, texts, scale = (t.clone().requires_grad_(True) for t in (images, texts, scale))
    single = _loss(kind, images, texts, scale, bias, 0, 1, True)
    single.backward()
    result = two_rank_results[f"{kind}-{with_grad}"]
    torch.testing.assert_close(result["loss"], single.detach())
    n = N // WORLD
    # Per-rank feature gradients, averaged over ranks as DeepSpeed averages parameter gradients.
    dist_image_grad = torch.cat([g[:n] for g in result["grads"]]) / WORLD
    dist_text_grad = torch.cat([g[n:] for g in result["grads"]]) / WORLD
    if with_grad:  # exact: the gather's backward brings every rank's gradient to the local features
        torch.testing.assert_close(dist_image_grad, images.grad)
        torch.testing.assert_close(dist_text_grad, texts.grad)
    elif kind == "full":  # open_clip's default: only local terms, so 1/W of the gradient after averaging
        torch.testing.assert_close(dist_image_grad, images.grad / WORLD)
        torch.testing.assert_close(dist_text_grad, texts.grad / WORLD)
    torch.testing.assert_close(result["scale_grad"], scale.grad)
