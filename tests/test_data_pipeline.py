"""The Ray Data pipeline end to end, as the trainer uses it, against a real loopback S3 server.

Shards are written to ``s3://`` by ``prepare``/``synth``, read back with ``build_datasets`` and
split with ``streaming_split(n, equal=True)`` (what Ray Train does), each split iterated with
``iter_batches`` in its own thread like a train worker.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hrt_ray.cli import main
from hrt_ray.config import load_config
from hrt_ray.data import DataError, bad_records, build_datasets, ensure_synthetic, iter_batches
from hrt_ray.data.codec import encode_png
from hrt_ray.data.shards import Record, write_shards
from hrt_ray.data.specs import synthetic_spec

pytestmark = pytest.mark.slow

SIZES = [(20, 24), (30, 28), (16, 40), (22, 22), (26, 30), (18, 36), (24, 20)]


def _cityscapes_tree(root: Path, split: str, count: int) -> None:
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        stem = f"city_{split}_{i:06d}_000019"
        img = root / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png"
        msk = root / "gtFine" / split / "city" / f"{stem}_gtFine_labelIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        msk.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img)
        m = np.full((h, w), 7, np.uint8)  # road
        m[: h // 2] = 26  # car
        m[:, :2] = 0  # unlabeled -> ignore
        Image.fromarray(m, mode="L").save(msk)


def _run_splits(datasets: dict, epochs: int, batch: int) -> dict:
    """Iterate 2 equal splits in 2 threads, like 2 train workers; per split and epoch collect batches."""
    train_splits = datasets["train"].streaming_split(2, equal=True)
    val_splits = datasets["val"].streaming_split(2, equal=True)
    out: dict = {}
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            for epoch in range(epochs):
                out[("train", rank, epoch)] = list(
                    iter_batches(train_splits[rank], batch, epoch=epoch, train=True, with_keys=True)
                )
                out[("val", rank, epoch)] = list(
                    iter_batches(val_splits[rank], 2, epoch=epoch, train=False, with_keys=True)
                )
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a split consumer hung"
    _plan_holders_run_without_torch()
    return out


def _plan_holders_run_without_torch() -> None:
    """The split coordinators and the pipeline's state actor, alive now, never loaded torch.

    They only hold the dataset's plan (or the epoch state); read from each live process's own
    memory map, so whatever imported torch there (the plan's functions, their kwargs) shows."""
    import ray
    from ray.util.state import list_actors

    # This session's own instance: other pytest processes may run Ray instances beside it.
    address = ray.get_runtime_context().gcs_address
    actors = [
        a
        for name in ("SplitCoordinator", "PipelineState")
        for a in list_actors(
            address=address, filters=[("class_name", "=", name), ("state", "=", "ALIVE")], detail=True
        )
    ]
    assert {a.class_name for a in actors} == {"SplitCoordinator", "PipelineState"}, actors
    for actor in actors:
        maps = Path(f"/proc/{actor.pid}/maps").read_text()
        assert "libtorch" not in maps, f"{actor.class_name} (pid {actor.pid}) loaded torch"


def test_s3_prepare_then_two_workers_get_disjoint_equal_batches_and_each_val_image_once(
    ray_session, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "cityscapes"
    _cityscapes_tree(src, "train", 7)
    _cityscapes_tree(src, "val", 3)
    for split in ("train", "val"):
        assert main(["data", "prepare", "--dataset", "cityscapes", "--src", str(src), "--dst",
                     f"{s3_bucket}/cs/{split}", "--split", split, "--records-per-shard", "2"]) == 0
    cfg = load_config(None, [
        "data.dataset=cityscapes", f"data.train_uri={s3_bucket}/cs/train", f"data.val_uri={s3_bucket}/cs/val",
        "data.crop_size=[24,32]", "scaling.num_workers=2", "data.batch_size=2",
    ])
    out = _run_splits(build_datasets(cfg), epochs=1, batch=2)

    for epoch in range(1):
        per_rank = [out[("train", r, epoch)] for r in range(2)]
        # 7 records, equal split -> 3 each -> 1 batch of 2 each (remainder dropped); same count per rank
        assert [len(b) for b in per_rank] == [1, 1]
        keys = [[k for b in batches for k in b["key"]] for batches in per_rank]
        assert not set(keys[0]) & set(keys[1])
        for batches in per_rank:
            for b in batches:
                assert b["image"].shape == (2, 3, 24, 32) and b["image"].dtype.is_floating_point
                assert b["mask"].shape == (2, 24, 32) and str(b["mask"].dtype) == "torch.int64"
                assert set(b["mask"].unique().tolist()) <= {0, 13, 255}  # road, car (train ids), ignore

        # val: 3 whole images of different sizes, padded to 4 -> 2 per rank, each real image once
        val = [b for r in range(2) for b in out[("val", r, epoch)]]
        keys = [k for b in val for k in b["key"]]
        real = sorted(k for k in keys if not k.startswith("__pad__/"))
        assert real == [f"city/city_val_{i:06d}_000019" for i in range(3)] and len(keys) == 4
        assert [len(out[("val", r, epoch)]) for r in range(2)] == [1, 1]
        for b in val:
            for i, key in enumerate(b["key"]):
                if key.startswith("__pad__/"):
                    assert (b["mask"][i] == 255).all()
                else:
                    h, w = SIZES[int(key.split("_")[2])]
                    labelled = (b["mask"][i, :h, :w] != 255).sum().item()
                    assert labelled == h * (w - 2)  # whole image, unlabeled column ignored
                    assert (b["mask"][i, h:] == 255).all() and (b["mask"][i, :, w:] == 255).all()


def test_crops_change_every_epoch_and_repeat_for_the_same_seed(ray_session, s3_bucket: str) -> None:
    cfg = load_config(None, [
        f"data.train_uri={s3_bucket}/syn/train", f"data.val_uri={s3_bucket}/syn/val",
        "data.synth.generate=true", "data.synth.num_train=10", "data.synth.num_val=2",
        "data.synth.size=[40,48]",
        "data.crop_size=[32,32]", "seed=3",
    ])
    ensure_synthetic(cfg)
    ensure_synthetic(cfg)  # idempotent

    def epoch_crops(datasets: dict, epoch: int) -> tuple[list[str], dict]:
        order, crops = [], {}
        for b in iter_batches(datasets["train"], 2, epoch=epoch, train=True, with_keys=True):
            for i, key in enumerate(b["key"]):
                order.append(key)
                crops[key] = (b["image"][i].numpy().copy(), b["mask"][i].numpy().copy())
        return order, crops

    first = build_datasets(cfg)
    order0, crops0 = epoch_crops(first, 0)
    order1, crops1 = epoch_crops(first, 1)
    assert len(order0) == len(order1) == 10
    assert order0 != order1  # reshuffled
    assert all(not np.array_equal(crops0[k][0], crops1[k][0]) for k in crops0)  # new crops each epoch

    again = build_datasets(cfg)  # a repeated run: same seed, fresh pipeline state
    order0b, crops0b = epoch_crops(again, 0)
    assert sorted(order0b) == sorted(order0)
    for key, (image, mask) in crops0.items():
        assert np.array_equal(image, crops0b[key][0]) and np.array_equal(mask, crops0b[key][1])


def _bad_set(uri: str) -> None:
    def make(i: int) -> Record:
        img = encode_png(np.full((12, 14, 3), 90, np.uint8))
        mask = encode_png(np.full((12, 14), i % 3, np.uint8))
        return Record(f"rec{i}", b"\x89PNG\r\n broken" if i == 4 else img, mask, 12, 14)

    write_shards(uri, 6, make, spec=synthetic_spec(3), split="train", records_per_shard=3)


def test_bad_record_fails_naming_shard_and_key_or_is_skipped_and_counted(ray_session, tmp_path: Path) -> None:
    uri = str(tmp_path / "bad")
    _bad_set(uri)
    overrides = [f"data.train_uri={uri}", f"data.val_uri={uri}", "data.crop_size=[8,8]"]
    strict = build_datasets(load_config(None, overrides))
    message = r"shard \S*bad/part-00001.parquet record 'rec4': image does not decode"
    with pytest.raises(Exception, match=message):
        list(iter_batches(strict["train"], 1, epoch=0, train=True))

    lenient = build_datasets(load_config(None, [*overrides, "data.max_bad_records=1"]))
    batches = list(iter_batches(lenient["val"], 1, epoch=0, train=False, with_keys=True))
    assert sorted(k for b in batches for k in b["key"]) == ["rec0", "rec1", "rec2", "rec3", "rec5"]
    skipped = bad_records(lenient)
    assert list(skipped) == [f"shard {tmp_path}/bad/part-00001.parquet record 'rec4'"]
    assert "image does not decode" in next(iter(skipped.values()))


def test_missing_or_unreachable_uris_are_named(ray_session, s3_bucket: str, tmp_path: Path) -> None:
    for uri in (str(tmp_path / "absent"), f"{s3_bucket}/empty-prefix", "s3://no-such-bucket-hrt/train"):
        cfg = load_config(None, [f"data.train_uri={uri}", "data.dataset=cityscapes"])
        with pytest.raises(DataError, match=f"{uri}: no readable shard set"):
            build_datasets(cfg)
