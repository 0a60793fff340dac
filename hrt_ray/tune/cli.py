"""``hrt-ray tune``: run a window-size x learning-rate sweep with Ray Tune, print and save the table.

    hrt-ray tune --config jobs/ablations/<name>.yaml [KEY=VALUE ...]   start a sweep
    hrt-ray tune --resume SWEEP_DIR                                   continue an interrupted one
    hrt-ray tune --report SWEEP_DIR                                   rebuild its table and plot

Overrides address the sweep file's keys (``num_samples=2``, ``scheduler.kind=fifo``) and, under
``experiment.``, the base experiment's (``experiment.optim.max_iters=2000``).
Exit codes: 0 every trial finished or was stopped early, 1 a trial failed, 2 bad config, an
existing/missing sweep or an unsatisfiable resource request, 130 interrupted (resumable).
"""

from __future__ import annotations

import argparse
import sys

from hrt_ray.config import ConfigError
from hrt_ray.ray_local import ensure_ray


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="sweep YAML (see jobs/ablations/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides of the sweep file, e.g. num_samples=2 or experiment.optim.lr=2e-4",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="SWEEP_DIR",
        help="continue the sweep in SWEEP_DIR (or the one --config names); finished trials are not rerun",
    )
    parser.add_argument("--report", metavar="SWEEP_DIR", help="only rebuild the table and plot of SWEEP_DIR")
    parser.add_argument(
        "--eval-best",
        action="store_true",
        help="evaluate the best trial's best checkpoint with the experiment's eval settings afterwards",
    )
    parser.add_argument("--endpoint", help="S3-compatible endpoint for a SWEEP_DIR on object storage")


def _load(args: argparse.Namespace):  # -> Sweep
    # deferred: `hrt-ray --help` imports this module; the sweep config imports pyarrow (storage)
    from hrt_ray.tune.config import load_saved_sweep, load_sweep

    directory = args.report if args.report else args.resume
    if directory:
        if args.config or args.overrides:
            raise ConfigError(
                "--resume/--report SWEEP_DIR runs the sweep saved there; drop --config and overrides"
            )
        return load_saved_sweep(directory, args.endpoint)
    if not args.config:
        raise ConfigError("give --config SWEEP_YAML (see jobs/ablations/), or --resume/--report SWEEP_DIR")
    sweep = load_sweep(args.config, args.overrides)
    if args.resume == "":  # `--config X --resume`: the sweep X names, as saved when it started
        return load_saved_sweep(sweep.directory, sweep.endpoint)
    return sweep


def run(args: argparse.Namespace) -> int:
    try:
        sweep = _load(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    # deferred: `hrt-ray --help` imports this module; Ray Tune and torch load after the sweep is checked
    from hrt_ray.train.trainer import ResourceError
    from hrt_ray.tune.results import write_report
    from hrt_ray.tune.sweep import SweepError, run_sweep, sweep_exists

    ensure_ray()
    if args.report:
        if not sweep_exists(sweep):
            print(f"error: {sweep.directory}: no trials recorded yet (start it first)", file=sys.stderr)
            return 2
        report = write_report(sweep)
        print(report.table)
        _print_paths(report)
        return 0
    try:
        outcome = run_sweep(sweep, resume=args.resume is not None)
    except (SweepError, ResourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = outcome.report
    print(report.table)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(report.counts().items()))
    print(
        f"\nsweep          {sweep.config.name}: {len(report.rows)} trials ({counts}) "
        f"in {outcome.wall_s:.0f} s, up to {outcome.concurrency} at once"
    )
    _print_paths(report)
    if report.best is not None:
        print(f"best           {report.best.run_name}: {report.best.checkpoint or 'no checkpoint'}")
    if outcome.interrupted:
        print(f"interrupted: resume with `hrt-ray tune --resume {outcome.directory}`", file=sys.stderr)
        return 130
    if args.eval_best and report.best is not None and report.best.checkpoint:
        # deferred: `hrt-ray --help` imports this module; torch and Ray load only for --eval-best
        from hrt_ray.eval.run import evaluate_checkpoint

        best = report.best
        result = evaluate_checkpoint(sweep.trial_config(best.params, best.run_name), best.checkpoint)
        print(result.table())
        print(f"eval           {result.json_uri}")
    failed = report.counts().get("error", 0)
    if failed:
        print(f"error: {failed} trial(s) failed (see the status column)", file=sys.stderr)
        return 1
    return 0


def _print_paths(report) -> None:  # report: hrt_ray.tune.results.Report
    print(f"table          {report.csv_uri}\n               {report.markdown_uri}")
    print(f"plot           {report.plot_uri}")
