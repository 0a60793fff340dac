"""``hrt-ray bench gpu`` (``make gpu-check``): everything a GPU changes, measured in one command.

Run it once on any new GPU type or driver/torch upgrade, and after changes to the model, AMP or
checkpoint code; it needs one CUDA GPU and about 8 minutes on a large one (H100/H200 class).
Steps, each with its own time limit so one slow step cannot eat the rest:

1. dense bf16 matmul peak, measured (8192^3), beside the datasheet peak of known GPUs;
2. ``bench model`` for HRT-S+OCR and HRT-B+OCR at 8x3x512x1024 in bf16: forward and
   forward+backward images/s, peak memory, MFU (executed FLOPs; forward+backward counted as 3x
   forward) against the datasheet peak, else the measured one; the official implementation
   side by side with ``--official-src``;
3. ``model.compile=true`` (torch.compile) for HRT-S+OCR: compile time and speed-up;
4. the default job (``hrt-ray train``) with ``scaling.use_gpu=true`` and one worker, to a
   checkpoint and an mIoU;
5. ``hrt-ray predict --device gpu`` on a few images from that checkpoint, and the export parity
   check (``hrt-ray export``, then the TorchScript file against the eager model on the GPU).

Prints a table and writes ``benchmarks/gpu-check-<gpu>-<date>.json``. Without a CUDA GPU it
exits 2 at once with a message saying so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Dense (no sparsity) bf16 tensor-core peaks from the vendor datasheets, TFLOP/s. Matched in order
# against torch.cuda.get_device_name(), so the more specific names come first.
DENSE_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),  # AWS's A10G: lower clocks than the A10 below
    ("A10", 125.0),
]

ARCHS = ("hrt_small_ocr", "hrt_base_ocr")
SIZE = (512, 1024)
BATCH = 8


def datasheet_peak(name: str) -> float | None:
    """Dense bf16 TFLOP/s of a known GPU by name, else ``None``."""
    for key, tflops in DENSE_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def measured_matmul_peak(n: int = 8192, iters: int = 20) -> float:
    """Dense bf16 matmul TFLOP/s measured on this GPU (the best of ``iters``)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best / 1e12


def _model_spec(arch: str, impl: str, iters: int, official_src: str | None, compile_: bool) -> dict[str, Any]:
    return {
        "arch": arch,
        "size": SIZE,
        "batch": BATCH,
        "num_classes": 19,
        "window_size": None,
        "iters": iters,
        "warmup": 2,
        "threads": None,
        "channels_last": False,
        "compile": compile_,
        "checkpointing": False,
        "official_src": official_src,
        "impl": impl,
    }


def _model_row(r: dict[str, Any], peak_tflops: float) -> dict[str, Any]:
    fwd_tflops = r["flops"] / r["fwd_s"] / 1e12
    train_tflops = 3 * r["flops"] / r["fwd_bwd_s"] / 1e12
    return {
        **r,
        "fwd_images_per_s": BATCH / r["fwd_s"],
        "fwd_bwd_images_per_s": BATCH / r["fwd_bwd_s"],
        "fwd_mfu": fwd_tflops / peak_tflops,
        "fwd_bwd_mfu": train_tflops / peak_tflops,
    }


