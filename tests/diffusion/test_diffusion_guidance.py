"""Classifier-free guidance (one batched forward, combine, rescale) and dynamic thresholding."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from pipeline.diffusion.guidance import (_row_quantile, classifier_free, dynamic_threshold, guidance_rescale,
                                         static_threshold)


class RecordingModel:
    """A conditional 'network' whose output depends on x, t and every condition, recording each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        self.calls.append((x.clone(), t.clone(), {k: v.clone() for k, v in cond.items()}))
        text = cond["text"].mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        image = cond["image"].sum(dim=1).reshape(-1, 1, 1, 1)
        return (x * (1 + text) + image + t.reshape(-1, 1, 1, 1) / 1000).to(torch.bfloat16)


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 4, 4, generator=g)
    t = torch.tensor([10.0, 500.0, 990.0])[:n]
    cond = {"text": torch.randn(n, 5, 8, generator=g), "image": torch.randn(n, 6, generator=g)}
    uncond = {"text": torch.zeros(n, 5, 8), "image": torch.zeros(n, 6)}
    return x, t, cond, uncond


def test_one_batched_forward_and_the_guidance_formula() -> None:
    x, t, cond, uncond = _inputs()
    model = RecordingModel()
    guided = classifier_free(model, x, t, cond, uncond, scale=4.0)
    assert len(model.calls) == 1
    bx, bt, bcond = model.calls[0]
    assert torch.equal(bx, torch.cat([x, x])) and torch.equal(bt, torch.cat([t, t]))
    for name in cond:
        assert torch.equal(bcond[name], torch.cat([cond[name], uncond[name]]))
    c = RecordingModel()(x, t, cond).float()
    u = RecordingModel()(x, t, uncond).float()
    assert guided.dtype == torch.float32
    torch.testing.assert_close(guided, u + 4.0 * (c - u), rtol=1e-6, atol=1e-6)


def test_scale_one_runs_only_the_conditional_half() -> None:
    x, t, cond, uncond = _inputs()
    model = RecordingModel()
    out = classifier_free(model, x, t, cond, uncond, scale=1.0)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 3
    assert torch.equal(model.calls[0][2]["text"], cond["text"])
    torch.testing.assert_close(out, RecordingModel()(x, t, cond).float(), rtol=0, atol=0)


def test_guidance_rescale_formula() -> None:
    x, t, cond, uncond = _inputs()
    c = RecordingModel()(x, t, cond).float()
    u = RecordingModel()(x, t, uncond).float()
    plain = u + 7.5 * (c - u)
    full = classifier_free(RecordingModel(), x, t, cond, uncond, scale=7.5, rescale=1.0)
    dims = (1, 2, 3)
    # rescale = 1: each sample has the conditional prediction's std, and is the plain result times a constant
    torch.testing.assert_close(full.std(dim=dims), c.std(dim=dims), rtol=1e-5, atol=1e-6)
    ratio = c.std(dim=dims, keepdim=True) / plain.std(dim=dims, keepdim=True)
    torch.testing.assert_close(full, plain * ratio, rtol=1e-5, atol=1e-5)
    half = classifier_free(RecordingModel(), x, t, cond, uncond, scale=7.5, rescale=0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain, rtol=1e-5, atol=1e-5)
    none = classifier_free(RecordingModel(), x, t, cond, uncond, scale=7.5, rescale=0.0)
    torch.testing.assert_close(none, plain, rtol=1e-6, atol=1e-6)
    flat = torch.ones(2, 3)  # a constant prediction is left alone instead of becoming NaN
    assert torch.equal(guidance_rescale(flat, torch.randn(2, 3), 1.0), flat)


def test_guidance_rejects_bad_arguments() -> None:
    x, t, cond, uncond = _inputs()
    with pytest.raises(ValueError, match="guidance scale must be >= 1"):
        classifier_free(RecordingModel(), x, t, cond, uncond, scale=0.5)
    with pytest.raises(ValueError, match="rescale"):
        classifier_free(RecordingModel(), x, t, cond, uncond, scale=2.0, rescale=1.5)
    with pytest.raises(ValueError, match="same keys"):
        classifier_free(RecordingModel(), x, t, cond, {"text": uncond["text"]}, scale=2.0)
    with pytest.raises(ValueError, match="'text'"):
        classifier_free(RecordingModel(), x, t, cond, {**uncond, "text": torch.zeros(3, 4, 8)}, scale=2.0)
    with pytest.raises(ValueError, match="t must have shape"):
        classifier_free(RecordingModel(), x, t[:2], cond, uncond, scale=2.0)


def test_row_quantile_matches_torch_quantile() -> None:
    rows = torch.rand(4, 1001, generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.5, 0.9, 0.995, 0.9999, 1.0):
        torch.testing.assert_close(_row_quantile(rows, q), torch.quantile(rows, q, dim=1), rtol=1e-6, atol=1e-7)


def test_dynamic_threshold_values() -> None:
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 3, 16, 16, generator=g)
    x0[0] *= 0.2  # |x0| <= 1 everywhere (quantile < 1): s = 1, unchanged
    x0[1] *= 3.0  # saturated: s = quantile > 1
    x0[2] *= 0.9
    x0[2, 0, 0, 0] = 50.0  # one outlier, far above the 0.9 quantile
    out = dynamic_threshold(x0, 0.9)
    s = torch.quantile(x0.abs().reshape(3, -1), 0.9, dim=1).clamp(min=1.0)
    assert s[0] == 1 and s[1] > 1
    expected = torch.stack([x0[i].clamp(-s[i], s[i]) / s[i] for i in range(3)])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0], x0[0])
    assert out.abs().max().item() <= 1.0 + 1e-6
    assert out[2, 0, 0, 0].item() == pytest.approx(1.0)  # the outlier is clamped to s then divided by s
    assert dynamic_threshold(x0, 1.0)[1].abs().max().item() == pytest.approx(1.0)  # s = max |x0|: pure rescale
    assert dynamic_threshold(x0.to(torch.bfloat16), 0.9).dtype == torch.bfloat16


def test_dynamic_threshold_is_a_no_op_inside_the_data_range() -> None:
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(dynamic_threshold(x0, 0.995), x0)
    assert torch.equal(static_threshold(x0), x0)
    assert torch.equal(static_threshold(x0 * 4), (x0 * 4).clamp(-1, 1))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="percentile"):
            dynamic_threshold(x0, bad)
    with pytest.raises(ValueError, match="limit"):
        static_threshold(x0, 0.0)
