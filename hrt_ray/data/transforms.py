"""Paired image/mask transforms: the official HRFormer training augmentation, in albumentations.

Train (per the official ``seg/configs/<dataset>/H_48_D_4.json``): optional resize of the short
side (ADE20K, PASCAL-Context, COCO-Stuff: 520), random resize with scale 0.5-2.0 and aspect
0.9-1.1, random crop to the crop size padding with the ignore label (the image with the mean
colour, which normalises to 0) where the image is smaller, horizontal flip, a brightness shift
of up to 10 grey levels, ImageNet mean/std normalisation. Masks are always resized with nearest
interpolation. Validation: whole image, normalised, nothing else.

Randomness comes only from the ``seed`` argument, so a record's crop is a pure function of
(run seed, epoch, record key): different every epoch, identical when the run is repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentParams:
    crop_size: tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 2.0)
    aspect_range: tuple[float, float] = (0.9, 1.1)
    hflip: bool = True
    brightness_shift: float = 10.0
    base_short_side: int | None = None
    ignore_index: int = 255


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 3xHxW, ImageNet mean/std (the official Normalize, div 255)."""
    out = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0)(image=image)["image"]
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


class TrainAugment:
    """Callable ``(image uint8 HxWx3, mask uint8 HxW, seed) -> (float32 3xhxw, uint8 hxw)``."""

    def __init__(self, params: AugmentParams):
        self.params = params
        ch, cw = params.crop_size
        mean_pixel = tuple(round(m * 255) for m in IMAGENET_MEAN)
        self.tail = A.Compose(
            [
                A.RandomCrop(
                    height=ch,
                    width=cw,
                    pad_if_needed=True,
                    pad_position="random",
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=mean_pixel,
                    fill_mask=params.ignore_index,
                ),
                A.HorizontalFlip(p=0.5 if params.hflip else 0.0),
                A.RandomBrightnessContrast(
                    brightness_limit=params.brightness_shift / 255.0,
                    contrast_limit=0.0,
                    brightness_by_max=True,
                    p=1.0 if params.brightness_shift > 0 else 0.0,
                ),
                A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
            ],
            mask_interpolation=cv2.INTER_NEAREST,
            seed=0,
        )

    def target_size(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
        """The official random_resize: scale ~ U(range), aspect ~ U(range), w*s*sqrt(a), h*s/sqrt(a)."""
        p = self.params
        base = p.base_short_side / min(height, width) if p.base_short_side else 1.0
        scale = rng.uniform(*p.scale_range) * base
        aspect = rng.uniform(*p.aspect_range)
        return max(1, round(height * scale / math.sqrt(aspect))), max(
            1, round(width * scale * math.sqrt(aspect))
        )

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        h, w = self.target_size(image.shape[0], image.shape[1], rng)
        if (h, w) != image.shape[:2]:
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        self.tail.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        out = self.tail(image=image, mask=mask)
        img = np.ascontiguousarray(out["image"].transpose(2, 0, 1), dtype=np.float32)
        return img, np.ascontiguousarray(out["mask"], dtype=np.uint8)
