"""Dataset specs, prepare (every layout), check, synth and the transforms, without Ray.

Tiny fake trees (a few 20x24 images) in each dataset's real on-disk layout go through the same
``prepare`` code a user runs; shards are read back with pyarrow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from hrt_ray.cli import main
from hrt_ray.data import DataError, SpecError, get_spec
from hrt_ray.data.check import check
from hrt_ray.data.codec import decode_image, decode_mask
from hrt_ray.data.map_tasks import val_udf
from hrt_ray.data.prepare import prepare
from hrt_ray.data.shards import Record, iter_records, read_manifest, write_shards
from hrt_ray.data.specs import synthetic_spec
from hrt_ray.data.synth import draw_scene, synth
from hrt_ray.data.transforms import AugmentParams, TrainAugment

H, W = 20, 24


def _img(path: Path, seed: int, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _mask(path: Path, values: list[int], h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    for i, v in enumerate(values):
        m[:, i * (w // len(values)) :] = v
    Image.fromarray(m, mode="L").save(path)


def _rows(uri: str) -> dict[str, dict]:
    return {row["key"]: row for _, row in iter_records(uri)}


# ------------------------------------------------------------------------------------------ specs


def test_builtin_specs_match_the_official_configs() -> None:
    cs = get_spec("cityscapes")
    assert (cs.num_classes, cs.ignore_index, cs.crop_size) == (19, 255, (512, 1024))
    lut = cs.lut()
    assert lut[7] == 0 and lut[8] == 1 and lut[26] == 13 and lut[33] == 18  # road, sidewalk, car, bicycle
    assert lut[0] == 255 and lut[6] == 255 and lut[255] == 255  # unlabeled / ground / void
    assert cs.class_names[13] == "car" and cs.palette[0] == (128, 64, 128)

    ade = get_spec("ade20k")
    assert (ade.num_classes, ade.crop_size, ade.base_short_side) == (150, (520, 520), 520)
    assert ade.lut()[0] == 255 and ade.lut()[1] == 0 and ade.lut()[150] == 149 and ade.lut()[151] == -1
    assert ade.class_names[0] == "wall" and ade.class_names[-1] == "flag"

    pc = get_spec("pascal_context")
    assert pc.num_classes == 59 and pc.lut()[0] == 255 and pc.lut()[59] == 58
    assert "background" not in pc.class_names and pc.class_names[0] == "aeroplane"

    coco = get_spec("coco_stuff")
    assert coco.num_classes == 171 and len(coco.palette) == 171
    lut = coco.lut()
    # 1-based COCO ids; 0 = unlabelled and the 11 unused ids are ignored
    assert lut[0] == 255 and lut[1] == 0 and lut[12] == 255 and lut[13] == 11 and lut[182] == 170
    assert coco.class_names[lut[92]] == "banner" and coco.class_names[lut[13]] == "stop sign"
    assert sum(1 for v in lut if 0 <= v < 171) == 171


def test_unknown_dataset_lists_the_known_ones_and_custom_yaml_loads(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cityscape.*did you mean 'cityscapes'.*ade20k"):
        get_spec("cityscape")
    spec_file = tmp_path / "binary.yaml"
    spec_file.write_text(yaml.safe_dump({
        "name": "lesions", "class_names": ["background", "lesion"], "label_mapping": {0: 0, 255: 1},
        "ignore_index": 254, "crop_size": [16, 16],
    }))
    spec = get_spec(str(spec_file))
    assert spec.name == "lesions" and spec.num_classes == 2 and spec.ignore_index == 254
    assert spec.lut()[255] == 1 and spec.lut()[0] == 0 and spec.lut()[7] == 254
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"class_names": ["a", "b"], "label_mapping": {0: 5}}))
    with pytest.raises(SpecError, match=r"bad.yaml: label_mapping 0 -> 5 is outside 0..1"):
        get_spec(str(bad))


# ---------------------------------------------------------------------------------------- prepare


def test_prepare_cityscapes_validates_reports_bad_pairs_and_skips_written_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "cityscapes"
    for i, city in enumerate(["aachen", "aachen", "bremen", "bremen"]):
        stem = f"{city}_{i:06d}_000019"
        _img(src / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", i)
        _mask(src / "gtFine" / "train" / city / f"{stem}_gtFine_labelIds.png", [7, 26, 0])
    # bad pairs: a corrupt image, a mask of another size, an image without a mask
    (src / "leftImg8bit/train/bremen/bremen_000009_000019_leftImg8bit.png").write_bytes(b"not a png")
    _mask(src / "gtFine/train/bremen/bremen_000009_000019_gtFine_labelIds.png", [7])
    _img(src / "leftImg8bit/train/zurich/zurich_000010_000019_leftImg8bit.png", 10)
    _mask(src / "gtFine/train/zurich/zurich_000010_000019_gtFine_labelIds.png", [7], h=H + 2)
    _img(src / "leftImg8bit/train/zurich/zurich_000011_000019_leftImg8bit.png", 11)

    dst = str(tmp_path / "shards")
    rc = main(["data", "prepare", "--dataset", "cityscapes", "--src", str(src), "--dst", dst,
               "--split", "train", "--records-per-shard", "3"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "bremen_000009_000019_leftImg8bit.png: image does not decode" in err
    assert "zurich_000010_000019_gtFine_labelIds.png: mask size 24x22 differs from image size 24x20" in err
    assert "zurich_000011_000019_leftImg8bit.png: image has no matching mask" in err
    manifest = read_manifest(dst)
    assert manifest["num_records"] == 4 and manifest["dataset"] == "cityscapes"
    rows = _rows(dst)
    assert sorted(rows) == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                            "bremen/bremen_000002_000019", "bremen/bremen_000003_000019"]
    row = rows["aachen/aachen_000000_000019"]
    assert (row["height"], row["width"]) == (H, W)
    original = src / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert row["image"] == original.read_bytes()
    assert set(np.unique(decode_mask(row["mask"], "t"))) == {0, 7, 26}  # raw ids kept; mapped at read

    # A re-run keeps the shards already written (even if their source changed meanwhile).
    first = sorted(Path(dst).glob("*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in first]
    (src / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png").write_bytes(b"changed")
    assert main(["data", "prepare", "--dataset", "cityscapes", "--src", str(src), "--dst", dst,
                 "--records-per-shard", "3"]) == 1
    assert [p.stat().st_mtime_ns for p in first] == mtimes
    assert read_manifest(dst)["num_records"] == 4


@pytest.mark.parametrize(
    ("dataset", "layout"),
    [
        ("ade20k", {"ADEChallengeData2016/images/training/ADE_train_1.jpg":
                    "ADEChallengeData2016/annotations/training/ADE_train_1.png"}),
        ("pascal_context", {"train/image/2008_000002.jpg": "train/label/2008_000002.png"}),
        ("coco_stuff", {"train/images/000000000009.jpg": "train/label/000000000009.png"}),
    ],
)
def test_prepare_reads_each_layout(tmp_path: Path, dataset: str, layout: dict[str, str]) -> None:
    src = tmp_path / "src"
    for img, msk in layout.items():
        _img(src / img, 0)
        _mask(src / msk, [0, 1, 5])
    result = prepare(dataset, str(src), str(tmp_path / "out"), "train")
    assert result.ok and result.manifest["num_records"] == 1
    report = check(str(tmp_path / "out"))
    assert report.ok and report.spec.name == dataset
    # zero label reduced (ADE20K/PASCAL-Context) or 1-based COCO ids: raw 1 -> class 0, raw 5 -> class 4
    assert report.class_hist[0] > 0 and report.class_hist[4] > 0 and report.ignored_pixels > 0


def test_prepare_coco_164k_stuffthingmaps_are_shifted_to_one_based(tmp_path: Path) -> None:
    src = tmp_path / "coco"
    _img(src / "images/val2017/000000000139.jpg", 0)
    _mask(src / "annotations/val2017/000000000139.png", [0, 91, 255])  # person, banner, unlabelled
    prepare("coco_stuff", str(src), str(tmp_path / "out"), "val")
    (row,) = _rows(str(tmp_path / "out")).values()
    assert set(np.unique(decode_mask(row["mask"], "t"))) == {1, 92, 0}
    spec = get_spec("coco_stuff")
    names = {spec.class_names[c] for c in np.flatnonzero(check(str(tmp_path / "out")).class_hist)}
    assert names == {"person", "banner"}


def test_prepare_custom_binary_dataset_from_folders(tmp_path: Path) -> None:
    spec_file = tmp_path / "binary.yaml"
    spec_file.write_text(yaml.safe_dump(
        {"name": "cracks", "class_names": ["background", "crack"], "label_mapping": {0: 0, 255: 1}}
    ))
    src = tmp_path / "mine"
    for i in range(3):
        _img(src / "images" / f"img{i}.png", i, h=16 + i, w=18)
        _mask(src / "masks" / f"img{i}.png", [0, 255], h=16 + i, w=18)
    _mask(src / "masks" / "orphan.png", [0])
    result = prepare(str(spec_file), str(src), str(tmp_path / "out"), "train")
    assert result.manifest["num_records"] == 3
    assert result.bad == [f"{src / 'masks' / 'orphan.png'}: mask has no matching image"]
    report = check(str(tmp_path / "out"))
    assert report.ok and report.unseen == [] and report.spec.class_names == ("background", "crack")


# ------------------------------------------------------------------------------------------ check


def _write(tmp_path: Path, masks: list[np.ndarray], spec, image_hw=(H, W), name="set") -> str:
    dst = str(tmp_path / name)

    def make(i: int) -> Record:
        from hrt_ray.data.codec import encode_png

        img = np.full((*image_hw, 3), 100, np.uint8)
        return Record(f"r{i}", encode_png(img), encode_png(masks[i]), *image_hw)

    write_shards(dst, len(masks), make, spec=spec, split="train", records_per_shard=2)
    return dst


def test_check_reports_histogram_unseen_classes_range_errors_and_off_by_one(tmp_path: Path) -> None:
    spec = synthetic_spec(4)
    good = [np.full((H, W), v, np.uint8) for v in (0, 1, 255)]
    report = check(_write(tmp_path, good, spec, name="good"))
    assert report.ok and report.records == 3
    assert list(report.class_hist) == [H * W, H * W, 0, 0] and report.ignored_pixels == H * W
    assert report.unseen == [2, 3]
    assert "classes never seen: 2 shape_2, 3 shape_3" in report.format()

    # labels written 1-based (1..4) for a 4-class spec without zero reduction
    shifted = [np.full((H, W), v, np.uint8) for v in (1, 2, 3, 4)]
    report = check(_write(tmp_path, shifted, spec, name="shifted"))
    assert not report.ok
    assert any("shard part-00001.parquet record 'r3'" in e and ": 4" in e for e in report.errors)
    assert report.hints and "reduce_zero_label: true" in report.hints[0]

    # labels already reduced (0-based, 255 = ignore) for a spec that reduces the zero label again
    reduced = [np.full((H, W), v, np.uint8) for v in (0, 30, 58, 255)]
    report = check(_write(tmp_path, reduced, get_spec("pascal_context"), name="reduced"))
    assert report.hints and "reduce_zero_label: false" in report.hints[0]

    mismatch = _write(tmp_path, [np.zeros((H + 1, W), np.uint8)], spec, name="mismatch")
    assert main(["data", "check", mismatch]) == 1
    errors = check(mismatch).errors
    assert errors == [f"shard part-00000.parquet record 'r0': mask size {W}x{H + 1} differs from image size "
                      f"{W}x{H} (WxH)"]


def test_check_names_an_empty_or_truncated_shard_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``data check`` on a cut-off upload: exit 2 and the shard's path, not a raw ArrowInvalid."""
    spec = synthetic_spec(5)
    uri = _write(tmp_path, [np.zeros((H, W), np.uint8)] * 2, spec, name="cut")
    shard = Path(uri) / "part-00000.parquet"
    for broken in (shard.read_bytes()[:100], b""):
        shard.write_bytes(broken)
        with pytest.raises(DataError, match=rf"{shard}: unreadable Parquet shard"):
            check(uri)
        assert main(["data", "check", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{shard}: unreadable Parquet shard" in err[0], err
        assert "Traceback" not in err[0]


def test_check_and_prepare_name_a_missing_uri(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path}/nowhere: no readable shard set"):
        check(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="empty shard URI"):
        read_manifest("")
    with pytest.raises(DataError, match="nope: source folder does not exist"):
        prepare("ade20k", str(tmp_path / "nope"), str(tmp_path / "out"), "train")


# ---------------------------------------------------------------------------------- synth, decode


def test_synth_is_deterministic_and_learnable_not_trivial(tmp_path: Path) -> None:
    a, ma = draw_scene(3, "train", 5, 64, 80, 5)
    b, mb = draw_scene(3, "train", 5, 64, 80, 5)
    c, _ = draw_scene(4, "train", 5, 64, 80, 5)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    masks = [draw_scene(0, "train", i, 64, 64, 5)[1] for i in range(24)]
    assert set(np.unique(np.stack(masks))) == {0, 1, 2, 3, 4}
    # Not trivial: a class's pixels vary widely (texture, lighting, noise), not one flat colour.
    imgs = [draw_scene(0, "train", i, 64, 64, 5)[0] for i in range(24)]
    class2 = np.concatenate([im[m == 2] for im, m in zip(imgs, masks, strict=True)])
    assert class2.std(0).mean() > 15

    assert main(["data", "synth", "--dst", str(tmp_path / "s"), "--num-train", "3", "--num-val", "2",
                 "--size", "32x40", "--classes", "3", "--seed", "1"]) == 0
    first = (tmp_path / "s/train/part-00000.parquet").read_bytes()
    synth(str(tmp_path / "again"), split="train", num=3, size=(32, 40), classes=3, seed=1)
    assert (tmp_path / "again/part-00000.parquet").read_bytes() == first
    manifest = json.loads((tmp_path / "s/val/manifest.json").read_text())
    assert manifest["num_records"] == 2 and manifest["spec"]["class_names"][0] == "background"


def test_decode_errors_name_the_record() -> None:
    with pytest.raises(DataError, match="shard a record 'k': image does not decode"):
        decode_image(b"\x89PNG garbage", "shard a record 'k'")
    with pytest.raises(DataError, match="where: mask must be a single-channel label image"):
        from hrt_ray.data.codec import encode_png

        decode_mask(encode_png(np.zeros((4, 4, 3), np.uint8)), "where")


# ------------------------------------------------------------------------------------- transforms


def test_train_augment_crops_pads_with_ignore_and_keeps_labels_nearest() -> None:
    aug = TrainAugment(AugmentParams(crop_size=(32, 48), ignore_index=255))
    img = np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    mask = np.zeros((20, 24), np.uint8)
    mask[:, 12:] = 3
    seen_pad = False
    for seed in range(20):
        x, m = aug(img, mask, seed)
        assert x.shape == (3, 32, 48) and x.dtype == np.float32 and m.shape == (32, 48)
        assert set(np.unique(m)) <= {0, 3, 255}  # nearest: no blended label values
        seen_pad |= bool((m == 255).any())
        if (m == 255).any():  # padding is the mean colour (0 after normalising), +-10 grey brightness
            assert abs(float(x[:, m == 255].mean())) < 10 / 255 / 0.224 + 0.01
    assert seen_pad  # a 20x24 image cannot fill a 32x48 crop at scale <= 2 every time
    a, _ = aug(img, mask, 7)
    b, _ = aug(img, mask, 7)
    c, _ = aug(img, mask, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_udfs_name_shard_and_key_for_each_bad_record_kind() -> None:
    from hrt_ray.data.codec import encode_png

    spec = synthetic_spec(3)
    good_img = encode_png(np.zeros((8, 8, 3), np.uint8))
    cases = {
        "corrupt": (b"garbage", encode_png(np.zeros((8, 8), np.uint8)), "image does not decode"),
        "size": (good_img, encode_png(np.zeros((9, 8), np.uint8)), "mask size 8x9 differs"),
        "range": (good_img, encode_png(np.full((8, 8), 7, np.uint8)), "mask holds label values outside.*: 7"),
    }
    for key, (img, msk, message) in cases.items():
        batch = {"key": np.array([key]), "image": np.array([img], dtype=object),
                 "mask": np.array([msk], dtype=object), "path": np.array(["bkt/set/part-00004.parquet"])}
        kwargs = {"state": None, "lut": spec.lut(), "spec_info": {"num_classes": 3, "ignore_index": 255},
                  "channel_order": "RGB", "max_bad": 0}
        with pytest.raises(DataError, match=f"shard bkt/set/part-00004.parquet record '{key}': {message}"):
            val_udf(batch, **kwargs)


# ------------------------------------------------------------------------ epoch rule, val padding


def test_epoch_seen_by_augmentation_is_the_slowest_splits_after_all_announced() -> None:
    from hrt_ray.data.map_tasks import record_seed
    from hrt_ray.data.pipeline_state import PipelineState

    state = PipelineState(seed=9, max_bad_records=2)
    assert state.current() == (9, 0)
    state.announce(0, 2, 0)
    state.announce(1, 2, 0)
    state.announce(0, 2, 1)  # rank 0 finished epoch 0 early; rank 1 still receives epoch-0 crops
    assert state.current() == (9, 0)
    state.announce(1, 2, 1)
    assert state.current() == (9, 1)
    state.announce(0, 3, 5)  # elastic restart with 3 workers, resumed at epoch 5
    assert state.current() == (9, 5)
    assert state.report_bad("shard a record 'x'", "bad") == 1
    assert state.report_bad("shard a record 'x'", "bad") == 1  # the same record again next epoch
    assert record_seed(9, 0, "k") == record_seed(9, 0, "k") != record_seed(9, 1, "k")


def test_val_is_padded_to_a_multiple_of_every_possible_worker_count() -> None:
    from hrt_ray.config import load_config
    from hrt_ray.data.pipeline import val_pad_multiple

    assert val_pad_multiple(load_config(None, ["scaling.num_workers=4", "data.batch_size=8"])) == 4
    elastic = load_config(None, ["scaling.num_workers=4", "scaling.min_workers=2", "data.batch_size=8"])
    assert val_pad_multiple(elastic) == 12  # 2, 3 or 4 workers all split 12k rows evenly
