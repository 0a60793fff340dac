"""``hrt-ray bench model``: parameters, FLOPs, forward and forward+backward time, peak memory.

With ``--official-src PATH`` (a checkout of HRNet/HRFormer, not shipped with us) the official
implementation is imported from that path at run time and measured the same way on the same
input, so the two can be compared side by side. Each implementation runs in its own process so
that the CPU high-water mark of resident memory (``ru_maxrss``) belongs to it alone.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hrt_ray.models import build_model, list_models
from hrt_ray.models.upsample_conv import factorisation

# Official window variants: our name -> (official backbone config name, window size).
_OFFICIAL_ARCHS = {
    "hrt_small_ocr": ("hrt_small", 7),
    "hrt_base_ocr": ("hrt_base", 7),
    "hrt_base_w13_ocr": ("hrt_base_win13", 13),
    "hrt_base_w15_ocr": ("hrt_base_win15", 15),
}


# --------------------------------------------------------------------------------------------------
# The official implementation, imported from a user checkout.
# --------------------------------------------------------------------------------------------------


def _stand_in(name: str, **attrs: Any) -> None:
    """Register a module the official code imports but that is absent or moved in current releases."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def build_official_model(src: str, arch: str, num_classes: int, window_size: int | None = None):
    """The official ``HRT_*_OCR_V2`` network from the checkout at ``src``, with plain BatchNorm.

    The official ``seg/lib`` code needs ``einops`` and ``yacs``. Two of its imports no longer
    exist in current releases and only serve unrelated code paths: ``torchvision.models.utils``
    (removed from torchvision) and ``timm``'s ``to_2tuple``/``trunc_normal_``/``register_model``;
    small stand-ins are registered for those when they cannot be imported. The backbone selector
    (which imports every backbone family) is replaced by one that builds the HRT backbone.
    """
    if arch not in _OFFICIAL_ARCHS:
        raise ValueError(
            f"--official-src: no official counterpart for {arch!r}; known: {', '.join(_OFFICIAL_ARCHS)}"
        )
    seg = Path(src) / "seg" if (Path(src) / "seg" / "lib").is_dir() else Path(src)
    if not (seg / "lib" / "models" / "nets" / "hrt.py").is_file():
        raise FileNotFoundError(
            f"--official-src {src}: not an HRNet/HRFormer checkout (no seg/lib/models/nets/hrt.py)"
        )
    missing = [m for m in ("einops", "yacs") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"--official-src needs {', '.join(missing)}: pip install {' '.join(missing)}"
        )
    if str(seg) not in sys.path:
        sys.path.insert(0, str(seg))
    try:
        importlib.import_module("timm.models.layers")
    except ImportError:

        def to_2tuple(x):
            return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

        _stand_in("timm")
        _stand_in("timm.models")
        _stand_in("timm.models.layers", to_2tuple=to_2tuple, trunc_normal_=nn.init.trunc_normal_)
        _stand_in("timm.models.registry", register_model=lambda f: f)
    try:
        importlib.import_module("torchvision.models.utils")
    except ImportError:
        for name in ("torchvision", "torchvision.models"):
            try:
                importlib.import_module(name)
            except ImportError:
                _stand_in(name)
        _stand_in("torchvision.models.utils", load_state_dict_from_url=torch.hub.load_state_dict_from_url)

    hrt_config = importlib.import_module("lib.models.backbones.hrt.hrt_config")
    hrt_backbone = importlib.import_module("lib.models.backbones.hrt.hrt_backbone")
    name, published = _OFFICIAL_ARCHS[arch]
    cfg = hrt_config.MODEL_CONFIGS[name].clone()
    if window_size is not None and window_size != published:
        for stage in ("STAGE2", "STAGE3", "STAGE4"):
            cfg[stage].NUM_WINDOW_SIZES = [window_size] * len(cfg[stage].NUM_WINDOW_SIZES)

    class BackboneSelector:
        def __init__(self, configer) -> None:
            pass

        def get_backbone(self):
            return hrt_backbone.HighResolutionTransformer(cfg)

    _stand_in("lib.models.backbones.backbone_selector", BackboneSelector=BackboneSelector)
    nets = importlib.import_module("lib.models.nets.hrt")
    nets.BackboneSelector = BackboneSelector  # the module may be cached from an earlier call

    class Configer:
        def get(self, *keys: str):
            return {("data", "num_classes"): num_classes, ("network", "bn_type"): "torchbn"}[keys]

    net_cls = nets.HRT_SMALL_OCR_V2 if name == "hrt_small" else nets.HRT_BASE_OCR_V2
    return _plain_batchnorm(net_cls(Configer()))


