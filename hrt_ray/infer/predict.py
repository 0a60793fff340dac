"""``hrt-ray predict``: segment a folder or bucket of images with Ray Data, one label PNG per image.

Design:

* **Plan on the driver** (:func:`plan`): one listing of the source and one of the destination.
  Images whose outputs already exist are dropped here, so a restarted job redoes only what is
  missing, without a per-image existence request to the object store.
* **Read raw bytes** (``read_binary_files(include_paths=True)``) and decode in our own UDF
  (:func:`decode_batch`): an unreadable image becomes a row with its key and the reason instead of
  failing the whole dataset. With GPU actors decoding runs in separate CPU tasks, so the GPU never
  waits on JPEG decoding; on CPU, where both stages ask for the same resources, Ray Data fuses
  decoding into the actor stage (no copy of the pixels through the object store).
* **Infer in an actor pool** (:class:`PredictActor`): the model is loaded once per actor (one GPU
  each when the cluster has GPUs, else CPU threads) and runs exactly the evaluation's inference
  (:class:`~hrt_ray.infer.model.Segmenter`). The actor writes its outputs itself through
  ``hrt_ray.storage.write_bytes`` (atomic), so only a small status row flows back to the driver.
* **Stream**: Ray Data's streaming executor bounds the blocks in flight; the driver consumes the
  status rows as they come, prints progress and finally writes ``predict-report.json``.

* **Restart only what the same settings wrote**: ``predict-settings.json`` in ``--dst`` records
  what determines the label values (checkpoint URI, size and SHA-256, ``--ids``, dataset spec,
  model, channel order, eval mode/scales/flip/crop/stride). A rerun with the same settings resumes
  (skips written outputs); with other settings it refuses and names each difference, unless
  ``--overwrite`` (which first deletes the old ``labels/`` and ``overlays/``). Without this a
  rerun with ``--ids original`` over train-id outputs rewrote nothing and the official
  evaluator scored the stale files.

Output layout under ``--dst``: ``labels/<relative path>.png`` (train ids, or the dataset's
original ids with ``--ids original``): exactly the files a benchmark server takes, nothing else.
With ``--overlay``, ``overlays/<dir>/overlay_<name>.png``: the prefix keeps overlays from
matching the official Cityscapes evaluator's ``<city>_<seq>_<frame>*.png`` search, which
otherwise finds two predictions per image when pointed at ``--dst``.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from hrt_ray import storage
from hrt_ray.config import from_dict, to_dict
from hrt_ray.data import resolve_num_classes
from hrt_ray.data.codec import DataError, decode_image, encode_png
from hrt_ray.data.pipeline import resolve_spec
from hrt_ray.data.specs import spec_from_dict
from hrt_ray.eval.run import checkpoint_file
from hrt_ray.infer.labels import overlay, to_label_image
from hrt_ray.infer.model import InferenceOptions, Segmenter, load_model
from hrt_ray.models.checkpoint import CheckpointError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABELS_DIR = "labels"
OVERLAYS_DIR = "overlays"
REPORT_FILE = "predict-report.json"
SETTINGS_FILE = "predict-settings.json"
OVERLAY_PREFIX = "overlay_"


class PredictError(RuntimeError):
    """The job cannot start (no images, name collisions, bad URIs); the message says which."""


# --------------------------------------------------------------------------------------------
# Planning (driver)
# --------------------------------------------------------------------------------------------


def output_name(rel: str) -> str:
    """``city/a.jpg`` -> ``city/a.png``: the output key of an input's relative path."""
    return posixpath.splitext(rel)[0] + ".png"


def overlay_name(rel: str) -> str:
    """``city/a.jpg`` -> ``city/overlay_a.png``: never the label's name, nor an evaluator's match."""
    head, tail = posixpath.split(output_name(rel))
    return posixpath.join(head, OVERLAY_PREFIX + tail)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    if path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return posixpath.basename(path)


@dataclass
class Plan:
    """What a run will do: ``todo`` input paths (filesystem paths) and how many are already done."""

    src_root: str
    todo: list[str]
    done: int
    total: int


