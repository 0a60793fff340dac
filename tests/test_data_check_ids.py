"""``hrt-ray data check`` on Cityscapes-layout trees whose masks are in the wrong id space.

Each tree is generated in the official layout (``leftImg8bit/`` + ``gtFine/*_gtFine_labelIds.png``)
and goes through the same ``data prepare`` and ``data check`` a user runs. On main, masks that are
really train ids (``_labelTrainIds`` renamed) prepared and checked "OK" while ~90% of their pixels
became ignore and most classes never occurred.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hrt_ray.cli import main
from hrt_ray.data import get_spec

H, W = 32, 48


def _label_ids(seed: int) -> np.ndarray:
    """A street-like scene in Cityscapes *labelIds*: sky, buildings, trees, road, a car, a person."""
    rng = np.random.default_rng(seed)
    m = np.full((H, W), 11, np.uint8)  # building
    m[: H // 4] = 23  # sky
    m[H // 4 : H // 2, : W // 3] = 21  # vegetation
    m[H // 2 :] = 7  # road
    m[H // 2 :, : W // 6] = 8  # sidewalk
    x = int(rng.integers(W // 4, W // 2))
    m[H // 2 : 3 * H // 4, x : x + 10] = 26  # car
    m[H // 3 : H // 2, W - 6 : W - 3] = 24  # person
    m[:, W - 2 :] = 17  # pole
    m[H - 3 :] = 1  # ego vehicle (void)
    return m


def _tree(root: Path, convert) -> Path:
    for i in range(3):
        stem = f"aachen_{i:06d}_000019"
        img = root / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png"
        msk = root / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        msk.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img)
        Image.fromarray(convert(_label_ids(i)), mode="L").save(msk)
    return root


def _prepare_and_check(tmp_path: Path, name: str, convert, capsys) -> tuple[int, str]:
    src = _tree(tmp_path / name, convert)
    dst = str(tmp_path / f"{name}-shards")
    assert main(["data", "prepare", "--dataset", "cityscapes", "--src", str(src), "--dst", dst]) == 0
    capsys.readouterr()
    code = main(["data", "check", dst])
    return code, capsys.readouterr().out


def _to_train_ids(m: np.ndarray) -> np.ndarray:
    """What Cityscapes' createTrainIdLabelImgs.py writes (*_gtFine_labelTrainIds.png)."""
    return get_spec("cityscapes").lut()[m].astype(np.uint8)


def test_real_label_ids_pass(tmp_path: Path, capsys) -> None:
    code, out = _prepare_and_check(tmp_path, "good", lambda m: m, capsys)
    assert code == 0, out
    assert "OK: every label is a class" in out and "look" not in out


def test_masks_already_in_train_ids_are_recognised_with_the_fix(tmp_path: Path, capsys) -> None:
    code, out = _prepare_and_check(tmp_path, "trainids", _to_train_ids, capsys)
    assert code == 1, out
    assert "the masks look already converted to train ids (e.g. *_labelTrainIds.png files renamed)" in out
    assert "raw values only 0..18 and 255" in out
    assert "*_gtFine_labelIds.png" in out and "label_mapping removed" in out
    assert "OK:" not in out


def test_one_based_train_ids_are_recognised(tmp_path: Path, capsys) -> None:
    def one_based(m: np.ndarray) -> np.ndarray:
        t = _to_train_ids(m).astype(np.int16)
        return np.where(t == 255, 0, t + 1).astype(np.uint8)

    code, out = _prepare_and_check(tmp_path, "onebased", one_based, capsys)
    assert code == 1, out
    assert "the masks look train ids + 1 (1-based, 0 = unlabelled)" in out
    assert "reduce_zero_label: true" in out
