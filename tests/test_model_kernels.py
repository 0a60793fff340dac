"""The model's rewritten kernels against the plain module-by-module computation they replace:
the factorised upsample+concat+3x3 convolution of the OCR head and the recomputing BN+GELU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrt_ray.models import upsample_conv
from hrt_ray.models.layers import bn_gelu
from hrt_ray.models.upsample_conv import upsample_concat_conv3x3


def _upsample_then_convolve(xs, size, weight, bias):
    ups = [
        x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        for x in xs
    ]
    return F.conv2d(torch.cat(ups, 1), weight, bias, padding=1)


BRANCH_SIZES = {
    "divisible": [(32, 64), (16, 32), (8, 16), (4, 8)],
    "odd sizes": [(25, 33), (13, 17), (7, 9), (4, 5)],
    "1x1 coarsest": [(9, 11), (5, 6), (3, 3), (1, 1)],
}


@pytest.mark.parametrize("case", list(BRANCH_SIZES))
def test_upsample_concat_conv3x3_equals_upsample_then_convolve(case: str, monkeypatch) -> None:
    sizes = BRANCH_SIZES[case]
    calls: list[tuple[int, int]] = []
    factorised = upsample_conv._upsample_conv_factorised

    def spy(x, weight, size):
        calls.append(tuple(x.shape[-2:]))
        return factorised(x, weight, size)

    monkeypatch.setattr(upsample_conv, "_upsample_conv_factorised", spy)
    gen = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(2, c, *hw, generator=gen, dtype=torch.float64).requires_grad_()
        for c, hw in zip((6, 12, 24, 48), sizes, strict=True)
    ]
    weight = torch.randn(64, 90, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(64, generator=gen, dtype=torch.float64, requires_grad=True)

    got = upsample_concat_conv3x3(xs, sizes[0], weight, bias)
    want = _upsample_then_convolve(xs, sizes[0], weight, bias)
    assert calls, "no branch took the factorised path"
    assert sizes[0] not in calls  # the full-resolution branch is convolved directly
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    grad = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    inputs = [*xs, weight, bias]
    for g, w in zip(
        torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_upsample_concat_conv3x3_names_a_channel_mismatch() -> None:
    xs = [torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 4)]
    with pytest.raises(ValueError, match="8 channels.*expects 9"):
        upsample_concat_conv3x3(xs, (8, 8), torch.randn(5, 9, 3, 3), None)


def test_training_after_inference_in_the_same_process() -> None:
    """Prediction (under ``torch.inference_mode``) first, then a training step, in one process:
    the tap matrices the OCR head caches on the first call must not be inference tensors."""
    from hrt_ray.models import build_model

    upsample_conv._cached_tap_matrix.cache_clear()
    torch.manual_seed(0)
    model = build_model("hrt_tiny_ocr", num_classes=3)
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(images)
    assert upsample_conv._cached_tap_matrix.cache_info().currsize > 0, "nothing cached: no test"
    outputs = model.train()(images)
    sum(o.float().sum() for o in outputs.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _saved_bytes(fn, *args) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bn_gelu_equals_the_modules_and_keeps_less_for_backward(layout: torch.memory_format) -> None:
    torch.manual_seed(0)
    bn, act = nn.BatchNorm2d(16), nn.GELU()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    plain = copy.deepcopy(bn)
    x = (torch.randn(2, 16, 9, 11, dtype=torch.float64) * 3 + 1).contiguous(memory_format=layout)
    bn.double(), plain.double()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = bn_gelu(x1, bn, act), act(plain(x2))
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    assert y1.is_contiguous(memory_format=layout)
    grad = torch.randn_like(y1)
    (y1 * grad).sum().backward()
    (y2 * grad).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.weight.grad, plain.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.bias.grad, plain.bias.grad, rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(plain, name), msg=name)

    # It keeps the input (and per-channel statistics), not also the normalised tensor.
    x3 = x.clone().requires_grad_()
    assert _saved_bytes(bn_gelu, x3, bn, act) < 0.6 * _saved_bytes(lambda t: act(plain(t)), x3)


def test_bn_gelu_outside_training_runs_the_modules() -> None:
    bn, act = nn.BatchNorm2d(4).eval(), nn.GELU()
    x = torch.randn(1, 4, 5, 5)
    before = bn.num_batches_tracked.clone()
    torch.testing.assert_close(bn_gelu(x, bn, act), act(bn(x)))
    assert torch.equal(bn.num_batches_tracked, before)  # eval: running statistics untouched