def plan(
    src: str, dst: str, *, overlay: bool, endpoint: str | None = None, redo_all: bool = False
) -> Plan:
    """List ``src`` images, drop those whose outputs exist under ``dst`` (restart), check names.

    ``redo_all`` (``--overwrite``) keeps every image to do whatever exists.
    """
    src_loc = storage.resolve(src, endpoint)
    dst_loc = storage.resolve(dst, endpoint)
    if not storage.exists(src, endpoint):
        raise PredictError(f"{src}: source not found")
    dst_prefix = dst_loc.path.rstrip("/") + "/"
    paths = [
        p
        for p in storage.list_files(src, endpoint=endpoint)
        if p.lower().endswith(IMAGE_SUFFIXES) and not p.startswith(dst_prefix)
    ]
    if not paths:
        raise PredictError(f"{src}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    owners: dict[str, str] = {}
    for p in paths:
        name = output_name(_relative(p, src_loc.path))
        if name in owners:
            raise PredictError(
                f"{owners[name]} and {p} would both write {name}; rename one of them or split the source"
            )
        owners[name] = p
    existing: set[str] = set()
    if storage.exists(dst, endpoint) and not redo_all:
        existing = {_relative(p, dst_loc.path) for p in storage.list_files(dst, ".png", endpoint=endpoint)}
    todo = [
        p
        for name, p in owners.items()
        if f"{LABELS_DIR}/{name}" not in existing
        or (overlay and f"{OVERLAYS_DIR}/{overlay_name(name)}" not in existing)
    ]
    return Plan(src_root=src_loc.path, todo=sorted(todo), done=len(paths) - len(todo), total=len(paths))


# --------------------------------------------------------------------------------------------
# Ray Data stages (workers)
# --------------------------------------------------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], *, src_root: str) -> dict[str, np.ndarray]:
    """Raw file bytes -> RGB pixels as bytes + size, or an ``error`` naming the key."""
    keys, pixels, heights, widths, errors = [], [], [], [], []
    for data, path in zip(batch["bytes"], batch["path"], strict=True):
        key = _relative(str(path), src_root)
        try:
            image = decode_image(bytes(data), key, "RGB")
        except DataError as exc:
            image, error = np.zeros((0, 0, 3), np.uint8), str(exc)
        else:
            error = ""
        keys.append(key)
        pixels.append(np.ascontiguousarray(image).tobytes())
        heights.append(image.shape[0])
        widths.append(image.shape[1])
        errors.append(error)
    return {
        "key": np.array(keys, dtype=object),
        "pixels": np.array(pixels, dtype=object),
        "height": np.array(heights, dtype=np.int32),
        "width": np.array(widths, dtype=np.int32),
        "error": np.array(errors, dtype=object),
    }


class PredictActor:
    """One model per actor; infers a batch of decoded images and writes their PNGs."""

    def __init__(
        self,
        cfg: dict[str, Any],
        checkpoint: str,
        dst: str,
        *,
        spec: dict[str, Any],
        num_classes: int,
        ids: str,
        overlay: bool,
        device: str,
        batch_size: int,
        threads: int,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.cfg = from_dict(cfg, source="predict config", training=False)
        self.segmenter = Segmenter.load(
            self.cfg,
            checkpoint,
            device=device,
            batch_size=batch_size,
            spec=spec_from_dict(spec, "predict driver"),
            num_classes=num_classes,
        )
        self.dst = dst.rstrip("/")
        self.ids = ids
        self.overlay = overlay
        self.endpoint = self.cfg.storage.endpoint

    def _uri(self, folder: str, key: str) -> str:
        name = overlay_name(key) if folder == OVERLAYS_DIR else output_name(key)
        return f"{self.dst}/{folder}/{name}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        errors = [str(e) for e in batch["error"]]
        good = [i for i, e in enumerate(errors) if not e]
        hs, ws = batch["height"], batch["width"]
        px = batch["pixels"]
        images = [np.frombuffer(px[i], np.uint8).reshape(int(hs[i]), int(ws[i]), 3) for i in good]
        start, cpu_start = time.perf_counter(), time.process_time()
        preds = self.segmenter(images) if images else []
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        spec = self.segmenter.spec
        for i, image, pred in zip(good, images, preds, strict=True):
            try:
                label_png = encode_png(to_label_image(pred, spec, self.ids))
                storage.write_bytes(self._uri(LABELS_DIR, keys[i]), label_png, self.endpoint)
                if self.overlay:
                    overlay_png = encode_png(overlay(image, pred, spec))
                    storage.write_bytes(self._uri(OVERLAYS_DIR, keys[i]), overlay_png, self.endpoint)
            except storage.StorageError as exc:
                errors[i] = str(exc)
        per_image, cpu_per_image = np.zeros(len(keys)), np.zeros(len(keys))
        per_image[good] = seconds / max(len(good), 1)
        cpu_per_image[good] = cpu_seconds / max(len(good), 1)
        return {
            "key": np.array(keys, dtype=object),
            "error": np.array(errors, dtype=object),
            "infer_s": per_image,
            "infer_cpu_s": cpu_per_image,
        }


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class PredictSummary:
    src: str
    dst: str
    total: int
    skipped_existing: int
    written: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: Summed model time (normalise + inference) over all images, across workers.
    infer_seconds: float = 0.0
    #: The same in CPU time of the actor processes: unlike wall time, not inflated by other load.
    infer_cpu_seconds: float = 0.0
    workers: int = 0
    device: str = "cpu"
    setting: str = ""

    @property
    def images_per_s(self) -> float:
        return (self.written + len(self.failed)) / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "total": self.total,
            "skipped_existing": self.skipped_existing,
            "written": self.written,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 3),
            "infer_seconds": round(self.infer_seconds, 3),
            "infer_cpu_seconds": round(self.infer_cpu_seconds, 3),
            "workers": self.workers,
            "device": self.device,
            "setting": self.setting,
        }


