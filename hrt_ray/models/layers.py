"""Convolution + BatchNorm evaluated as one convolution in eval mode (BN folding on the fly).

Profiles of HRFormer on CPU are dominated by convolutions and the BN/activation passes around
them. In eval mode a BN after a convolution is an affine map with fixed statistics, so it can be
folded into the convolution's weight and bias: one pass over the activation instead of two. The
folded weights are computed from the modules' own parameters at each call (cheap: weight-sized),
so nothing about the modules or their state_dict changes and training mode is untouched.
"""

from __future__ import annotations

import torch
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
