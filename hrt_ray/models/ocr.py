"""Object-Contextual Representations head ("OCR", Yuan et al., ECCV 2020), in the layout of the
official HRFormer ``HRT_*_OCR_V2`` segmentation models (``seg/lib/models/nets/hrt.py``).

The four backbone branches are upsampled to stride 4 and concatenated. An auxiliary head predicts
coarse logits from them; their per-class softmax over space gathers one feature vector per class
(the "object regions"), every pixel attends to those vectors (key width 256), and the context is
concatenated with the pixel features before the classifier. Both outputs are returned at the
input resolution; the loss lives in the trainer, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hrt_ray.models.layers import run_folded

OCR_MID_CHANNELS = 512
OCR_KEY_CHANNELS = 256
OCR_DROPOUT = 0.05


def _bn_relu(channels: int) -> nn.Sequential:
    """Official ``ModuleHelper.BNReLU`` with ``bn_type='torchbn'`` (keys ``<i>.0.weight``...)."""
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1), _bn_relu(cout)]


class SpatialGather(nn.Module):
    """Soft object regions: ``(B, C, H, W)`` features, ``(B, K, H, W)`` logits -> ``(B, C, K, 1)``."""

    def forward(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.flatten(2).softmax(dim=2)  # B, K, HW
        context = probs @ feats.flatten(2).transpose(1, 2)  # B, K, C
        return context.transpose(1, 2).unsqueeze(3)


class ObjectAttentionBlock(nn.Module):
    """Pixel-to-object attention (official ``ObjectAttentionBlock2D``, scale 1)."""

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
        b, _, h, w = x.shape
        query = run_folded(self.f_pixel, x).flatten(2).transpose(1, 2).unsqueeze(1)  # B, 1, HW, Ck
        key = run_folded(self.f_object, proxy).flatten(2).transpose(1, 2).unsqueeze(1)  # B, 1, K, Ck
        value = run_folded(self.f_down, proxy).flatten(2).transpose(1, 2).unsqueeze(1)  # B, 1, K, Ck
        context = F.scaled_dot_product_attention(query, key, value)  # softmax(q k^T / sqrt(Ck)) v
        context = context.squeeze(1).transpose(1, 2).reshape(b, self.key_channels, h, w)
        return run_folded(self.f_up, context)


class SpatialOCR(nn.Module):
    """Object context + pixel features -> fused representation (official ``SpatialOCR_Module``)."""

    def __init__(self, in_channels: int, key_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.object_context_block = ObjectAttentionBlock(in_channels, key_channels)
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels, out_channels, 1), _bn_relu(out_channels), nn.Dropout2d(dropout)
        )

    def forward(self, feats: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
        context = self.object_context_block(feats, proxy)
        return run_folded(self.conv_bn_dropout, torch.cat([context, feats], 1))


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

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        xs = self.backbone(images)
        size = xs[0].shape[-2:]
        feats = torch.cat(
            [xs[0], *(F.interpolate(x, size=size, mode="bilinear", align_corners=True) for x in xs[1:])], 1
        )
        aux = run_folded(self.aux_head, feats)
        feats = run_folded(self.conv3x3, feats)
        context = self.ocr_gather_head(feats, aux)
        out = self.cls_head(self.ocr_distri_head(feats, context))
        full = images.shape[-2:]
        return {
            "out": F.interpolate(out, size=full, mode="bilinear", align_corners=True),
            "aux": F.interpolate(aux, size=full, mode="bilinear", align_corners=True),
        }
