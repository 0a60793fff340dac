"""AdamW with the official HRT parameter grouping and its warmup + poly schedule, by iteration.

Grouping (``group_method decay`` in the official scripts): no weight decay on normalisation
layers, biases and relative-position bias tables, since decaying them only pulls scales and
offsets toward zero without regularising anything. Schedule (``warm_lambda_poly``): linear from
``warmup_ratio * lr`` to ``lr`` over ``warmup_iters``, then ``(1 - t)^power`` decay to 0 at
``max_iters``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
)
_NO_DECAY_NAME_PARTS = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay (norms, biases, position tables)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                isinstance(module, _NORM_TYPES)
                or "norm" in type(module).__name__.lower()
                or param_name == "bias"
                or any(part in full for part in _NO_DECAY_NAME_PARTS)
            ):
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and norms/biases/position tables without decay."""
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: Iterable[float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    b1, b2 = betas
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(b1, b2), eps=1e-8)


def warmup_poly_factor(
    iteration: int, max_iters: int, warmup_iters: int, warmup_ratio: float = 1e-6, power: float = 0.9
) -> float:
    """LR multiplier at ``iteration`` (0-based): linear warmup, then poly decay to 0."""
    if iteration < warmup_iters:
        return 1.0 - (1.0 - iteration / warmup_iters) * (1.0 - warmup_ratio)
    progress = (iteration - warmup_iters) / max(1, max_iters - warmup_iters)
    return max(0.0, 1.0 - progress) ** power


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    max_iters: int,
    warmup_iters: int,
    warmup_ratio: float = 1e-6,
    power: float = 0.9,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration; its state_dict holds the iteration count."""

    def factor(it: int) -> float:
        return warmup_poly_factor(it, max_iters, warmup_iters, warmup_ratio, power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor)
