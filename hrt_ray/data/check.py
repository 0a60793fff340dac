"""``hrt-ray data check``: catch label and pairing mistakes in prepared shards before GPU hours.

Reads the shards record by record (one row group in memory at a time) and reports: label
values that are neither a class nor the ignore label, image/mask size mismatches, records that
do not decode, the per-class pixel histogram, classes never seen, and a hint when the labels
look shifted by one (the usual zero-label-reduction mistake). For specs with a label mapping
(Cityscapes) it also recognises masks in the wrong id space, which pass every range check because
the mapping sends every unlisted value to ignore: masks already in train ids (renamed
``_labelTrainIds`` files) and values shifted by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hrt_ray.data.codec import DataError, decode_image, decode_mask
from hrt_ray.data.shards import iter_records, read_manifest
from hrt_ray.data.specs import INVALID, DatasetSpec, get_spec, spec_from_dict


@dataclass
class CheckReport:
    uri: str
    spec: DatasetSpec
    records: int = 0
    raw_hist: np.ndarray = field(default_factory=lambda: np.zeros(256, np.int64))
    class_hist: np.ndarray | None = None
    ignored_pixels: int = 0
    errors: list[str] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def unseen(self) -> list[int]:
        return [i for i, c in enumerate(self.class_hist) if c == 0]

    def format(self, max_errors: int = 50) -> str:
        total = int(self.class_hist.sum() + self.ignored_pixels) or 1
        lines = [
            f"{self.uri}: {self.records} records, dataset {self.spec.name} ({self.spec.num_classes} classes)"
        ]
        lines.append("class pixel histogram (train ids):")
        for i, (name, count) in enumerate(zip(self.spec.class_names, self.class_hist, strict=True)):
            lines.append(f"  {i:3d} {name:<24s} {int(count):>14d}  {100 * count / total:6.2f}%")
        lines.append(
            f"  ign {'(ignore ' + str(self.spec.ignore_index) + ')':<24s} {self.ignored_pixels:>14d}  "
            f"{100 * self.ignored_pixels / total:6.2f}%"
        )
        if self.unseen:
            names = ", ".join(f"{i} {self.spec.class_names[i]}" for i in self.unseen)
            lines.append(f"classes never seen: {names}")
        for hint in self.hints:
            lines.append(f"hint: {hint}")
        if self.errors:
            lines.append(f"{len(self.errors)} problem(s):")
            lines.extend(f"  {e}" for e in self.errors[:max_errors])
            if len(self.errors) > max_errors:
                lines.append(f"  ... and {len(self.errors) - max_errors} more")
        else:
            lines.append("OK: every label is a class or the ignore label, every mask matches its image")
        return "\n".join(lines)


def _off_by_one_hints(spec: DatasetSpec, raw_hist: np.ndarray) -> list[str]:
    k = spec.num_classes
    present = raw_hist > 0
    hints = []
    if spec.label_mapping is None and not spec.reduce_zero_label:
        if present[k] and k != spec.ignore_index and not present[k + 1 : spec.ignore_index].any():
            hints.append(
                f"raw value {k} appears but 0..{k - 1} are the classes: the labels look 1-based "
                "(0 = background/unlabelled). Set reduce_zero_label: true in the dataset spec."
            )
    elif spec.reduce_zero_label and present[spec.ignore_index] and not present[k] and present[:k].any():
        hints.append(
            f"the ignore value {spec.ignore_index} appears but raw {k} (class {k - 1}) never does: "
            "the labels look already reduced (0-based, ignore already marked), so reducing again "
            "shifts every class by one and drops class 0. Set reduce_zero_label: false in the dataset spec."
        )
    return hints


def _coverage(spec: DatasetSpec, lut: np.ndarray, raw_hist: np.ndarray) -> tuple[float, int]:
    """(fraction of pixels that ``lut`` makes a class, number of classes that occur) for ``raw_hist``."""
    total = int(raw_hist.sum()) or 1
    is_class = (lut >= 0) & (lut < spec.num_classes)
    seen = {int(c) for c in lut[is_class & (raw_hist > 0)]}
    return float(raw_hist[is_class].sum()) / total, len(seen)


def _shifted(lut: np.ndarray, by: int) -> np.ndarray:
    """The lookup table for masks whose raw values are ``by`` off: raw ``v`` reads as ``v - by``."""
    out = np.full_like(lut, INVALID)
    values = np.arange(256)
    ok = (values - by >= 0) & (values - by < 256)
    out[values[ok]] = lut[values[ok] - by]
    return out


def _train_id_lut(spec: DatasetSpec, base: int) -> np.ndarray:
    """Reading masks as train ids: raw ``base + c`` is class ``c`` (``base=1``: 0 = unlabelled)."""
    lut = np.full(256, INVALID, np.int16)
    lut[base : base + spec.num_classes] = np.arange(spec.num_classes)
    if base:
        lut[0] = spec.ignore_index
    lut[spec.ignore_index] = spec.ignore_index
    return lut


def _mapping_problems(spec: DatasetSpec, raw_hist: np.ndarray) -> list[str]:
    """Masks that do not fit a spec with a ``label_mapping``: what they look like and the fix.

    A label mapping makes every raw value it does not list the ignore label, so masks in the
    wrong id space pass every range check while most pixels silently become ignore. Each likely
    mistake is another reading of the same histogram; one that explains far more pixels as
    classes than the spec's own reading is reported.
    """
    if spec.label_mapping is None or not raw_hist.any():
        return []
    k = spec.num_classes
    own, own_classes = _coverage(spec, spec.lut(), raw_hist)
    as_written = (
        f"through the {spec.name} label_mapping only {100 * own:.1f}% are ({own_classes} of {k} classes)"
    )

    def better(frac: float) -> bool:
        # Only when most pixels are lost as written: small masks with much void (0 = unlabelled)
        # read "better" shifted, since the shift turns void into a class.
        return own < 0.5 and frac >= own + 0.2 and frac >= 1.5 * own

    if not any(raw != train_id for raw, train_id in spec.label_mapping.items() if train_id < k):
        return []  # the mapping keeps train ids as they are: no other id space to confuse
    readings = []
    for base, looks in (
        (0, "already converted to train ids (e.g. *_labelTrainIds.png files renamed)"),
        (1, "train ids + 1 (1-based, 0 = unlabelled)"),
    ):
        lut = _train_id_lut(spec, base)
        if (lut[raw_hist > 0] >= 0).all():  # every value present is legal in this reading
            readings.append((*_coverage(spec, lut, raw_hist), base, looks))
    if readings:
        # Both readings fit values 0..K-1: 0-based train ids mark void with the ignore value,
        # 1-based ones with 0, so the ignore value's absence decides.
        one_based = raw_hist[spec.ignore_index] == 0 and raw_hist[0] > 0
        frac, classes, base, looks = next(
            (r for r in readings if r[2] == int(one_based)), readings[0]
        )
        if better(frac):
            values = f"0..{k - 1 + base} and {spec.ignore_index}"
            fix = (
                "prepare from the original label-id masks (Cityscapes: *_gtFine_labelIds.png), or "
                f"train with a spec without label_mapping (a copy of the {spec.name} spec YAML with "
                "label_mapping removed"
                + (", reduce_zero_label: true)" if base else ")")
            )
            return [
                f"the masks look {looks}: raw values only {values}; read that way {100 * frac:.1f}% of "
                f"pixels are classes ({classes} of {k} classes occur), {as_written} and the rest "
                f"becomes ignore. Fix: {fix}"
            ]
    problems = []
    for by, looks, fix in (
        (1, "one too high", "subtract 1 from every label value (keeping the ignore value)"),
        (-1, "one too low", "add 1 to every label value (keeping the ignore value)"),
    ):
        frac, classes = _coverage(spec, _shifted(spec.lut(), by), raw_hist)
        if better(frac):
            problems.append(
                f"the label values look shifted, {looks}: read shifted back, {100 * frac:.1f}% of "
                f"pixels are classes ({classes} of {k} classes occur); {as_written}. Fix: {fix} "
                "and prepare again"
            )
    return problems


def check(
    uri: str, dataset: str | None = None, endpoint: str | None = None, limit: int | None = None
) -> CheckReport:
    """Check the shard set at ``uri``; the spec comes from ``dataset`` or else the manifest."""
    manifest = read_manifest(uri, endpoint)
    spec = get_spec(dataset) if dataset else spec_from_dict(manifest["spec"], f"{uri} manifest")
    lut = spec.lut()
    report = CheckReport(uri, spec, class_hist=np.zeros(spec.num_classes, np.int64))
    for shard, row in iter_records(uri, endpoint, limit):
        report.records += 1
        where = f"shard {shard} record {row['key']!r}"
        try:
            image = decode_image(row["image"], where)
            raw = decode_mask(row["mask"], where)
        except DataError as exc:
            report.errors.append(str(exc))
            continue
        if image.shape[:2] != raw.shape[:2]:
            report.errors.append(
                f"{where}: mask size {raw.shape[1]}x{raw.shape[0]} differs from image size "
                f"{image.shape[1]}x{image.shape[0]} (WxH)"
            )
        if (row["height"], row["width"]) != image.shape[:2]:
            report.errors.append(
                f"{where}: stored size {row['height']}x{row['width']} is not the image's "
                f"{image.shape[0]}x{image.shape[1]} (HxW)"
            )
        hist = np.bincount(raw.ravel(), minlength=256)
        report.raw_hist += hist
        mapped = lut[np.arange(256)]
        bad = (mapped < 0) & (hist > 0)
        if bad.any():
            values = ", ".join(str(v) for v in np.flatnonzero(bad)[:10])
            report.errors.append(
                f"{where}: label values outside 0..{spec.num_classes - 1} and not ignore "
                f"{spec.ignore_index}: {values}"
            )
        valid = mapped >= 0
        report.class_hist += np.bincount(
            mapped[valid & (mapped != spec.ignore_index)],
            weights=hist[valid & (mapped != spec.ignore_index)],
            minlength=spec.num_classes,
        ).astype(np.int64)[: spec.num_classes]
        report.ignored_pixels += int(hist[valid & (mapped == spec.ignore_index)].sum())
    if report.records == 0:
        report.errors.append(f"{uri}: the shard set holds no records")
    report.hints = _off_by_one_hints(spec, report.raw_hist)
    report.errors.extend(_mapping_problems(spec, report.raw_hist))
    return report
