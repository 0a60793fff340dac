"""Dataset specs: class names, palettes, the ignore label and how raw mask values map to classes.

Why specs are data: the four benchmark datasets and a user's own dataset are described the same
way, by a YAML file (``hrt_ray/data/specs/<name>.yaml`` for the built-in ones, any path for a
custom one), so adding a dataset needs no code. The facts in the built-in files follow the
official HRFormer/openseg configs: Cityscapes maps label ids to train ids, ADE20K and
PASCAL-Context reduce the zero label, COCO-Stuff uses the official 171-entry label list.

A spec turns into one lookup table (:meth:`DatasetSpec.lut`) from raw mask value to train id,
applied identically in ``prepare`` validation, ``check``, and the train/val pipelines.
"""

from __future__ import annotations

import colorsys
import difflib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SPEC_DIR = Path(__file__).with_name("specs")
BUILTIN = ("cityscapes", "ade20k", "pascal_context", "coco_stuff", "synthetic")
#: Value of :meth:`DatasetSpec.lut` for raw mask values the spec does not allow.
INVALID = -1


class SpecError(ValueError):
    """A dataset spec is unknown or malformed; the message names the spec or file."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255
    #: Raw mask value -> train id. Raw values not listed become ``ignore_index``.
    label_mapping: dict[int, int] | None = None
    #: Raw 0 -> ignore, raw k -> k-1 (ADE20K style). Exclusive with ``label_mapping``.
    reduce_zero_label: bool = False
    crop_size: tuple[int, int] = (512, 512)
    #: Resize training images so their short side is this before the random resize (official
    #: ``resize.min_side_length`` of the 520x520 datasets); ``None`` keeps the original size.
    base_short_side: int | None = None
    #: On-disk layout ``prepare`` reads: cityscapes, ade20k, pascal_context, coco_stuff, folders.
    layout: str = "folders"
    source: str = field(default="builtin", compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def lut(self) -> np.ndarray:
        """Raw 8-bit mask value -> train id, ``ignore_index``, or :data:`INVALID` (int16, 256 entries).

        Without a mapping, values ``0..K-1`` are classes and ``ignore_index`` is ignored; anything
        else is invalid, so an off-by-one labelling error is caught rather than trained on.
        """
        lut = np.full(256, INVALID, dtype=np.int16)
        lut[self.ignore_index] = self.ignore_index
        if self.label_mapping is not None:
            lut[:] = self.ignore_index
            for raw, train_id in self.label_mapping.items():
                lut[raw] = train_id
        elif self.reduce_zero_label:
            lut[0] = self.ignore_index
            lut[1 : self.num_classes + 1] = np.arange(self.num_classes)
        else:
            lut[: self.num_classes] = np.arange(self.num_classes)
        return lut

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["palette"] = [list(p) for p in self.palette]
        data["crop_size"] = list(self.crop_size)
        data.pop("source")
        return data


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """Distinct colours for ``n`` classes (evenly spaced hues, alternating brightness)."""
    colours = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 else 0.7)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def synthetic_spec(num_classes: int = 5) -> DatasetSpec:
    """The generated default dataset: class 0 is the background, the others are shape classes."""
    names = ("background", *(f"shape_{i}" for i in range(1, num_classes)))
    return DatasetSpec(
        name="synthetic",
        class_names=names,
        palette=tuple(default_palette(num_classes)),
        crop_size=(96, 96),
        layout="synthetic",
    )


def spec_from_dict(data: dict[str, Any], source: str) -> DatasetSpec:
    """Build and validate a spec from a mapping (a YAML file or a shard manifest)."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a dataset spec must be a mapping")
    known = {
        "name",
        "class_names",
        "palette",
        "ignore_index",
        "label_mapping",
        "reduce_zero_label",
        "crop_size",
        "base_short_side",
        "layout",
        "num_classes",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{source}: unknown spec keys {unknown}; allowed: {sorted(known)}")
    names = data.get("class_names")
    if not names and data.get("num_classes"):
        names = [f"class_{i}" for i in range(int(data["num_classes"]))]
    if not names or not isinstance(names, list):
        raise SpecError(f"{source}: class_names must be a non-empty list (or give num_classes)")
    if data.get("num_classes") is not None and int(data["num_classes"]) != len(names):
        raise SpecError(f"{source}: num_classes={data['num_classes']} but {len(names)} class_names")
    ignore = int(data.get("ignore_index", 255))
    if not 0 <= ignore <= 255:
        raise SpecError(f"{source}: ignore_index must be in 0..255, got {ignore}")
    if len(names) > 255 or (ignore < len(names)):
        raise SpecError(f"{source}: {len(names)} classes leave no room for ignore_index={ignore}")
    palette = data.get("palette") or default_palette(len(names))
    if len(palette) != len(names) or any(
        len(p) != 3 or not all(0 <= c <= 255 for c in p) for p in palette
    ):
        raise SpecError(f"{source}: palette must hold one [r, g, b] (0..255) per class ({len(names)})")
    mapping = data.get("label_mapping")
    reduce_zero = bool(data.get("reduce_zero_label", False))
    if mapping is not None:
        if reduce_zero:
            raise SpecError(f"{source}: give label_mapping or reduce_zero_label, not both")
        if not isinstance(mapping, dict):
            raise SpecError(f"{source}: label_mapping must map raw mask value -> class index")
        try:
            mapping = {int(k): int(v) for k, v in mapping.items()}
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{source}: label_mapping keys and values must be integers") from exc
        for raw, train_id in mapping.items():
            if not 0 <= raw <= 255:
                raise SpecError(f"{source}: label_mapping raw value {raw} is not an 8-bit value")
            if not (0 <= train_id < len(names) or train_id == ignore):
                raise SpecError(
                    f"{source}: label_mapping {raw} -> {train_id} is outside 0..{len(names) - 1} "
                    f"and not the ignore label {ignore}"
                )
    elif reduce_zero and len(names) + 1 > ignore:
        raise SpecError(
            f"{source}: reduce_zero_label with {len(names)} classes collides with ignore_index"
        )
    crop = data.get("crop_size") or [512, 512]
    if len(crop) != 2 or any(int(c) < 1 for c in crop):
        raise SpecError(f"{source}: crop_size must be [height, width], got {crop}")
    base = data.get("base_short_side")
    return DatasetSpec(
        name=str(data.get("name") or Path(source).stem),
        class_names=tuple(str(n) for n in names),
        palette=tuple((int(p[0]), int(p[1]), int(p[2])) for p in palette),
        ignore_index=ignore,
        label_mapping=mapping,
        reduce_zero_label=reduce_zero,
        crop_size=(int(crop[0]), int(crop[1])),
        base_short_side=int(base) if base else None,
        layout=str(data.get("layout", "folders")),
        source=source,
    )


def load_spec_file(path: str | Path) -> DatasetSpec:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read dataset spec: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: dataset spec is not valid YAML: {exc}") from exc
    return spec_from_dict(data, str(path))


def get_spec(name_or_path: str, num_classes: int | None = None) -> DatasetSpec:
    """A built-in spec by name, or a custom one from a YAML path.

    ``num_classes`` only applies to ``synthetic`` (its class count is chosen at generation).
    """
    key = str(name_or_path).strip()
    if key == "synthetic":
        return synthetic_spec(num_classes or 5)
    if key in BUILTIN:
        return load_spec_file(SPEC_DIR / f"{key}.yaml")
    if key.endswith((".yaml", ".yml")) or "/" in key or Path(key).is_file():
        return load_spec_file(key)
    close = difflib.get_close_matches(key, BUILTIN, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise SpecError(
        f"unknown dataset {key!r}{hint} Known: {', '.join(BUILTIN)}, or the path of a dataset spec YAML"
    )
