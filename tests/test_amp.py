"""Mixed precision on CPU: the GPU's AMP code path (autocast, grad scaler) run where no GPU is.

Everything here runs the production step (:func:`hrt_ray.train.loop.train_step`) on a real
``hrt_tiny_ocr``; faults are injected from outside (a gradient hook the test registers).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from hrt_ray.config import load_config
from hrt_ray.eval.inference import autocast_dtype
from hrt_ray.models import build_model
from hrt_ray.models.layers import bn_gelu
from hrt_ray.models.ocr import ObjectAttentionBlock, SpatialGather
from hrt_ray.models.upsample_conv import upsample_concat_conv3x3
from hrt_ray.train.loop import (
    build_grad_scaler,
    non_finite_state,
    train_step,
)

CPU = torch.device("cpu")
NUM_CLASSES = 5
SIZE = 32  # input side: the stride-32 branch is 1x1, the smallest that runs every layer
# Plain cross-entropy + aux: OHEM's pixel selection is a threshold, so bf16 rounding can flip
# which pixels count and the comparison would measure the selection, not the arithmetic.
LOSS_ARGS: dict[str, Any] = {
    "ohem": False,
    "ohem_thresh": 0.7,
    "ohem_min_kept": 100,
    "aux_weight": 0.4,
    "ignore_index": 255,
    "class_weights": None,
}
# bf16 keeps 8 significant bits (~0.4 % per rounding); through ~60 layers the loss moves by well
# under 2 %, and every gradient keeps its direction (cosine > 0.99).
LOSS_RTOL = 0.02
MIN_COSINE = 0.99
# Tensors with small gradients (under 1e-4 of the largest tensor's norm: BN weights of the
# stride-32 fuse path, a bias table) carry relatively more rounding; measured worst 0.986.
SMALL_GRAD, MIN_COSINE_SMALL = 1e-4, 0.98
# Gradients that are zero in exact arithmetic (attention key biases: softmax ignores a shift shared
# by all keys) hold only fp32 round-off (norms ~1e-11); their direction is noise in any precision.
ZERO_GRAD = 1e-6


def _batch(seed: int = 0, size: int = SIZE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, size, size, generator=g)
    # A learnable target: the class is a function of the image, so the gradients are not noise.
    mask = (image[:, 0] > 0).long() + 2 * (image[:, 1] > 0).long()
    mask[:, :2] = 255  # some ignored pixels
    return {"image": image, "mask": mask}


def _model(seed: int = 0, channels_last: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("hrt_tiny_ocr", NUM_CLASSES, channels_last=channels_last).train()


def _grads_of_step(
    model: nn.Module, amp_dtype: torch.dtype | None, size: int = SIZE
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one production step (lr 0: the step changes nothing)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    torch.manual_seed(1)  # the same dropout masks in both precisions
    result = train_step(
        model, _batch(size=size), opt, sched, None, LOSS_ARGS, CPU, amp_dtype
    )
    return float(result.loss), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_amp_config_is_honoured_on_cpu() -> None:
    assert autocast_dtype(load_config(None, ["optim.amp=bf16"]), CPU) == torch.bfloat16
    assert autocast_dtype(load_config(None, ["optim.amp=fp16"]), CPU) == torch.float16
    assert autocast_dtype(load_config(None, ["optim.amp='off'"]), CPU) is None
    scaler = build_grad_scaler(torch.float16, CPU)
    assert scaler is not None and scaler.is_enabled()
    assert build_grad_scaler(torch.bfloat16, CPU) is None


# A whole-model step; CPU fp16/bf16 kernels are slow without bf16 units, more so on a loaded box.
@pytest.mark.timeout(3000)
def test_bf16_step_matches_fp32_step() -> None:
    """The whole model's step under bf16 autocast against fp32, on the same batch and weights.

    BN in eval mode (running statistics, folded into the convolutions): with batch statistics a
    BN's weight gradient is a sum of many +- terms that cancel at initialisation, so its
    direction is round-off in *both* precisions (cosines of -0.5 seen for fp32 vs bf16) and the
    comparison would measure that, not the AMP path. The training-mode BN+GELU kernel is
    compared on its own in ``test_custom_kernels_run_in_the_autocast_dtype``.
    """
    reference = _model().eval()
    mixed = copy.deepcopy(reference)
    # 64x64: at 32x32 the stride-32 branch is 1x1 and its few values leave that path's
    # gradients noisier (cosine 0.97 seen there).
    loss32, grads32 = _grads_of_step(reference, None, 64)
    loss16, grads16 = _grads_of_step(mixed, torch.bfloat16, 64)
    assert math.isfinite(loss16)
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32), (loss16, loss32)
    largest = max(g.norm().item() for g in grads32.values())
    worst = []
    for name, g32 in grads32.items():
        g16 = grads16[name]
        assert g16.dtype == torch.float32, f"{name}: gradient in {g16.dtype}, not the parameter's fp32"
        assert torch.isfinite(g16).all(), f"{name}: non-finite bf16 gradient"
        rel = g32.norm().item() / largest
        if rel < ZERO_GRAD:
            continue
        cos = F.cosine_similarity(g16.flatten().double(), g32.flatten().double(), dim=0).item()
        worst.append((cos - (MIN_COSINE if rel >= SMALL_GRAD else MIN_COSINE_SMALL), cos, name))
    assert len(worst) > 0.8 * len(grads32)
    worst.sort()
    assert worst[0][0] > 0, f"gradients that lost their direction in bf16 (margin, cosine, name): {worst[:5]}"


class _DtypeRecorder(TorchFunctionMode):
    """Records the input dtypes of softmax-like calls, tagged with the OCR module they run in."""

    WATCHED = {
        torch.Tensor.softmax: "softmax",
        F.softmax: "softmax",
        F.scaled_dot_product_attention: "sdpa",
        F.cross_entropy: "cross_entropy",
        F.log_softmax: "log_softmax",
    }

    def __init__(self) -> None:
        super().__init__()
        self.scope: list[str] = []
        self.calls: list[tuple[str, str, torch.dtype]] = []

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self.WATCHED:
            where = self.scope[-1] if self.scope else "other"
            self.calls.append((where, self.WATCHED[func], args[0].dtype))
        return func(*args, **kwargs)


# A whole-model step; CPU fp16/bf16 kernels are slow without bf16 units, more so on a loaded box.
@pytest.mark.timeout(3000)
def test_ocr_softmax_and_loss_run_in_fp32_under_autocast() -> None:
    model = _model()
    recorder = _DtypeRecorder()
    for module in model.modules():
        if isinstance(module, (SpatialGather, ObjectAttentionBlock)):
            tag = type(module).__name__
            module.register_forward_pre_hook(lambda m, a, tag=tag: recorder.scope.append(tag))
            module.register_forward_hook(lambda m, a, o: recorder.scope.pop() and None)  # output kept
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    with recorder:
        train_step(model, _batch(), opt, sched, None, {**LOSS_ARGS, "ohem": True}, CPU, torch.bfloat16)
    by_kind: dict[tuple[str, str], set[torch.dtype]] = {}
    for where, kind, dtype in recorder.calls:
        by_kind.setdefault((where, kind), set()).add(dtype)
    assert by_kind[("SpatialGather", "softmax")] == {torch.float32}
    assert by_kind[("ObjectAttentionBlock", "sdpa")] == {torch.float32}
    assert by_kind[("other", "cross_entropy")] == {torch.float32}
    assert by_kind[("other", "log_softmax")] == {torch.float32}  # OHEM's probabilities
    # The backbone's window attention does run in bf16 (it is not exempt): autocast was on.
    assert torch.bfloat16 in by_kind[("other", "sdpa")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_custom_kernels_run_in_the_autocast_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    xs = [torch.randn(2, c, 32 // s, 32 // s) for c, s in [(8, 1), (8, 2), (8, 4), (8, 8)]]
    weight, bias = torch.randn(16, 32, 3, 3) * 0.05, torch.randn(16)
    with torch.autocast("cpu", dtype=dtype):
        out = upsample_concat_conv3x3(xs, (32, 32), weight, bias)
    assert out.dtype == dtype  # the fp32 bias does not promote the result back to fp32
    exact = upsample_concat_conv3x3(xs, (32, 32), weight, bias)
    assert torch.allclose(out.float(), exact, rtol=0.05, atol=0.05 * exact.abs().max().item())

    bn, act = nn.BatchNorm2d(8).train(), nn.GELU()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    conv_w, probe = torch.randn(8, 8, 1, 1), torch.randn(4, 8, 6, 6)

    def run(amp: torch.dtype | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x.grad = bn.weight.grad = bn.bias.grad = None
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            h = nn.functional.conv2d(x, conv_w)  # the conv before it: autocast dtype
            y = bn_gelu(h, bn, act)
        assert h.dtype == y.dtype == (amp or torch.float32)
        (y.float() * probe).sum().backward()
        assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
        return y, [x.grad, bn.weight.grad, bn.bias.grad]

    y16, grads16 = run(dtype)
    assert bn.running_mean.dtype == torch.float32  # statistics stay fp32
    y32, grads32 = run(None)
    assert torch.allclose(y16.float(), y32, atol=0.05)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
        assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > MIN_COSINE


# A whole-model step; CPU fp16/bf16 kernels are slow without bf16 units, more so on a loaded box.
@pytest.mark.timeout(3000)
def test_fp16_scaler_skips_a_step_with_an_inf_gradient_on_cpu() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    scaler = build_grad_scaler(torch.float16, CPU)
    assert scaler is not None
    victim = model.cls_head.weight
    # The fault comes from outside production code: a hook that makes one gradient inf, once.
    fired: list[bool] = []

    def poison(grad: torch.Tensor) -> torch.Tensor:
        if fired:
            return grad
        fired.append(True)
        return torch.full_like(grad, float("inf"))

    handle = victim.register_hook(poison)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    scale = scaler.get_scale()
    step = train_step(model, _batch(), opt, sched, scaler, LOSS_ARGS, CPU, torch.float16)
    assert fired and step.skipped
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()
    params_after = dict(model.named_parameters())
    for name, value in before.items():
        if name in params_after:  # BN running stats do move in the forward; weights must not
            assert torch.equal(params_after[name].detach(), value), f"{name} changed in a skipped step"
    assert not opt.state, "a skipped step must leave the optimizer state untouched"
    # So the state a checkpoint would take is finite: nothing broken to save.
    assert non_finite_state(model, opt) == []

    step = train_step(model, _batch(1), opt, sched, scaler, LOSS_ARGS, CPU, torch.float16)
    handle.remove()
    # Without the hook the step applies, unless fp16 overflows at the still-high scale (then it
    # is skipped and the scale backs off again): either way nothing non-finite is left.
    if step.skipped:
        assert scaler.get_scale() < scale * scaler.get_backoff_factor()
    else:
        assert not torch.equal(victim.detach(), before["cls_head.weight"])
    assert non_finite_state(model, opt) == []


def test_non_finite_state_names_the_broken_tensors() -> None:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert non_finite_state(model, opt) == []
    with torch.no_grad():
        model.cls_head.bias[0] = float("nan")
        model.aux_head[1][0].running_var[0] = float("inf")
    # A finite but huge value is not flagged: the check is max-abs, no overflowing sum of squares.
    with torch.no_grad():
        model.cls_head.weight.fill_(1e30)
    assert non_finite_state(model, opt) == ["model.cls_head.bias", "model.aux_head.1.0.running_var"]
    opt.state[model.conv3x3[0].weight] = {"exp_avg": torch.tensor([float("nan")]), "step": torch.tensor(1.0)}
    assert "optimizer.conv3x3.0.weight.exp_avg" in non_finite_state(model, opt)
