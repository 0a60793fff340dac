"""Object-Contextual Representations head ("OCR", Yuan et al., ECCV 2020), in the layout of the
official HRFormer ``HRT_*_OCR_V2`` segmentation models (``seg/lib/models/nets/hrt.py``).

The four backbone branches are upsampled to stride 4 and concatenated. An auxiliary head predicts
coarse logits from them; their per-class softmax over space gathers one feature vector per class
(the "object regions"), every pixel attends to those vectors (key width 256), and the context is
concatenated with the pixel features before the classifier. Both outputs are returned at the
input resolution; the loss lives in the trainer, not here.

Same arithmetic as the official head, laid out for speed: the two 3x3 convolutions on the
upsampled concatenation never build it (``upsample_conv.py``), and everything after them runs
channels-last ``(B, H, W, C)``, where the 1x1 convolutions are matrix products on the last
dimension and BN takes its fast layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrt_ray.models.layers import fold_bn, folds_bn, pointwise, pointwise_bn_relu, to_nchw, to_nhwc
from hrt_ray.models.upsample_conv import upsample_concat_conv3x3

OCR_MID_CHANNELS = 512
OCR_KEY_CHANNELS = 256
OCR_DROPOUT = 0.05


def _bn_relu(channels: int) -> nn.Sequential:
    """Official ``ModuleHelper.BNReLU`` with ``bn_type='torchbn'`` (keys ``<i>.0.weight``...)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1), _bn_relu(cout)]


