"""Data that is not what the run thinks: each case is refused (or counted) instead of trained on.

Injected faults, all on real shards read by the real pipeline on a local Ray instance:

* ``data.dataset=cityscapes`` over synthetic shards (every pixel would map to ignore);
* shards whose every mask pixel is the ignore label (spec matches, labels carry nothing);
* one zero-byte shard of two (Ray Data skips zero-size files without a word);
* a mistyped ``data.train_uri`` on the embedded default (main generated 256 images there).

``hrt-ray eval`` on worker counts that training refuses is checked on the laptop run's
checkpoint (tests/test_train_output.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hrt_ray.config import ConfigError, load_config
from hrt_ray.data import DataError, bad_records, build_datasets, iter_batches, skipped_records
from hrt_ray.data.codec import encode_png
from hrt_ray.data.guard import LabelledPixelGuard
from hrt_ray.data.shards import Record, write_shards
from hrt_ray.data.specs import synthetic_spec
from hrt_ray.data.synth import ensure_synthetic, synth


def _synth_set(root: Path, num_train: int = 4, per_shard: int = 2) -> tuple[str, str]:
    train, val = str(root / "train"), str(root / "val")
    synth(train, split="train", num=num_train, size=(32, 32), classes=3, records_per_shard=per_shard)
    synth(val, split="val", num=2, size=(32, 32), classes=3)
    return train, val


def _tiny_run(train: str, val: str, storage: Path, name: str, *extra: str):
    return load_config(
        None,
        [
            f"name={name}",
            f"storage.path={storage}",
            f"data.train_uri={train}",
            f"data.val_uri={val}",
            "data.crop_size=[32,32]",
            "data.batch_size=2",
            "scaling.num_workers=1",
            "optim.max_iters=4",
            "optim.warmup_iters=1",
            "loss.ohem_min_kept=100",
            "eval.interval=4",
            "eval.at_start=false",
            "checkpoint.every=4",
            "failure.max_failures=0",
            "failure.stall_timeout_s=240",
            *extra,
        ],
    )


# ------------------------------------------------------------------------------------------
# Spec vs manifest
# ------------------------------------------------------------------------------------------


def test_config_dataset_other_than_the_manifests_is_refused_naming_both(ray_session, tmp_path: Path) -> None:
    train, val = _synth_set(tmp_path)
    cfg = load_config(None, [f"data.train_uri={train}", f"data.val_uri={val}", "data.dataset=cityscapes"])
    with pytest.raises(DataError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert train in message
    assert "written for dataset 'synthetic'" in message and "data.dataset=cityscapes" in message
    assert "label_mapping" in message  # says what differs, not only the names


def test_matching_spec_is_accepted(ray_session, tmp_path: Path) -> None:
    train, val = _synth_set(tmp_path)
    datasets = build_datasets(load_config(None, [f"data.train_uri={train}", f"data.val_uri={val}"]))
    assert set(datasets) == {"train", "val"}
    # Read with the V1 Parquet reader: Ray's V2 reader adds a ListFiles operator that starts a pool
    # of footer-reading actor processes on every epoch and every validation pass.
    for name, ds in datasets.items():
        operators = _operators(ds)
        assert "ReadParquet" in operators, (name, operators)
        assert not any("ListFiles" in op for op in operators), (name, operators)


def _operators(ds) -> list[str]:
    """Names of the dataset's logical operators, from the output back to the reads."""
    names, todo = [], [ds._logical_plan.dag]
    while todo:
        op = todo.pop()
        names.append(op.name)
        todo += op.input_dependencies
    return names


# ------------------------------------------------------------------------------------------
# All-ignore batches
# ------------------------------------------------------------------------------------------


def test_guard_stops_on_an_all_ignore_window_or_epoch_and_passes_real_labels() -> None:
    import torch

    labelled = torch.zeros((2, 8, 8), dtype=torch.int64)
    ignored = torch.full((2, 8, 8), 255, dtype=torch.int64)
    guard = LabelledPixelGuard(255, window=3)
    for _ in range(10):  # a normal run, and a few void-only batches among labelled ones
        guard.update(labelled)
        guard.update(ignored)
    guard.end_epoch(0)
    guard = LabelledPixelGuard(255, window=3, where="rank 0: ")
    guard.update(ignored)
    guard.update(ignored)
    with pytest.raises(
        DataError, match=r"rank 0: 100\.000% of the 384 pixels in the last 3 training batches"
    ):
        guard.update(ignored)
    guard = LabelledPixelGuard(255, window=50)
    guard.update(ignored)
    with pytest.raises(DataError, match=r"data epoch 4 \(1 batches\) are the ignore label 255"):
        guard.end_epoch(4)


@pytest.mark.slow
def test_training_on_all_ignore_masks_stops_with_a_message(ray_session, tmp_path: Path) -> None:
    """Main trained this to the end: loss 0.0, mIoU 0.00, exit 0."""
    from hrt_ray.train.trainer import TrainError, fit

    def record(i: int) -> Record:
        image = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        return Record(f"r{i}", encode_png(image), encode_png(np.full((32, 32), 255, np.uint8)), 32, 32)

    data = tmp_path / "void"
    for split in ("train", "val"):
        write_shards(str(data / split), 4, record, spec=synthetic_spec(3), split=split)
    cfg = _tiny_run(str(data / "train"), str(data / "val"), tmp_path / "runs", "void")
    # A data error is the user's input: the run ends at once with it (not retried, not wrapped).
    pattern = r"100\.000% of the \d+ pixels in data epoch 0 .* ignore label 255"
    with pytest.raises((DataError, TrainError), match=pattern):
        fit(cfg)