def _plain_batchnorm(module):
    """Replace ``SyncBatchNorm`` by ``BatchNorm2d`` (same keys and state) for single-process runs."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            _plain_batchnorm(child)
    return module


def _official_as_dict(net):
    """Wrap the official network so it returns our ``{"out", "aux"}`` dict instead of ``(aux, out)``."""
    class OfficialAsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            aux, out = self.net(x)
            return {"out": out, "aux": aux}

    return OfficialAsDict()


# --------------------------------------------------------------------------------------------------
# Measurement (runs in a child process per implementation).
# --------------------------------------------------------------------------------------------------


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU flash attention (not in torch's table): 2*B*H*L*S*(E + Ev)."""
    b, h, lq, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * s * (e + ev)


def count_flops(model, images) -> int:
    """Forward FLOPs (one multiply-add = 2), attention included."""
    custom = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        custom[op] = _sdpa_cpu_flops  # keyed by the overload packet, as torch's own table
    with FlopCounterMode(display=False, custom_mapping=custom) as counter, torch.no_grad():
        model(images)
    return int(counter.get_total_flops())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if spec["impl"] == "official":
        model = _official_as_dict(
            build_official_model(spec["official_src"], spec["arch"], spec["num_classes"], spec["window_size"])
        )
        if spec["checkpointing"]:
            raise ValueError("--checkpointing applies to hrt-ray's model only")
    else:
        model = build_model(
            spec["arch"],
            spec["num_classes"],
            spec["window_size"],
            activation_checkpointing=spec["checkpointing"],
            channels_last=spec["channels_last"],
        )
    if spec["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    h, w = spec["size"]
    images = torch.randn(spec["batch"], 3, h, w, device=device)
    if spec["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    flops = count_flops(model, images)
    nominal_flops = flops
    if spec["impl"] != "official":
        with factorisation(False):  # the published arithmetic: upsample, concatenate, convolve
            nominal_flops = count_flops(model, images)
    run_model = torch.compile(model) if spec["compile"] else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    warmup_s: dict[str, float] = {}

    def timed(step) -> tuple[list[float], list[float]]:
        """Wall-clock and process CPU seconds per step (CPU time is the steadier figure on a busy box)."""
        start = time.perf_counter()
        for _ in range(spec["warmup"]):
            step()
        sync()
        # With --compile the warm-up holds the compilation: gpu-check reports it as compile time.
        warmup_s[step.__name__] = time.perf_counter() - start
        times, cpu = [], []
        for _ in range(spec["iters"]):
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            sync()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        return times, cpu

    def forward() -> None:
        with torch.no_grad(), autocast:
            run_model(images)

    def forward_backward() -> None:
        for p in model.parameters():
            p.grad = None
        with autocast:
            out = run_model(images)
            loss = out["out"].float().mean() + 0.4 * out["aux"].float().mean()
        loss.backward()

    rss_before = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.eval()
    fwd, fwd_cpu = timed(forward)
    fwd_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    fwd_bwd, fwd_bwd_cpu = timed(forward_backward)
    return {
        "impl": spec["impl"],
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "threads": torch.get_num_threads(),
        "params": params,
        "flops": flops,
        "nominal_flops": nominal_flops,
        "fwd_s": statistics.median(fwd),
        "fwd_bwd_s": statistics.median(fwd_bwd),
        "fwd_cpu_s": statistics.median(fwd_cpu),
        "fwd_bwd_cpu_s": statistics.median(fwd_bwd_cpu),
        "fwd_peak_bytes": fwd_peak,
        "peak_bytes": torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_bytes": None if cuda else rss_before,
        "fwd_warmup_s": warmup_s["forward"],
        "fwd_bwd_warmup_s": warmup_s["forward_backward"],
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def _child(spec: dict[str, Any], queue) -> None:
    try:
        queue.put(_measure(spec))
    except BaseException as exc:  # report the failure to the parent instead of hanging it
        queue.put({"impl": spec["impl"], "error": f"{type(exc).__name__}: {exc}"})


def _measure_in_child(spec: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    if args.arch not in list_models():
        print(f"unknown --arch {args.arch!r}; known: {', '.join(list_models())}", file=sys.stderr)
        return 2
    if args.batch < 1 or args.iters < 1:
        print("--batch and --iters must be >= 1", file=sys.stderr)
        return 2
    impls = [] if args.only_official else ["hrt-ray"]
    if args.official_src:
        impls.append("official")
    if not impls:
        print("--only-official needs --official-src", file=sys.stderr)
        return 2
    base = {
        "arch": args.arch,
        "size": args.size,
        "batch": args.batch,
        "num_classes": args.num_classes,
        "window_size": args.window_size,
        "iters": args.iters,
        "warmup": args.warmup,
        "threads": args.threads,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "checkpointing": args.checkpointing,
        "official_src": args.official_src,
    }
    h, w = args.size
    print(
        f"bench model: {args.arch} input {args.batch}x3x{h}x{w}, "
        f"median of {args.iters} after {args.warmup} warm-up"
    )
    results = []
    for impl in impls:
        r = _measure_in_child({**base, "impl": impl})
        if "error" in r:
            print(f"{impl}: failed: {r['error']}", file=sys.stderr)
            return 1
        results.append(r)
        print(
            f"{impl:>8}: device {r['device']} ({r['threads']} threads)\n"
            f"          params {r['params']:,}  forward FLOPs {r['flops'] / 1e9:.1f} G"
            + (
                f" executed ({r['nominal_flops'] / 1e9:.1f} G as upsample-then-convolve in the OCR head)"
                if r["nominal_flops"] != r["flops"]
                else ""
            )
            + "\n"
            f"          forward {r['fwd_s'] * 1e3:.0f} ms ({args.batch / r['fwd_s']:.2f} images/s)  "
            f"forward+backward {r['fwd_bwd_s'] * 1e3:.0f} ms ({args.batch / r['fwd_bwd_s']:.2f} images/s)\n"
            f"          process CPU time: forward {r['fwd_cpu_s']:.2f} s, "
            f"forward+backward {r['fwd_bwd_cpu_s']:.2f} s\n"
            + (
                f"          peak memory {_gib(r['peak_bytes'])} (CUDA max allocated; forward only "
                f"{_gib(r['fwd_peak_bytes'])})"
                if r["rss_before_bytes"] is None
                else f"          peak RSS {_gib(r['peak_bytes'])} "
                f"(after model build {_gib(r['rss_before_bytes'])}; "
                f"growth {_gib(r['peak_bytes'] - r['rss_before_bytes'])})"
            )
        )
    if len(results) == 2:
        ours, official = results
        print(
            f"speed-up vs official: forward {official['fwd_s'] / ours['fwd_s']:.2f}x, "
            f"forward+backward {official['fwd_bwd_s'] / ours['fwd_bwd_s']:.2f}x (CPU time: forward "
            f"{official['fwd_cpu_s'] / ours['fwd_cpu_s']:.2f}x, forward+backward "
            f"{official['fwd_bwd_cpu_s'] / ours['fwd_bwd_cpu_s']:.2f}x); "
            f"peak memory ratio (ours/official) {ours['peak_bytes'] / official['peak_bytes']:.2f}"
        )
    return 0
