"""HRFormer (HRT) backbones: "HRFormer: High-Resolution Transformer for Dense Prediction", Yuan et al.,
NeurIPS 2021 (official code: HRNet/HRFormer, ``seg/lib/models/backbones/hrt``).

The network keeps four parallel branches at strides 4/8/16/32 (added in stages 2, 3 and 4),
each a stack of transformer blocks (local-window MHSA with relative position bias, then an FFN
with a depthwise 3x3 convolution), and exchanges information between branches in HRNet-style
fuse layers after every module. Module and parameter names follow the official code exactly, so
official segmentation and ImageNet checkpoints load strictly (see ``checkpoint.py``).

What differs from the official code is only how the work is laid out: inside a block the tokens
stay channels-last ``(B, H, W, C)`` (LayerNorm and the FFN's 1x1 convolutions are matrix products
on the last dimension, so no permute-and-copy between them), and attention goes through
``F.scaled_dot_product_attention`` (``attention.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from hrt_ray.models.attention import LocalWindowAttention
from hrt_ray.models.layers import bn_gelu, conv_bn, fold_bn, folds_bn, pointwise, run_folded, to_nchw, to_nhwc

BN_MOMENTUM = 0.1
STEM_CHANNELS = 64
STAGE1_PLANES = 64  # bottleneck width in stage 1 (output 4x that)
STAGE1_BLOCKS = 2


# --------------------------------------------------------------------------------------------------
# Settings as data. A variant is its branch widths and heads; window variants are derived.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HRTSettings:
    """One HRT backbone. ``modules[s]`` = HRT modules in stage s+2; each has ``blocks`` blocks per branch."""

    channels: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    window_size: int = 7
    modules: tuple[int, int, int] = (1, 4, 2)
    blocks: int = 2
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2

    def stage_depths(self) -> list[int]:
        """Transformer blocks along one branch in stages 2, 3, 4 (the drop-path schedule's length)."""
        return [m * self.blocks for m in self.modules]


SETTINGS: dict[str, HRTSettings] = {
    # HRFormer-T of the paper (ImageNet config hrt_tiny.yaml: 3 modules in stage 3, no drop path).
    "hrt_tiny": HRTSettings(
        channels=(18, 36, 72, 144), heads=(1, 2, 4, 8), modules=(1, 3, 2), drop_path_rate=0.0
    ),
    "hrt_small": HRTSettings(channels=(32, 64, 128, 256), heads=(1, 2, 4, 8)),
    "hrt_base": HRTSettings(channels=(78, 156, 312, 624), heads=(2, 4, 8, 16)),
}


# --------------------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------------------


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm's definition, as the official code)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)


class Bottleneck(nn.Module):
    """ResNet bottleneck of stage 1 (official ``Bottleneck``; expansion 4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = _bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(conv_bn(x, self.conv1, self.bn1))
        out = self.relu(conv_bn(out, self.conv2, self.bn2))
        out = conv_bn(out, self.conv3, self.bn3)
        residual = x if self.downsample is None else run_folded(self.downsample, x)
        return self.relu(out + residual)


class ConvFFN(nn.Module):
    """FFN with a depthwise 3x3 convolution and BN after every layer (official ``MlpDWBN``).

    Order per layer is conv -> BN -> GELU. Takes and returns channels-last ``(B, H, W, C)``; the
    1x1 convolutions run as ``F.linear`` on the last dimension and only the depthwise convolution
    sees an NCHW view (channels-last strides, no copy).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.norm1 = nn.BatchNorm2d(hidden)
        self.dw3x3 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act2 = nn.GELU()
        self.norm2 = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.act3 = nn.GELU()
        self.norm3 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if folds_bn(self.norm1):  # eval: each BN folded into the convolution before it
            y = self.act1(pointwise(x, self.fc1, self.norm1))
            w, b = fold_bn(self.dw3x3.weight, self.dw3x3.bias, self.norm2)
            y = self.act2(F.conv2d(to_nchw(y), w, b, padding=1, groups=self.dw3x3.groups))
            return self.act3(pointwise(to_nhwc(y), self.fc2, self.norm3))
        y = bn_gelu(to_nchw(pointwise(x, self.fc1)), self.norm1, self.act1)
        y = bn_gelu(self.dw3x3(y.contiguous(memory_format=torch.channels_last)), self.norm2, self.act2)
        y = pointwise(to_nhwc(y), self.fc2)
        return to_nhwc(bn_gelu(to_nchw(y), self.norm3, self.act3))


class TransformerBlock(nn.Module):
    """Pre-norm block: window MHSA then ConvFFN, each residual (official ``GeneralTransformerBlock``)."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float = 4.0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.attn = LocalWindowAttention(dim, num_heads, window_size)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NCHW in, NCHW out (a view of channels-last memory). Inside, (B, H, W, C) must be
        # contiguous: with channels-first memory here, the residual adds would give the gradients
        # a different layout from the saved activations, and GELU/BN backward fall back to slow
        # strided kernels. After the first block of a branch this is free (already contiguous).
        t = to_nhwc(x).contiguous()
        t = t + self.drop_path(self.attn(self.norm1(t)))
        t = t + self.drop_path(self.mlp(self.norm2(t)))
        return to_nchw(t)


def _fuse_layer(in_ch: list[int], i: int, j: int) -> nn.Module:
    """Path from branch j to branch i (official ``_make_fuse_layers``)."""
    if j > i:  # 1x1 conv + BN, then nearest x2^(j-i) (then bilinear to the exact size in forward)
        return nn.Sequential(
            nn.Conv2d(in_ch[j], in_ch[i], 1, bias=False),
            _bn(in_ch[i]),
            nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
        )
    if j == i:
        return nn.Identity()
    steps: list[nn.Module] = []
    for k in range(i - j):  # each step halves the size: depthwise 3x3 s2 + BN + 1x1 + BN (+ReLU but last)
        last = k == i - j - 1
        out = in_ch[i] if last else in_ch[j]
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch[j], in_ch[j], 3, stride=2, padding=1, groups=in_ch[j], bias=False),
            _bn(in_ch[j]),
            nn.Conv2d(in_ch[j], out, 1, bias=False),
            _bn(out),
        ]
        if not last:
            layers.append(nn.ReLU(inplace=False))
        steps.append(nn.Sequential(*layers))
    return nn.Sequential(*steps)


class HRTModule(nn.Module):
    """Parallel branches of transformer blocks followed by all-to-all fusion (official
    ``HighResolutionTransformerModule``, always with multi-scale output)."""

    def __init__(
        self,
        channels: list[int],
        heads: list[int],
        window_size: int,
        blocks: int,
        mlp_ratio: float,
        drop_paths: list[float],
    ) -> None:
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(
                *(
                    TransformerBlock(channels[b], heads[b], window_size, mlp_ratio, drop_paths[k])
                    for k in range(blocks)
                )
            )
            for b in range(n)
        )
        self.fuse_layers = (
            nn.ModuleList(nn.ModuleList(_fuse_layer(channels, i, j) for j in range(n)) for i in range(n))
            if n > 1
            else None
        )
        self.relu = nn.ReLU(inplace=True)
        self.grad_checkpointing = False

    def _run_branch(self, branch: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        for block in branch:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [self._run_branch(branch, x) for branch, x in zip(self.branches, xs, strict=True)]
        if self.fuse_layers is None:
            return xs
        out = []
        for i, paths in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else run_folded(paths[0], xs[0])
            for j in range(1, len(xs)):
                if j == i:
                    y = y + xs[j]
                elif j > i:
                    z = run_folded(paths[j], xs[j])
                    if z.shape[-2:] != xs[i].shape[-2:]:  # sizes not divisible by 32: as the official
                        z = F.interpolate(z, size=xs[i].shape[-2:], mode="bilinear", align_corners=True)
                    y = y + z
                else:
                    y = y + run_folded(paths[j], xs[j])
            out.append(self.relu(y))
        return out


def _transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    """Official ``_make_transition_layer``: adapt existing branches, add new ones from the last."""
    layers: list[nn.Module | None] = []
    for i, ch in enumerate(cur):
        if i < len(pre):
            layers.append(
                None
                if ch == pre[i]
                else nn.Sequential(nn.Conv2d(pre[i], ch, 3, 1, 1, bias=False), _bn(ch), nn.ReLU(inplace=True))
            )
        else:
            steps = []
            for k in range(i + 1 - len(pre)):
                out = ch if k == i - len(pre) else pre[-1]
                steps.append(
                    nn.Sequential(
                        nn.Conv2d(pre[-1], out, 3, 2, 1, bias=False), _bn(out), nn.ReLU(inplace=True)
                    )
                )
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


# --------------------------------------------------------------------------------------------------
# The backbone.
# --------------------------------------------------------------------------------------------------


class HighResolutionTransformer(nn.Module):
    """HRT backbone: ``forward(images) -> [x4, x8, x16, x32]`` (channels ``settings.channels``)."""

    def __init__(self, settings: HRTSettings) -> None:
        super().__init__()
        self.settings = settings
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self.bn1 = _bn(STEM_CHANNELS)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self.bn2 = _bn(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)

        stage1_out = STAGE1_PLANES * Bottleneck.expansion
        downsample = nn.Sequential(nn.Conv2d(STEM_CHANNELS, stage1_out, 1, bias=False), _bn(stage1_out))
        self.layer1 = nn.Sequential(
            Bottleneck(STEM_CHANNELS, STAGE1_PLANES, downsample),
            *(Bottleneck(stage1_out, STAGE1_PLANES) for _ in range(STAGE1_BLOCKS - 1)),
        )

        # Drop-path rates rise linearly over the blocks of one branch across stages 2-4; every
        # branch of a module shares its module's slice (official schedule).
        depths = settings.stage_depths()
        dpr = torch.linspace(0, settings.drop_path_rate, sum(depths)).tolist()
        pre = [stage1_out]
        start = 0
        for stage, num_modules in enumerate(settings.modules):
            n = stage + 2
            cur = list(settings.channels[:n])
            setattr(self, f"transition{stage + 1}", _transition(pre, cur))
            modules = []
            for m in range(num_modules):
                first = start + m * settings.blocks
                modules.append(
                    HRTModule(
                        cur,
                        list(settings.heads[:n]),
                        settings.window_size,
                        settings.blocks,
                        settings.mlp_ratio,
                        dpr[first : first + settings.blocks],
                    )
                )
            setattr(self, f"stage{stage + 2}", nn.Sequential(*modules))
            start += depths[stage]
            pre = cur
        self.num_features = list(settings.channels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in backward (less activation memory, ~1 more forward).

        BN layers inside a recomputed block update their running statistics twice per step, as in
        any activation-checkpointed BN network; this only changes the running averages' momentum.
        """
        for module in self.modules():
            if isinstance(module, HRTModule):
                module.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(conv_bn(x, self.conv1, self.bn1))
        x = self.relu(conv_bn(x, self.conv2, self.bn2))
        xs = [self.layer1(x)]
        for stage in range(len(self.settings.modules)):
            transition: nn.ModuleList = getattr(self, f"transition{stage + 1}")
            xs = [
                (xs[i] if t is None else run_folded(t, xs[i])) if i < len(xs) else run_folded(t, xs[-1])
                for i, t in enumerate(transition)
            ]
            xs = getattr(self, f"stage{stage + 2}")(xs)
        return xs


def create_hrformer(
    variant: str, window_size: int | None = None, drop_path_rate: float | None = None
) -> HighResolutionTransformer:
    if variant not in SETTINGS:
        raise ValueError(f"unknown HRT variant {variant!r}; known: {', '.join(SETTINGS)}")
    settings = SETTINGS[variant]
    if window_size is not None:
        if int(window_size) != window_size or window_size < 1:
            raise ValueError(f"window_size must be a positive integer, got {window_size!r}")
        settings = replace(settings, window_size=int(window_size))
    if drop_path_rate is not None:
        settings = replace(settings, drop_path_rate=drop_path_rate)
    return HighResolutionTransformer(settings)