# ------------------------------------------------------------------------------------------
# Shards that deliver fewer records than the manifest lists
# ------------------------------------------------------------------------------------------


def test_zero_byte_shard_is_an_error_naming_it(ray_session, tmp_path: Path) -> None:
    train, val = _synth_set(tmp_path)
    (Path(train) / "part-00001.parquet").write_bytes(b"")
    cfg = load_config(None, [f"data.train_uri={train}", f"data.val_uri={val}"])
    with pytest.raises(DataError) as err:
        build_datasets(cfg)
    message = str(err.value)
    assert f"{train}/part-00001.parquet: zero bytes" in message
    assert "2 of 4 records" in message and "data.max_bad_records>=2" in message
    assert "part-00000" not in message


def test_zero_byte_shard_within_max_bad_records_is_counted(ray_session, tmp_path: Path) -> None:
    train, val = _synth_set(tmp_path)
    (Path(train) / "part-00001.parquet").write_bytes(b"")
    cfg = load_config(
        None,
        [
            f"data.train_uri={train}",
            f"data.val_uri={val}",
            "data.max_bad_records=2",
            "data.crop_size=[32,32]",
        ],
    )
    datasets = build_datasets(cfg)
    keys = [
        k for b in iter_batches(datasets["train"], 1, epoch=0, train=True, with_keys=True) for k in b["key"]
    ]
    assert sorted(keys) == ["train/000000", "train/000001"]  # what survived: shard 0, all of it
    assert skipped_records(datasets) == 2  # what was lost: counted, not silent
    assert list(bad_records(datasets)) == [f"shard {train}/part-00001.parquet"]


def test_shard_emptied_after_the_run_started_fails_its_epoch_naming_it(ray_session, tmp_path: Path) -> None:
    """The per-epoch count: what the run reads is checked against the manifest every epoch."""
    train, val = _synth_set(tmp_path)
    datasets = build_datasets(load_config(None, [f"data.train_uri={train}", f"data.val_uri={val}"]))
    first = [
        k for b in iter_batches(datasets["train"], 1, epoch=0, train=True, with_keys=True) for k in b["key"]
    ]
    assert len(first) == 4  # epoch 0: all four records, and no complaint
    (Path(train) / "part-00001.parquet").write_bytes(b"")
    with pytest.raises(Exception, match=rf"{train}/part-00001.parquet"):
        for _ in iter_batches(datasets["train"], 1, epoch=1, train=True):
            pass


def test_truncated_shard_is_named(ray_session, tmp_path: Path) -> None:
    train, val = _synth_set(tmp_path)
    shard = Path(train) / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = load_config(None, [f"data.train_uri={train}", f"data.val_uri={val}"])
    with pytest.raises(DataError, match=rf"{train}/part-00000.parquet: unreadable"):
        build_datasets(cfg)


@pytest.mark.slow
def test_run_summary_carries_the_skip_count(ray_session, tmp_path: Path) -> None:
    from hrt_ray.train.trainer import fit

    train, val = _synth_set(tmp_path, num_train=8, per_shard=4)
    (Path(train) / "part-00001.parquet").write_bytes(b"")
    summary = fit(_tiny_run(train, val, tmp_path / "runs", "skips", "data.max_bad_records=4"))
    assert summary.iteration == 4
    assert summary.skipped_records == 4
    assert "skipped        4 record(s) under data.max_bad_records" in summary.lines()


# ------------------------------------------------------------------------------------------
# Synthetic data only where it belongs
# ------------------------------------------------------------------------------------------


def test_synthetic_data_is_generated_only_at_the_defaults_paths(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    small = ["data.synth.num_train=2", "data.synth.num_val=1", "data.synth.size=[16,16]"]
    typo = load_config(None, ["data.train_uri=data/synthtic/train", *small])
    with pytest.raises(DataError, match=r"data\.train_uri=data/synthtic/train: no shard set there"):
        ensure_synthetic(typo)
    assert not (tmp_path / "data").exists()  # nothing generated, not even the val set
    ensure_synthetic(load_config(None, small))  # the embedded default's own paths
    assert (tmp_path / "data/synthetic/train/manifest.json").is_file()
    assert (tmp_path / "data/synthetic/val/manifest.json").is_file()
    elsewhere = ["data.train_uri=other/train", "data.val_uri=other/val", *small]
    ensure_synthetic(load_config(None, [*elsewhere, "data.synth.generate=true"]))  # asked for
    assert (tmp_path / "other/train/manifest.json").is_file()


# ------------------------------------------------------------------------------------------
# Config error paths
# ------------------------------------------------------------------------------------------


def test_nested_error_paths_name_the_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"<defaults>: data\.synth\.classes: must be >= 2, got 1"):
        load_config(None, ["data.synth.classes=1"])
    with pytest.raises(ConfigError, match=r"data\.synth\.size: must be \[height, width\]"):
        load_config(None, ["data.synth.size=[0,4]"])
