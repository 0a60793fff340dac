"""The embedded default dataset: procedurally drawn scenes, written in the normal shard format.

Why it looks like this: the default run must train a real model end to end on any machine with
no download, and its mIoU must mean something. Class 0 is a textured background; every other
class is a shape family with its own outline, colour family and texture. Colour families of
neighbouring classes overlap and every image gets lighting changes and noise, so colour alone
does not separate the classes: a model has to use texture and shape (learnable, not trivial).

Everything is a pure function of ``(seed, split, index)``: the same call writes the same bytes.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import cv2
import numpy as np

from hrt_ray import storage
from hrt_ray.config import DataConfig
from hrt_ray.data.codec import DataError, encode_png
from hrt_ray.data.shards import Record, has_shards, write_shards
from hrt_ray.data.specs import synthetic_spec

log = logging.getLogger(__name__)

_SHAPES = ("ellipse", "rectangle", "triangle", "ring", "star", "blob")


def _class_style(cls: int) -> dict:
    """Fixed look of a shape class: outline, hue, texture kind, frequency and angle."""
    rng = np.random.default_rng([7919, cls])
    return {
        "shape": _SHAPES[(cls - 1) % len(_SHAPES)],
        # Hues step by ~0.13 of the wheel; with the jitter below neighbours overlap.
        "hue": ((cls - 1) * 0.13 + 0.05) % 1.0,
        "texture": ("stripes", "checker", "dots", "noise")[(cls - 1) % 4],
        "period": float(rng.uniform(4.0, 10.0)),
        "angle": float(rng.uniform(0, np.pi)),
    }


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    hsv = np.array([[[h * 179.0, s * 255.0, v * 255.0]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture(
    kind: str, h: int, w: int, period: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """A [-1, 1] pattern of the given kind (float32, HxW)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        t = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + phase)
    elif kind == "checker":
        t = np.sign(np.sin(xx * np.pi / period + phase) * np.sin(yy * np.pi / period + phase))
    elif kind == "dots":
        t = (np.sin(xx * 2 * np.pi / period + phase) * np.sin(yy * 2 * np.pi / period) > 0.6) * 2.0 - 1.0
    else:
        small = rng.standard_normal((max(2, int(h / period)), max(2, int(w / period)))).astype(
            np.float32
        )
        t = np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), -1, 1)
    return t.astype(np.float32)


def _shape_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    size = rng.uniform(0.12, 0.35) * min(h, w)
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    rot = rng.uniform(0, 360)
    m = np.zeros((h, w), np.uint8)
    centre = (int(cx), int(cy))
    if shape == "ellipse":
        cv2.ellipse(m, centre, (int(size), int(size * rng.uniform(0.4, 1.0))), rot, 0, 360, 1, -1)
    elif shape == "ring":
        cv2.ellipse(m, centre, (int(size), int(size)), 0, 0, 360, 1, -1)
        cv2.ellipse(m, centre, (int(size * 0.55), int(size * 0.55)), 0, 0, 360, 0, -1)
    else:
        if shape == "rectangle":
            pts = np.array([[-1, -0.6], [1, -0.6], [1, 0.6], [-1, 0.6]])
        elif shape == "triangle":
            pts = np.array([[0, -1], [0.95, 0.75], [-0.95, 0.75]])
        elif shape == "star":
            ang = np.linspace(0, 2 * np.pi, 11)[:-1]
            rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
            pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
        else:  # blob: a random star-convex polygon
            ang = np.sort(rng.uniform(0, 2 * np.pi, 9))
            rad = rng.uniform(0.5, 1.0, 9)
            pts = np.stack([np.cos(ang) * rad, np.sin(ang) * rad], 1)
        t = np.deg2rad(rot)
        rotm = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        poly = (pts @ rotm.T) * size + [cx, cy]
        cv2.fillPoly(m, [poly.round().astype(np.int32)], 1)
    return m.astype(bool)


