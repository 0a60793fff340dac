"""Where each dataset keeps its image/mask pairs on disk (the layouts ``prepare`` reads).

Each finder returns sorted :class:`Pair` s, so shard ``i`` holds the same pairs on every run.
An image without a mask (or a mask without an image) is returned as a pair with the missing
side ``None``: ``prepare`` reports it by path instead of silently dropping it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hrt_ray.data.codec import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test", "testing")}


@dataclass(frozen=True)
class Pair:
    key: str
    image: Path | None
    mask: Path | None
    #: ``"plus_one"``: 0-based COCO ids with 255 = unlabelled, shifted to the 1-based convention.
    convert: str | None = None


def _pair_by_stem(images: dict[str, Path], masks: dict[str, Path], convert: str | None = None) -> list[Pair]:
    keys = sorted(set(images) | set(masks))
    return [Pair(k, images.get(k), masks.get(k), convert) for k in keys]


def _files(folder: Path, exts: tuple[str, ...], suffix: str = "") -> dict[str, Path]:
    """Relative key (without ``suffix`` + extension) -> path, recursively."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in exts:
            continue
        rel = p.relative_to(folder).with_suffix("").as_posix()
        if suffix:
            if not rel.endswith(suffix):
                continue
            rel = rel[: -len(suffix)]
        out[rel] = p
    return out


def _first_dir(candidates: list[Path], what: str) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise DataError(f"{what}: none of these folders exists: {', '.join(str(c) for c in candidates)}")


def _split_names(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def cityscapes(src: Path, split: str) -> list[Pair]:
    img_dir = _first_dir([src / "leftImg8bit" / split], "cityscapes leftImg8bit")
    gt_dir = _first_dir([src / "gtFine" / split], "cityscapes gtFine")
    return _pair_by_stem(
        _files(img_dir, (".png",), "_leftImg8bit"), _files(gt_dir, (".png",), "_gtFine_labelIds")
    )


def ade20k(src: Path, split: str) -> list[Pair]:
    root = src / "ADEChallengeData2016" if (src / "ADEChallengeData2016").is_dir() else src
    names = _split_names(split)
    img_dir = _first_dir([root / "images" / n for n in names], "ADE20K images")
    ann_dir = _first_dir([root / "annotations" / n for n in names], "ADE20K annotations")
    return _pair_by_stem(_files(img_dir, (".jpg", ".jpeg", ".png")), _files(ann_dir, (".png",)))


def pascal_context(src: Path, split: str) -> list[Pair]:
    """openseg generator layout: ``<split>/image/*.jpg`` + ``<split>/label/*.png`` (0 = background)."""
    names = _split_names(split)
    img_dir = _first_dir([src / n / d for n in names for d in ("image", "images")], "PASCAL-Context images")
    lbl_dir = _first_dir([src / n / d for n in names for d in ("label", "labels")], "PASCAL-Context labels")
    return _pair_by_stem(_files(img_dir, IMAGE_EXTS), _files(lbl_dir, (".png",)))


def coco_stuff(src: Path, split: str) -> list[Pair]:
    """openseg generator layout (``<split>/images`` + ``<split>/label``, 1-based ids, 0 = unlabelled)
    or the official 164k release (``images/<split>2017`` + ``annotations/<split>2017`` stuffthingmaps,
    0-based ids, 255 = unlabelled), which is shifted to the 1-based convention."""
    names = _split_names(split)
    for n in names:
        if (src / n / "images").is_dir():
            lbl_dir = _first_dir([src / n / "label", src / n / "labels"], "COCO-Stuff labels")
            return _pair_by_stem(_files(src / n / "images", IMAGE_EXTS), _files(lbl_dir, (".png",)))
    img_dir = _first_dir([src / "images" / f"{n}2017" for n in names], "COCO-Stuff images")
    ann_dir = _first_dir(
        [src / d / f"{n}2017" for n in names for d in ("annotations", "stuffthingmaps_trainval2017")],
        "COCO-Stuff annotations",
    )
    return _pair_by_stem(_files(img_dir, IMAGE_EXTS), _files(ann_dir, (".png",)), convert="plus_one")


def folders(src: Path, split: str) -> list[Pair]:
    """A user's own data: ``[<split>/]images/*`` + ``[<split>/]masks/*.png`` matched by file stem."""
    bases = [src / n for n in _split_names(split)] + [src]
    base = next((b for b in bases if (b / "images").is_dir()), None)
    if base is None:
        raise DataError(f"{src}: expected an images/ and a masks/ folder (optionally under {split}/)")
    mask_dir = _first_dir([base / "masks", base / "labels"], f"{base} masks")
    return _pair_by_stem(_files(base / "images", IMAGE_EXTS), _files(mask_dir, (".png",)))


LAYOUTS = {
    "cityscapes": cityscapes,
    "ade20k": ade20k,
    "pascal_context": pascal_context,
    "coco_stuff": coco_stuff,
    "folders": folders,
}


def find_pairs(layout: str, src: str | Path, split: str) -> list[Pair]:
    src = Path(src).expanduser()
    if not src.is_dir():
        raise DataError(f"{src}: source folder does not exist")
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    pairs = LAYOUTS[layout](src, split)
    if not pairs:
        raise DataError(f"{src}: no image/mask pairs found for split {split!r} in the {layout} layout")
    return pairs