def file_digest(uri: str, endpoint: str | None) -> tuple[int, str]:
    """(size in bytes, SHA-256) of a file, streamed: the checkpoint's identity, whatever its path."""
    loc = storage.resolve(uri, endpoint)
    digest, size = hashlib.sha256(), 0
    try:
        # A random-access file: each 4 MiB read is one ranged GET (see storage.read_all).
        with loc.filesystem.open_input_file(loc.path) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise PredictError(f"{uri}: cannot read the checkpoint: {exc}") from exc
    return size, digest.hexdigest()


def run_settings(cfg: Any, ckpt: str, spec: Any, num_classes: int, ids: str) -> dict[str, Any]:
    """Everything that decides the label values written: a different value means other labels."""
    size, sha = file_digest(ckpt, cfg.storage.endpoint)
    opts = InferenceOptions.from_config(cfg)
    return {
        "checkpoint": ckpt,
        "checkpoint_bytes": size,
        "checkpoint_sha256": sha,
        "ids": ids,
        "dataset": spec.name,
        "label_mapping": {str(k): v for k, v in sorted((spec.label_mapping or {}).items())},
        "reduce_zero_label": spec.reduce_zero_label,
        "num_classes": num_classes,
        "arch": cfg.model.arch,
        "window_size": cfg.model.window_size,
        "channel_order": cfg.data.channel_order,
        "eval_mode": opts.mode,
        "eval_scales": list(opts.scales),
        "eval_flip": opts.flip,
        "eval_crop": list(opts.crop) if opts.crop else None,
        "eval_stride": list(opts.stride) if opts.stride else None,
    }