def _run(cmd: list[str], timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _hrt_ray() -> list[str]:
    return [sys.executable, "-m", "hrt_ray"]


def _train_default_job(work: Path) -> dict[str, Any]:
    """The default job on one GPU worker via the CLI; its summary.json (checkpoint, mIoU)."""
    storage = work / "runs"
    start = time.perf_counter()
    proc = _run(
        [
            *_hrt_ray(),
            "train",
            "name=gpu-check",
            f"storage.path={storage}",
            "scaling.use_gpu=true",
            "scaling.num_workers=1",
            "optim.amp=bf16",
        ],
        timeout=240,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"hrt-ray train failed ({proc.returncode}): {proc.stderr[-3000:]}")
    summary = json.loads((storage / "gpu-check" / "summary.json").read_text())
    return {"seconds": seconds, "summary": summary, "stdout_tail": proc.stdout[-1500:]}


def _predict_and_export(work: Path, checkpoint: str) -> dict[str, Any]:
    """``hrt-ray predict`` on the GPU and the export parity check, the TorchScript file run on the GPU."""
    src, dst = work / "images", work / "labels"
    src.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (256, 512, 3), dtype=np.uint8)).save(src / f"img{i}.png")
    start = time.perf_counter()
    proc = _run(
        [
            *_hrt_ray(),
            "predict",
            "--checkpoint",
            checkpoint,
            "--src",
            str(src),
            "--dst",
            str(dst),
            "--device",
            "gpu",
        ],
        timeout=150,
    )
    predict_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"hrt-ray predict failed ({proc.returncode}): {proc.stderr[-3000:]}")
    written = sorted(p.name for p in dst.rglob("*.png"))
    if len(written) < 8:
        raise RuntimeError(f"hrt-ray predict wrote {len(written)} of 8 label maps")

    ts_path = work / "model.ts"
    proc = _run(
        [*_hrt_ray(), "export", "--checkpoint", checkpoint, "--format", "torchscript", "--out", str(ts_path)],
        timeout=150,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hrt-ray export failed ({proc.returncode}): {proc.stderr[-3000:]}")
    # deferred: Ray Data, albumentations and the eval stack load only on a GPU box (run() checks first)
    from hrt_ray.config import load_config
    from hrt_ray.data import resolve_num_classes
    from hrt_ray.infer.model import load_model

    cfg = load_config(None)  # the embedded default (jobs/default.yaml is the same, tested)
    model = load_model(cfg, checkpoint, resolve_num_classes(cfg)).cuda().eval()
    model.channels_last = False
    exported = torch.jit.load(str(ts_path), map_location="cuda").eval()
    meta = json.loads(Path(f"{ts_path}.json").read_text())
    x = torch.randn(*meta["input"]["shape"], device="cuda")
    with torch.no_grad():
        ref = model(x)["out"]
        got = exported(x)
    diff = float((got - ref).abs().max())
    agreement = float((got.argmax(1) == ref.argmax(1)).float().mean())
    return {
        "predict_seconds": predict_s,
        "predict_stdout_tail": proc.stdout[-500:],
        "export_cpu_check": meta["check"],
        "gpu_max_abs_diff": diff,
        "gpu_argmax_agreement": agreement,
        "gpu_parity_ok": agreement >= 0.999 and diff <= 1e-3 * max(float(ref.abs().max()), 1.0),
    }


def _perf_row(label: str, impl: str, r: dict[str, Any], note: str) -> tuple[str, ...]:
    return (
        label,
        impl,
        f"{r['fwd_images_per_s']:.1f}",
        f"{r['fwd_bwd_images_per_s']:.1f}",
        f"{r['peak_bytes'] / 2**30:.1f} GiB",
        f"{100 * r['fwd_mfu']:.1f}%",
        f"{100 * r['fwd_bwd_mfu']:.1f}%",
        note,
    )


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print(
            "gpu-check: no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch",
            file=sys.stderr,
        )
        return 2
    # deferred: the benchmark stack loads only once a GPU is known to be there (no GPU: told in seconds)
    from hrt_ray.bench.model import _measure_in_child

    began = time.perf_counter()
    name = torch.cuda.get_device_name()
    measured = measured_matmul_peak()
    sheet = datasheet_peak(name)
    peak = sheet or measured
    report: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gpu": name,
        "gpu_count": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "load_average": os.getloadavg(),
        "peak_bf16_tflops": {"datasheet": sheet, "measured_matmul": measured, "used_for_mfu": peak},
        "input": {"batch": BATCH, "size": list(SIZE), "dtype": "bf16 autocast"},
        "steps": {},
    }
    failures: list[str] = []
    rows = [("step", "impl", "fwd img/s", "fwd+bwd img/s", "peak mem", "MFU fwd", "MFU fwd+bwd", "note")]

    def record(step: str, fn) -> Any:
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # one failed step must not hide the others' figures
            failures.append(f"{step}: {type(exc).__name__}: {exc}")
            report["steps"][step] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"gpu-check: {step} FAILED: {exc}", file=sys.stderr, flush=True)
            return None
        report["steps"][step] = {
            **(out if isinstance(out, dict) else {"result": out}),
            "step_seconds": time.perf_counter() - t,
        }
        return out

    if "model" not in args.skip:
        impls = ["hrt-ray"] + (["official"] if args.official_src else [])
        for arch in ARCHS:
            for impl in impls:

                def measure(arch: str = arch, impl: str = impl) -> dict[str, Any]:
                    r = _measure_in_child(_model_spec(arch, impl, args.iters, args.official_src, False))
                    if "error" in r:
                        raise RuntimeError(r["error"])
                    return _model_row(r, peak)

                r = record(f"model/{arch}/{impl}", measure)
                if r:
                    rows.append(_perf_row(arch, impl, r, f"{r['flops'] / 1e9:.0f} GFLOP fwd"))

    if "compile" not in args.skip:

        def compiled() -> dict[str, Any]:
            eager = report["steps"].get("model/hrt_small_ocr/hrt-ray")
            if not eager or "error" in eager:
                spec = _model_spec(ARCHS[0], "hrt-ray", args.iters, None, False)
                eager = _model_row(_measure_in_child(spec), peak)
            r = _measure_in_child(_model_spec(ARCHS[0], "hrt-ray", args.iters, None, True))
            if "error" in r:
                raise RuntimeError(r["error"])
            r = _model_row(r, peak)
            return {
                **r,
                "compile_seconds_fwd": r["fwd_warmup_s"] - eager["fwd_warmup_s"],
                "compile_seconds_fwd_bwd": r["fwd_bwd_warmup_s"] - eager["fwd_bwd_warmup_s"],
                "speedup_fwd": eager["fwd_s"] / r["fwd_s"],
                "speedup_fwd_bwd": eager["fwd_bwd_s"] / r["fwd_bwd_s"],
            }

        r = record("compile/hrt_small_ocr", compiled)
        if r:
            note = (
                f"compile {r['compile_seconds_fwd']:.0f}+{r['compile_seconds_fwd_bwd']:.0f} s, "
                f"x{r['speedup_fwd']:.2f}/x{r['speedup_fwd_bwd']:.2f}"
            )
            rows.append(_perf_row(ARCHS[0], "compiled", r, note))

    with tempfile.TemporaryDirectory(prefix="hrt-gpu-check-") as tmp:
        work = Path(tmp)
        trained = None
        if "train" not in args.skip:
            trained = record("train/default-job-1-gpu", lambda: _train_default_job(work))
            if trained:
                s = trained["summary"]
                miou = (s.get("eval") or {}).get("mIoU", s.get("final_miou"))
                rows.append(
                    (
                        "default job",
                        "1 GPU worker",
                        "-",
                        "-",
                        "-",
                        "-",
                        "-",
                        f"{s['iteration']} it, mIoU {miou}, {trained['seconds']:.0f} s",
                    )
                )
        if "predict" not in args.skip:
            if trained:
                ckpt = trained["summary"]["checkpoint"]
                r = record("predict+export", lambda: _predict_and_export(work, ckpt))
                if r:
                    rows.append(
                        (
                            "predict+export",
                            "GPU",
                            "-",
                            "-",
                            "-",
                            "-",
                            "-",
                            f"parity {'ok' if r['gpu_parity_ok'] else 'FAILED'} "
                            f"(max diff {r['gpu_max_abs_diff']:.1e})",
                        )
                    )
                    if not r["gpu_parity_ok"]:
                        failures.append("predict+export: exported model differs from eager on the GPU")
            else:
                failures.append("predict+export: skipped, no checkpoint from the train step")

    report["total_seconds"] = time.perf_counter() - began
    report["failures"] = failures
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = out_dir / f"gpu-check-{slug}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M}.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(
        f"\ngpu-check on {name}: bf16 peak {peak:.0f} TFLOP/s "
        f"({'datasheet' if sheet else 'measured'}; measured matmul {measured:.0f}); "
        f"{report['total_seconds']:.0f} s in all"
    )
    print(_table(rows))
    print(f"wrote {out}")
    if failures:
        print("gpu-check: FAILED steps:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