def _conv_bn_relus(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Run ``Conv2d(1x1), BNReLU, Conv2d(1x1), BNReLU, ...`` on channels-last ``(B, H, W, C)``."""
    mods = list(seq)
    for conv, bn_relu in zip(mods[0::2], mods[1::2], strict=True):
        x = pointwise_bn_relu(x, conv, bn_relu)
    return x


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 if it is a half type (fp16/bf16); fp32/fp64 pass unchanged (exactness tests)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class SpatialGather(nn.Module):
    """Soft object regions: features ``(B, H, W, C)`` and logits ``(B, H, W, K)`` -> ``(B, K, 1, C)``
    (the official ``(B, C, K, 1)`` proxy, channels-last).

    Runs in fp32 even under autocast: the softmax is over all H*W pixels (tens of thousands), so
    in bf16 the small probabilities round away and the weighted sum over space loses the
    object-region averages HRNet+OCR's mIoU depends on. Weight-free and cheap (K x HW x C).
    """

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=feats.device.type, enabled=False):
            logits, feats = at_least_fp32(logits), at_least_fp32(feats)
            probs = logits.flatten(1, 2).softmax(dim=1)  # B, HW, K: each class's distribution over space
            return (probs.transpose(1, 2) @ feats.flatten(1, 2)).unsqueeze(2)  # B, K, 1, C


class ObjectAttentionBlock(nn.Module):
    """Pixel-to-object attention (official ``ObjectAttentionBlock2D``, scale 1), channels-last."""

    def __init__(self, in_channels: int, key_channels: int) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(
            *_conv_bn_relu(in_channels, key_channels), *_conv_bn_relu(key_channels, key_channels)
        )
        self.f_object = nn.Sequential(
            *_conv_bn_relu(in_channels, key_channels), *_conv_bn_relu(key_channels, key_channels)
        )
        self.f_down = nn.Sequential(*_conv_bn_relu(in_channels, key_channels))
        self.f_up = nn.Sequential(*_conv_bn_relu(key_channels, in_channels))

    def forward(self, x: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, H, W, C)``, ``proxy`` ``(B, K, 1, C)`` -> ``(B, H, W, C)``."""
        b, h, w, _ = x.shape
        query = _conv_bn_relus(self.f_pixel, x).reshape(b, 1, h * w, self.key_channels)
        key = _conv_bn_relus(self.f_object, proxy).flatten(1, 2).unsqueeze(1)  # B, 1, K, Ck
        value = _conv_bn_relus(self.f_down, proxy).flatten(1, 2).unsqueeze(1)
        # The pixel-to-object softmax in fp32 under autocast too (K keys only: cheap), see SpatialGather.
        with torch.autocast(device_type=x.device.type, enabled=False):
            query, key, value = at_least_fp32(query), at_least_fp32(key), at_least_fp32(value)
            context = F.scaled_dot_product_attention(query, key, value)  # softmax(q k^T / sqrt(Ck)) v
        return _conv_bn_relus(self.f_up, context.view(b, h, w, self.key_channels))


class SpatialOCR(nn.Module):
    """Object context + pixel features -> fused representation (official ``SpatialOCR_Module``)."""

    def __init__(self, in_channels: int, key_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.object_context_block = ObjectAttentionBlock(in_channels, key_channels)
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels, out_channels, 1), _bn_relu(out_channels), nn.Dropout2d(dropout)
        )

    def forward(self, feats: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
        """Channels-last ``(B, H, W, C)`` features and ``(B, K, 1, C)`` proxy -> ``(B, H, W, C_out)``."""
        context = self.object_context_block(feats, proxy)
        conv, bn_relu, dropout = self.conv_bn_dropout
        fused = pointwise_bn_relu(torch.cat([context, feats], -1), conv, bn_relu)
        return to_nhwc(dropout(to_nchw(fused)))


class HRTOCR(nn.Module):
    """A multi-branch backbone + OCR head: ``model(images) -> {"out": logits, "aux": aux logits}``.

    ``backbone`` must return a list of branch maps (highest resolution first) whose channels sum
    to ``in_channels``. Attribute names are the official ones (``backbone``, ``conv3x3``,
    ``ocr_gather_head``, ``ocr_distri_head``, ``cls_head``, ``aux_head``).
    """

    def __init__(self, backbone: nn.Module, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.channels_last = False
        self.backbone = backbone
        self.conv3x3 = nn.Sequential(
            nn.Conv2d(in_channels, OCR_MID_CHANNELS, 3, padding=1), _bn_relu(OCR_MID_CHANNELS)
        )
        self.ocr_gather_head = SpatialGather()
        self.ocr_distri_head = SpatialOCR(OCR_MID_CHANNELS, OCR_KEY_CHANNELS, OCR_MID_CHANNELS, OCR_DROPOUT)
        self.cls_head = nn.Conv2d(OCR_MID_CHANNELS, num_classes, 1)
        self.aux_head = nn.Sequential(
            nn.Conv2d(in_channels, OCR_MID_CHANNELS, 3, padding=1),
            _bn_relu(OCR_MID_CHANNELS),
            nn.Conv2d(OCR_MID_CHANNELS, num_classes, 1),
        )

    def _upsampled_conv_bn_relu(self, xs: list[torch.Tensor], seq: nn.Sequential) -> torch.Tensor:
        """``seq[1](seq[0](cat(upsampled branches)))`` (3x3 conv, BNReLU) as channels-last
        ``(B, H, W, C)``, without building the upsampled concatenation (``upsample_conv.py``);
        BN folded in eval."""
        conv, bn_relu = seq[0], seq[1]
        weight, bias = conv.weight, conv.bias
        if folds_bn(bn_relu[0]):
            weight, bias = fold_bn(weight, bias, bn_relu[0])
            bn_relu = bn_relu[1:]
        size = (xs[0].shape[-2], xs[0].shape[-1])
        return to_nhwc(bn_relu(upsample_concat_conv3x3(xs, size, weight, bias)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        xs = self.backbone(images)
        # The head runs channels-last (B, H, W, C): its 1x1 convolutions are matrix products on the
        # last dimension and its BNs take their fast layout; logits go back to NCHW (small).
        aux = pointwise(self._upsampled_conv_bn_relu(xs, self.aux_head), self.aux_head[2])
        feats = self._upsampled_conv_bn_relu(xs, self.conv3x3)
        context = self.ocr_gather_head(feats, aux)
        out = pointwise(self.ocr_distri_head(feats, context), self.cls_head)
        full = images.shape[-2:]
        return {
            "out": F.interpolate(to_nchw(out).contiguous(), size=full, mode="bilinear", align_corners=True),
            "aux": F.interpolate(to_nchw(aux).contiguous(), size=full, mode="bilinear", align_corners=True),
        }