def settings_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each setting that differs (the checkpoint path alone is not one)."""
    same_file = (old.get("checkpoint_sha256"), old.get("checkpoint_bytes")) == (
        new["checkpoint_sha256"],
        new["checkpoint_bytes"],
    )
    return [
        f"{key}: {old.get(key)!r} -> {new[key]!r}"
        for key in new
        if old.get(key) != new[key] and not (key == "checkpoint" and same_file)
    ]


def _delete_outputs(dst: str, endpoint: str | None) -> None:
    for folder in (LABELS_DIR, OVERLAYS_DIR):
        uri = f"{dst.rstrip('/')}/{folder}"
        if storage.exists(uri, endpoint):
            loc = storage.resolve(uri, endpoint)
            try:
                loc.filesystem.delete_dir(loc.path)
            except OSError as exc:
                raise PredictError(f"{uri}: cannot delete the old outputs for --overwrite: {exc}") from exc


def claim_destination(dst: str, settings: dict[str, Any], *, overwrite: bool, endpoint: str | None) -> None:
    """Make ``dst`` hold only outputs of ``settings``: resume, refuse, or (``overwrite``) clear it.

    Raises :class:`PredictError` naming each difference when ``dst`` holds outputs of other
    settings, or outputs without a settings record (nothing says what wrote them).
    """
    record = f"{dst.rstrip('/')}/{SETTINGS_FILE}"
    old = json.loads(storage.read_bytes(record, endpoint)) if storage.exists(record, endpoint) else None
    labels = f"{dst.rstrip('/')}/{LABELS_DIR}"
    has_outputs = storage.exists(labels, endpoint) and bool(storage.list_files(labels, ".png", endpoint))
    if old is not None and old != settings:
        diffs = settings_differences(old, settings)
        if diffs and not overwrite:
            raise PredictError(
                f"{dst} holds outputs of other settings ({record}): {'; '.join(diffs)}. Resuming would mix "
                "them; use another --dst, or --overwrite to delete labels/ and overlays/ there first"
            )
    elif old is None and has_outputs and not overwrite:
        raise PredictError(
            f"{labels} holds label files but {record} does not exist, so nothing says which checkpoint "
            "or settings wrote them; use another --dst, or --overwrite to delete labels/ and overlays/ first"
        )
    if overwrite:
        _delete_outputs(dst, endpoint)
    storage.write_bytes(record, json.dumps(settings, indent=2).encode(), endpoint)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def run_predict(
    cfg: Any,
    checkpoint: str,
    src: str,
    dst: str,
    *,
    ids: str = "train",
    overlay: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    workers: int | None = None,
    batch_size: int = 4,
    cpus_per_worker: float = 1.0,
    progress_every_s: float = 5.0,
    log: Any = None,
) -> PredictSummary:
    """Segment every image under ``src`` not yet done into ``dst``; Ray must be initialised.

    ``dst`` resumes only outputs of the same settings (:func:`claim_destination`); ``overwrite``
    replaces outputs of other settings.

    Progress and skipped images go to ``log`` (default: the current ``sys.stderr``).
    """
    log = log or sys.stderr
    if ids not in ("train", "original"):
        raise PredictError(f"ids must be 'train' or 'original', got {ids!r}")
    endpoint = cfg.storage.endpoint
    # Absolute URIs: actors may run in another working directory (or on another node).
    ckpt = storage.resolve(checkpoint_file(checkpoint), endpoint).uri
    dst = storage.resolve(dst, endpoint).uri
    if not storage.exists(ckpt, endpoint):
        raise PredictError(f"{ckpt}: checkpoint not found")
    spec, num_classes = resolve_spec(cfg), resolve_num_classes(cfg)
    try:  # fail here, with the checkpoint's own message, rather than in every actor
        load_model(cfg, ckpt, num_classes)
    except CheckpointError as exc:
        raise PredictError(str(exc)) from exc
    work = plan(src, dst, overlay=overlay, endpoint=endpoint, redo_all=overwrite)
    claim_destination(
        dst, run_settings(cfg, ckpt, spec, num_classes, ids), overwrite=overwrite, endpoint=endpoint
    )
    gpus = cluster_gpus()
    use_gpu = device in ("gpu", "cuda") or (device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise PredictError("--device gpu, but the Ray cluster has no GPUs")
    n_workers = workers or (gpus if use_gpu else 1)
    summary = PredictSummary(
        src=src,
        dst=dst,
        total=work.total,
        skipped_existing=work.done,
        workers=n_workers,
        device="gpu" if use_gpu else "cpu",
        setting=InferenceOptions.from_config(cfg).describe(),
    )
    print(
        f"predict: {work.total} images under {src}; {work.done} already written, {len(work.todo)} to do "
        f"on {n_workers} {summary.device} worker(s) ({summary.setting})",
        file=log,
        flush=True,
    )
    start = time.perf_counter()
    if work.todo:
        fs = storage.resolve(src, endpoint).filesystem
        ds = ray.data.read_binary_files(work.todo, filesystem=fs, include_paths=True)
        ds = ds.map_batches(decode_batch, fn_kwargs={"src_root": work.src_root}, batch_size=8, num_cpus=1)
        ds = ds.map_batches(
            PredictActor,
            fn_constructor_args=(to_dict(cfg), ckpt, dst),
            fn_constructor_kwargs={
                "spec": spec.to_dict(),
                "num_classes": num_classes,
                "ids": ids,
                "overlay": overlay,
                "device": "cuda" if use_gpu else "cpu",
                "batch_size": batch_size,
                "threads": max(1, int(cpus_per_worker)),
            },
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=n_workers),
            num_gpus=1 if use_gpu else 0,
            num_cpus=cpus_per_worker,
        )
        last = start
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            summary.infer_seconds += float(np.sum(batch["infer_s"]))
            summary.infer_cpu_seconds += float(np.sum(batch["infer_cpu_s"]))
            for key, error in zip(batch["key"], batch["error"], strict=True):
                if error:
                    summary.failed[str(key)] = str(error)
                    print(f"predict: skipped {error}", file=log, flush=True)
                else:
                    summary.written += 1
            now = time.perf_counter()
            if now - last >= progress_every_s:
                last = now
                done = summary.written + len(summary.failed)
                print(
                    f"predict: {done}/{len(work.todo)} images ({done / (now - start):.2f} images/s)",
                    file=log,
                    flush=True,
                )
    summary.seconds = time.perf_counter() - start
    storage.write_bytes(
        f"{dst.rstrip('/')}/{REPORT_FILE}", json.dumps(summary.as_json(), indent=2).encode(), endpoint
    )
    return summary
