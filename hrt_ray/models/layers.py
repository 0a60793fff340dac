"""The small pieces the backbone and the head share, all about doing the same arithmetic with
fewer passes over memory: BN folding, 1x1 convolutions on channels-last tensors, BN+GELU.

Profiles of HRFormer on CPU are dominated by convolutions and the BN/activation passes around
them. In eval mode a BN after a convolution is an affine map with fixed statistics, so it can be
folded into the convolution's weight and bias: one pass over the activation instead of two. The
folded weights are computed from the modules' own parameters at each call (cheap: weight-sized),
so nothing about the modules or their state_dict changes and training mode is untouched.
A 1x1 convolution on a ``(B, H, W, C)`` tensor is one matrix product on the last dimension
(``pointwise``). In training, ``bn_gelu`` keeps less for backward (see ``_BatchNormGELU``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def folds_bn(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with its running statistics, so it can be folded into a convolution."""
    return not bn.training and bn.running_var is not None


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution's weight and bias with an eval-mode BN after it folded in.

    Legal only when the BN uses running statistics (eval); saves one pass over the activation.
    Computed on the fly from the module's own parameters, so the state_dict keeps the official
    layout and a later ``train()`` needs no undoing.
    """
    assert bn.running_var is not None and bn.running_mean is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if bias is None else (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return weight * scale.view((-1,) + (1,) * (weight.ndim - 1)), shift


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))``, as one convolution in eval mode."""
    if folds_bn(bn):
        return conv._conv_forward(x, *fold_bn(conv.weight, conv.bias, bn))
    return bn(conv(x))


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, C)`` -> an NCHW view of the same memory (channels-last strides): no copy."""
    return x.permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """NCHW -> a ``(B, H, W, C)`` view; contiguous when ``x`` is in channels-last memory."""
    return x.permute(0, 2, 3, 1)


def pointwise(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
    """A 1x1 convolution on a channels-last ``(B, H, W, C)`` tensor as one matrix product
    (with ``bn`` folded in when given, eval only)."""
    weight, bias = conv.weight.flatten(1), conv.bias
    if bn is not None:
        weight, bias = fold_bn(weight, bias, bn)
    return F.linear(x, weight, bias)


def pointwise_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn_relu: nn.Sequential) -> torch.Tensor:
    """``bn_relu(conv(x))`` on channels-last ``(B, H, W, C)``, ``bn_relu`` being the official
    ``BNReLU`` (``Sequential(BatchNorm2d, ReLU)``, or ``SyncBatchNorm`` after conversion). The BN
    runs on an NCHW view of channels-last memory (its fast layout on CPU), or is folded in eval."""
    bn = bn_relu[0]
    if folds_bn(bn):
        return bn_relu[1:](pointwise(x, conv, bn))
    return to_nhwc(bn_relu(to_nchw(pointwise(x, conv))))


def _starts_with_bn(seq: nn.Sequential) -> bool:
    return len(seq) > 0 and isinstance(seq[0], nn.BatchNorm2d)


def run_folded(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``seq`` with every Conv2d -> BatchNorm2d pair through :func:`conv_bn`.

    Also recognises the official ``BNReLU`` nesting, ``Conv2d -> Sequential(BatchNorm2d, ReLU)``.
    """
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            x = conv_bn(x, m, nxt)
            i += 1
        elif isinstance(m, nn.Conv2d) and isinstance(nxt, nn.Sequential) and _starts_with_bn(nxt):
            x = run_folded(nxt[1:], conv_bn(x, m, nxt[0]))
            i += 1
        elif isinstance(m, nn.Sequential):
            x = run_folded(m, x)
        else:
            x = m(x)
        i += 1
    return x


class _BatchNormGELU(torch.autograd.Function):
    """``gelu(batch_norm(x))`` in training mode that keeps only ``x`` and the batch statistics for
    backward and recomputes the normalised tensor there (one elementwise pass).

    Autograd on the two modules keeps both the BN input (for BN backward) and the BN output (for
    GELU backward). In the transformer blocks' FFN that is two hidden-width (4x) tensors per block
    kept only to be re-derivable from each other; dropping one per pair cuts the backbone's
    activation memory by about a fifth at the cost of one cheap pass in backward.

    Under autocast it runs in the dtype of ``x`` (the autocast dtype: the convolution before it
    produced it), as autocast runs ``batch_norm`` itself: ``native_batch_norm`` takes half input
    with fp32 weight and running statistics and accumulates the batch statistics in fp32. The
    backward ops are not autocast ops, so backward needs no ``custom_bwd``; autograd casts each
    gradient to its input's dtype (fp32 for the affine parameters).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, approximate):
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        ctx.approximate = approximate
        return F.gelu(y, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        # The normalised tensor again, from the saved batch statistics (var = invstd^-2 - eps).
        var = invstd.pow(-2) - ctx.eps
        y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, ctx.eps)
        grad = grad.contiguous(memory_format=_layout(x))  # same layout as x: the fast kernels
        grad_y = torch.ops.aten.gelu_backward(grad, y, approximate=ctx.approximate)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
        )
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def bn_gelu(x: torch.Tensor, bn: nn.BatchNorm2d, act: nn.GELU) -> torch.Tensor:
    """``act(bn(x))``; in training, through :class:`_BatchNormGELU` (less activation memory).

    Anything but a plain training-mode ``BatchNorm2d`` with running statistics and a momentum
    (``SyncBatchNorm`` after conversion, eval mode, no grad) runs the modules as they are.
    """
    plain = type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.momentum is not None
    if not (plain and bn.training and torch.is_grad_enabled()):
        return act(bn(x))
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    return _BatchNormGELU.apply(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps, act.approximate
    )
