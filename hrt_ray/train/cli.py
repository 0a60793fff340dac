"""``hrt-ray train [--config CONFIG] [KEY=VALUE ...]``: train (or resume) a run, evaluate, summarise.

With no ``--config`` it runs ``jobs/default.yaml`` from the current directory if present, else
the built-in defaults (tiny model on generated data, 2 CPU workers).

Output: one line per report (a live bar on a terminal), then the evaluation table and the
summary. Ray's own logs stay off the console unless ``-v`` is given; the summary says where
they are. Exit codes: 0 done, 1 training/evaluation failed, 2 a mistake in the config, data,
storage or checkpoint (one line naming it; the config is checked before Ray starts),
130/143 interrupted by SIGINT/SIGTERM (one line saying how to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from hrt_ray.config import ExperimentConfig, load_config
from hrt_ray.ray_local import ensure_ray, logs_dir

DEFAULT_JOB = Path("jobs/default.yaml")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (default: jobs/default.yaml if present)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=2e-4"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    parser.add_argument(
        "--accept-config-change",
        action="store_true",
        help="resume even though the config differs from the checkpoint's (beyond resume-safe keys); "
        "the new values then apply",
    )


def default_config_path(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    return str(DEFAULT_JOB) if DEFAULT_JOB.is_file() else None


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the run was going."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def quiet_libraries(verbose: bool) -> None:
    """Ray Data's progress bars and the driver's library warnings off unless ``verbose``.

    Ray Data copies the driver's ``DataContext`` into the executors of the datasets built
    afterwards, so this covers the split coordinator that feeds the workers too.
    """
    # deferred: `hrt-ray --help` imports this module; Ray Data loads only for a run
    from ray.data import DataContext

    if verbose:
        return
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_interruptibly(target: Any) -> Any:
    """``target()`` in a thread while the main thread turns SIGINT/SIGTERM into :class:`Interrupted`.

    Ray Train installs its own SIGINT handler when ``fit()`` runs on the main thread (and
    SIGTERM's default ends the process mid-shutdown, with a C++ stack dump); from another
    thread it installs none, and the driver decides what an interrupt prints.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = target()
        except BaseException as exc:  # handed to the main thread below
            box["error"] = exc

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread = threading.Thread(target=work, name="hrt-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if "error" in box:
        raise box["error"]
    return box.get("value")


@contextlib.contextmanager
def console_to(log_path: Path, enabled: bool) -> Iterator[TextIO]:
    """While ``enabled``, whatever Python code prints on the driver goes to ``log_path``.

    Yields the real stdout, for the progress lines. Ray's driver prints raylet notices (e.g.
    worker start-up counts) from a background thread straight to ``sys.stdout``; this keeps
    them, and any library chatter, in the run's log instead of between the progress lines.
    """
    real_out, real_err = sys.stdout, sys.stderr
    if not enabled:
        yield real_out
        return
    with log_path.open("a") as log:
        sys.stdout = sys.stderr = log
        try:
            yield real_out
        finally:
            sys.stdout, sys.stderr = real_out, real_err


def _shutdown_ray(timeout_s: float = 30.0) -> None:
    """Stop this driver's Ray work (a local instance stops; a cluster ends the job's actors)."""
    # deferred: `hrt-ray --help` imports this module; Ray loads only for a run
    import ray

    t = threading.Thread(target=ray.shutdown, daemon=True)
    t.start()
    t.join(timeout_s)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(default_config_path(args.config), args.overrides)  # ConfigError: exit 2
    # deferred: `hrt-ray --help` imports this module; torch loads only once the config is valid
    from hrt_ray.train.run_checks import check_run

    check_run(cfg)  # still before Ray starts
    # deferred: `hrt-ray --help` imports this module; the resume check imports torch.distributed
    from hrt_ray.train.resume import check_resume

    # A resume with a changed config or another model is refused before Ray even starts.
    check_resume(cfg, accept_changes=args.accept_config_change)

    verbose = bool(getattr(args, "verbose", False))
    ensure_ray(verbose=verbose)
    quiet_libraries(verbose)
    # the progress relay and the captured driver output; copied to storage, then removed
    with tempfile.TemporaryDirectory(prefix="hrt-train-") as tmp:
        return _train(args, cfg, Path(tmp), verbose)


def _train(args: argparse.Namespace, cfg: ExperimentConfig, scratch: Path, verbose: bool) -> int:
    """Fit, evaluate and summarise ``cfg``, with the relay and driver log under ``scratch``."""
    # deferred: `hrt-ray --help` imports this module; torch and Ray load after the config and resume checks
    from hrt_ray import storage
    from hrt_ray.eval.run import evaluate_checkpoint
    from hrt_ray.infer.visualize import add_tensorboard_panel
    from hrt_ray.train.paths import run_uri
    from hrt_ray.train.progress import Progress, relay_callbacks
    from hrt_ray.train.trainer import TrainError, TrainSummary, fit

    relay, driver_log = str(scratch / "reports.jsonl"), scratch / "driver.log"
    log_uri = f"{run_uri(cfg)}/logs/driver.log"
    evaluated: list[Any] = []  # the final checkpoint's evaluation, printed once the run is over

    def finish(summary: TrainSummary) -> TrainSummary:
        """Evaluation and ``summary.json``, written while the run lock is still held."""
        if not args.no_eval and summary.checkpoint:
            try:
                result = evaluate_checkpoint(cfg, summary.checkpoint)
            except TrainError as exc:
                raise TrainError(f"evaluation failed: {exc}") from exc
            evaluated.append(result)
            done = {"mIoU": result.miou, "setting": result.setting, "json": result.json_uri}
            summary = replace(summary, eval={**done, "scales": result.scales})
        summary = replace(summary, target=cfg.target)
        storage.write_bytes(
            f"{summary.run_dir}/summary.json",
            json.dumps(summary.as_json(), indent=2).encode(),
            cfg.storage.endpoint,
        )
        return summary

    try:
        with console_to(driver_log, enabled=not verbose) as console:
            progress = Progress(relay, cfg.optim.max_iters, cfg.checkpoint.metric, stream=console)
            with progress:
                summary = run_interruptibly(
                    lambda: fit(
                        cfg,
                        callbacks=relay_callbacks(
                            relay, cfg.failure.max_failures, cfg.failure.max_preemption_failures
                        ),
                        accept_config_change=args.accept_config_change,
                        val_panel=add_tensorboard_panel,
                        finish=finish,
                    )
                )
    except Interrupted as exc:
        where = (
            f"last checkpoint at iteration {progress.last_checkpoint_iteration}"
            if progress.last_checkpoint_iteration is not None
            else "no checkpoint yet"
        )
        command = shlex.join(["hrt-ray", *sys.argv[1:]]) if sys.argv[1:] else "the same command"
        print(
            f"interrupted ({exc}): run {cfg.name!r} stopped at iteration {progress.iteration or 0} "
            f"({where}, in {run_uri(cfg)}); resume with: {command}",
            file=sys.stderr,
            flush=True,
        )
        _shutdown_ray()
        _keep_log(driver_log, log_uri, cfg.storage.endpoint)
        return 128 + exc.signum
    except TrainError as exc:
        if verbose:
            traceback.print_exc()
        _keep_log(driver_log, log_uri, cfg.storage.endpoint)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception:
        _keep_log(driver_log, log_uri, cfg.storage.endpoint)
        raise
    logs = logs_dir()
    if not verbose:
        # Ray prints the raylet notices it held back for deduplication when the driver
        # disconnects: let that happen now, into the run's log, not after the summary.
        with console_to(driver_log, enabled=True):
            _shutdown_ray()
    _keep_log(driver_log, log_uri, cfg.storage.endpoint, keep_empty=True)
    for result in evaluated:
        print(result.table())
    print("\n".join(summary.lines()))
    if not verbose:
        print(f"driver log     {log_uri}")
    if logs:
        print(f"worker logs    {logs}" + ("" if verbose else " (on the console with -v)"))
    return 0


def _keep_log(local: Path, uri: str, endpoint: str | None, *, keep_empty: bool = False) -> None:
    """Copy the captured driver output into the run directory (best effort: never masks an error).

    A finished run keeps its log even when empty (``keep_empty``): the summary names the file,
    and an empty log is itself the answer (Ray printed nothing beside the progress lines). A run
    that failed or was stopped keeps it only when there is something in it, so a run refused
    before it started (e.g. the GPU preflight's deadline) leaves no run directory behind.
    """
    # deferred: `hrt-ray --help` imports this module; pyarrow loads only for a run
    from hrt_ray import storage

    if local.is_file() and (keep_empty or local.stat().st_size > 0):
        with contextlib.suppress(Exception):
            storage.write_bytes(uri, local.read_bytes(), endpoint)