def draw_scene(seed: int, split: str, index: int, height: int, width: int, classes: int) -> tuple:
    """One ``(image RGB uint8 HxWx3, mask uint8 HxW)`` scene; pure function of its arguments."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    # Background: a lit gradient over a low-frequency texture in a muted random colour.
    base = _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.1, 0.4), rng.uniform(0.35, 0.75))
    tex = _texture("noise", height, width, rng.uniform(12, 30), 0.0, rng)
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float32)
    grad = (gx / width - 0.5) * rng.uniform(-40, 40) + (gy / height - 0.5) * rng.uniform(-40, 40)
    img = base[None, None, :] + (tex * 25 + grad)[..., None]
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(2, 7))):
        cls = int(rng.integers(1, classes))
        style = _class_style(cls)
        obj = _shape_mask(style["shape"], height, width, rng)
        if obj.sum() < 4:
            continue
        colour = _hsv_to_rgb(
            (style["hue"] + rng.normal(0, 0.06)) % 1.0, rng.uniform(0.45, 0.95), rng.uniform(0.45, 0.95)
        )
        pattern = _texture(
            style["texture"],
            height,
            width,
            style["period"] * rng.uniform(0.8, 1.25),
            style["angle"] + rng.normal(0, 0.15),
            rng,
        )
        fill = colour[None, None, :] + (pattern * rng.uniform(20, 45))[..., None]
        img[obj] = fill[obj]
        mask[obj] = cls
    img = img * rng.uniform(0.8, 1.2) + rng.normal(0, rng.uniform(4, 12), img.shape)
    img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), rng.uniform(0.3, 0.9))
    return img, mask


def synth_record(seed: int, split: str, index: int, height: int, width: int, classes: int) -> Record:
    img, mask = draw_scene(seed, split, index, height, width, classes)
    return Record(f"{split}/{index:06d}", encode_png(img), encode_png(mask), height, width)


def synth(
    dst: str,
    *,
    split: str,
    num: int,
    size: tuple[int, int],
    classes: int,
    seed: int = 0,
    endpoint: str | None = None,
    records_per_shard: int = 32,
) -> dict:
    """Write ``num`` scenes of ``size`` (H, W) with ``classes`` classes (incl. background) to ``dst``."""
    h, w = int(size[0]), int(size[1])
    return write_shards(
        dst,
        num,
        lambda i: synth_record(seed, split, i, h, w, classes),
        spec=synthetic_spec(classes),
        split=split,
        records_per_shard=records_per_shard,
        endpoint=endpoint,
        extra={"synth": {"seed": seed, "size": [h, w], "classes": classes}},
    )


def _default_uris() -> dict[str, str]:
    """The embedded default's own shard URIs (``data.train_uri``/``val_uri`` of the defaults)."""
    d = DataConfig()
    return {"train": d.train_uri, "val": d.val_uri}


def _same_location(uri: str, default: str) -> bool:
    """Whether ``uri`` names the default's relative path (resolved against the working directory)."""
    if storage.is_remote(uri):
        return False
    return Path(uri).expanduser().resolve() == Path(default).resolve()


def ensure_synthetic(cfg) -> None:
    """Generate the default dataset where it belongs, unless shards are already there.

    Generation happens only at the embedded default's own paths (``data/synthetic/{train,val}``)
    or where ``data.synth.generate=true`` asks for it. Anywhere else a missing shard set is a
    :class:`DataError` naming the URI: a mistyped ``data.train_uri`` must not quietly get 256
    fresh images and train on them.

    Safe when several processes race: shard contents are deterministic, each write is atomic,
    and the manifest (which is what readers look for) is written last.
    """
    if cfg.data.dataset != "synthetic":
        return
    s = cfg.data.synth
    endpoint = cfg.storage.endpoint
    defaults = _default_uris()
    for split, uri, num in (
        ("train", cfg.data.train_uri, s.num_train),
        ("val", cfg.data.val_uri, s.num_val),
    ):
        if has_shards(uri, endpoint):
            continue
        if not (s.generate or _same_location(uri, defaults[split])):
            raise DataError(
                f"data.{split}_uri={uri}: no shard set there (no manifest.json). The synthetic "
                f"dataset is generated only at the default's own path ({defaults[split]}); check "
                f"the URI for a typo, write it with `hrt-ray data synth --dst <root>` (writes "
                f"<root>/train and <root>/val), or set data.synth.generate=true"
            )
        log.info("generating %d synthetic %s scenes at %s", num, split, uri)
        synth(
            uri,
            split=split,
            num=num,
            size=tuple(s.size),
            classes=s.classes,
            seed=s.seed,
            endpoint=endpoint,
        )
