"""The sweep's outcome: one row per trial, a table (printed, CSV, Markdown) and a plot (PNG).

Rows are read back from the sweep directory (Tune's experiment state and each trial's reported
results), not from the driver's memory, so the table of a resumed sweep covers the trials run
before the interruption too, and ``hrt-ray tune --report DIR`` rebuilds it at any time.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import matplotlib
from matplotlib.figure import Figure
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial

from hrt_ray import storage
from hrt_ray.config import to_dict
from hrt_ray.train.meter import is_finite_number
from hrt_ray.tune.config import SEARCH_KEY, SEARCH_KEYS, Sweep, config_value, trial_run_name

#: Status of a trial in the table.
COMPLETED = "completed"
STOPPED = "stopped early"
ERROR = "error"
UNFINISHED = "unfinished"


@dataclass
class TrialRow:
    trial_id: str
    run_name: str
    params: dict[str, Any]
    status: str
    #: The last iteration a validation (a result Tune saw) was reported at.
    iterations: int
    best: float | None
    best_iteration: int | None
    #: The checkpoint saved with the best validation (``None`` if that was the one at start).
    checkpoint: str | None
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


def _checkpoint_uri(sweep: Sweep, path: str) -> str:
    """A URI for a checkpoint path Tune recorded (without its scheme on object storage)."""
    root = sweep.directory
    if "://" in root and "://" not in path:
        return f"{urlsplit(root).scheme}://{path.lstrip('/')}"
    return path


def tune_storage(sweep: Sweep) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Tune: local path, or bucket path + pyarrow fs."""
    if not storage.is_remote(sweep.storage):
        return sweep.storage, None
    loc = storage.resolve(sweep.storage, sweep.endpoint)
    return loc.path, loc.filesystem


def collect(sweep: Sweep) -> list[TrialRow]:
    """Every trial of the sweep, best first (trials without a value of the metric last)."""
    path, fs = tune_storage(sweep)
    analysis = ExperimentAnalysis(
        f"{path}/{sweep.config.name}",
        storage_filesystem=fs,
        default_metric=sweep.config.metric,
        default_mode=sweep.config.mode,
    )
    metric, sign = sweep.config.metric, (1 if sweep.config.mode == "max" else -1)
    rows = []
    for trial in analysis.trials:
        params = {k: trial.config[k] for k in sweep.config.search.dimensions() if k in trial.config}
        df = analysis.trial_dataframes.get(trial.trial_id)
        # By iteration: a resumed trial hands Tune its checkpoint's report again (tune/trial.py).
        curve: dict[int, float] = {}
        best, best_iter, best_ckpt = None, None, None
        if df is not None and not df.empty and metric in df.columns and "iteration" in df.columns:
            has_ckpt = "checkpoint_path" in df.columns
            for _, rec in df.iterrows():
                value, it = rec[metric], rec["iteration"]
                if not (is_finite_number(value) and is_finite_number(it)):
                    continue
                curve[int(it)] = float(value)
                if best is None or sign * value > sign * best:
                    best, best_iter = float(value), int(it)
                    ckpt = rec["checkpoint_path"] if has_ckpt else None
                    best_ckpt = _checkpoint_uri(sweep, ckpt) if isinstance(ckpt, str) and ckpt else None
        iterations = max(curve, default=0)
        if trial.status == Trial.ERROR:
            status = ERROR
        elif trial.status == Trial.TERMINATED:
            status = COMPLETED if iterations >= sweep.base.optim.max_iters else STOPPED
        else:
            status = UNFINISHED
        error = None
        if status == ERROR:
            err = trial.get_error()
            error = str(err).strip().splitlines()[-1] if err is not None else "see the trial's error.txt"
        rows.append(
            TrialRow(
                trial_id=trial.trial_id,
                run_name=trial_run_name(trial.trial_id, params),
                params=params,
                status=status,
                iterations=iterations,
                best=best,
                best_iteration=best_iter,
                checkpoint=best_ckpt,
                curve=sorted(curve.items()),
                error=error,
            )
        )
    rows.sort(key=lambda r: (r.best is None, -sign * (r.best if r.best is not None else 0.0), r.trial_id))
    return rows


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _fmt_param(key: str, value: Any) -> str:
    return "-" if value is None else SEARCH_KEY[key].cell(value)


def _metric_cell(sweep: Sweep, value: float | None) -> str:
    if value is None:
        return "n/a"
    # IoU/accuracy metrics print in percent, as the paper tables do.
    return f"{100 * value:.2f}" if sweep.config.metric.startswith("val/") else f"{value:.4g}"


def table_columns(sweep: Sweep) -> list[str]:
    dims = [
        "window_size",
        "lr",
        *[d for d in sweep.config.search.dimensions() if d not in ("window_size", "lr")],
    ]
    return ["trial", *dims, "iterations", f"best {sweep.config.metric}", "status"]


def table_cells(sweep: Sweep, rows: list[TrialRow]) -> list[list[str]]:
    dims = table_columns(sweep)[1:-3]
    base = to_dict(sweep.base)
    defaults = {k.name: config_value(base, k.path) for k in SEARCH_KEYS}
    if defaults["window_size"] is None:  # the base leaves it to the architecture
        defaults["window_size"] = "arch"
    out = []
    for r in rows:
        cells = [r.trial_id]
        cells += [_fmt_param(d, r.params.get(d, defaults[d])) for d in dims]
        status = r.status if r.error is None else f"{r.status}: {r.error}"
        cells += [str(r.iterations), _metric_cell(sweep, r.best), status]
        out.append(cells)
    return out


def format_table(sweep: Sweep, rows: list[TrialRow]) -> str:
    header = table_columns(sweep)
    cells = table_cells(sweep, rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def to_csv(sweep: Sweep, rows: list[TrialRow]) -> str:
    """Machine-readable: raw numbers (metric as reported, not percent), plus checkpoint and run."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    dims = table_columns(sweep)[1:-3]
    writer.writerow(
        [
            "trial",
            *dims,
            "iterations",
            f"best {sweep.config.metric}",
            "best_iteration",
            "status",
            "checkpoint",
            "run",
            "error",
        ]
    )
    for r in rows:
        writer.writerow(
            [
                r.trial_id,
                *[r.params.get(d, "") for d in dims],
                r.iterations,
                "" if r.best is None else repr(r.best),
                "" if r.best_iteration is None else r.best_iteration,
                r.status,
                r.checkpoint or "",
                f"{sweep.runs_root}/{r.run_name}",
                r.error or "",
            ]
        )
    return buf.getvalue()


def to_markdown(sweep: Sweep, rows: list[TrialRow]) -> str:
    header = table_columns(sweep)
    if sweep.config.metric.startswith("val/"):
        header[-2] += " (%)"
    lines = [
        f"# Sweep {sweep.config.name}",
        "",
        f"Base experiment: `{sweep.config.base or 'built-in defaults'}`; metric `{sweep.config.metric}` "
        f"({sweep.config.mode}); scheduler {sweep.config.scheduler.kind}; {len(rows)} trials.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += [
        "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_cells(sweep, rows)
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def plot(sweep: Sweep, rows: list[TrialRow]) -> bytes:
    """PNG: best metric against learning rate (one line per window size), and every trial's
    validation curve (dashed: stopped early)."""
    matplotlib.use("Agg")
    scale = 100.0 if sweep.config.metric.startswith("val/") else 1.0
    unit = " (%)" if scale == 100.0 else ""
    fig = Figure(figsize=(12, 4.8), dpi=100)
    ax_lr, ax_curve = fig.subplots(1, 2)

    # One line per window size (per window x other searched keys, when more than lr varies).
    others = [d for d in sweep.config.search.dimensions() if d not in ("window_size", "lr")]
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.best is None:
            continue
        window = r.params.get("window_size", sweep.base.model.window_size)
        label = f"window {window}" if window is not None else "window (arch default)"
        label += "".join(f", {_fmt_param(k, r.params.get(k))}" for k in others)
        groups.setdefault(label, []).append((float(r.params.get("lr", sweep.base.optim.lr)), r.best * scale))
    # Natural order: "window 7" before "window 13".
    natural = lambda label: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", label)]  # noqa: E731
    for label, points in sorted(groups.items(), key=lambda kv: natural(kv[0])):
        points.sort()
        ax_lr.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("learning rate")
    ax_lr.set_ylabel(f"best {sweep.config.metric}{unit}")
    ax_lr.set_title(f"{sweep.config.name}: best {sweep.config.metric} vs learning rate")
    ax_lr.grid(True, which="both", alpha=0.3)
    if groups:
        ax_lr.legend(fontsize="small")

    for r in sorted(rows, key=lambda r: r.trial_id):
        if not r.curve:
            continue
        style = "--" if r.status == STOPPED else "-"
        ax_curve.plot(
            [c[0] for c in r.curve], [c[1] * scale for c in r.curve], style, marker=".", label=r.run_name
        )
    ax_curve.set_xlabel("iteration")
    ax_curve.set_ylabel(f"{sweep.config.metric}{unit}")
    ax_curve.set_title("validation per trial (dashed: stopped early)")
    ax_curve.grid(True, alpha=0.3)
    if any(r.curve for r in rows):
        ax_curve.legend(fontsize="x-small", ncol=1 if len(rows) <= 12 else 2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@dataclass
class Report:
    rows: list[TrialRow]
    table: str
    csv_uri: str
    markdown_uri: str
    plot_uri: str

    @property
    def best(self) -> TrialRow | None:
        return self.rows[0] if self.rows and self.rows[0].best is not None else None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def write_report(sweep: Sweep) -> Report:
    """Collect the rows and write ``results.csv``, ``results.md`` and ``sweep.png`` in the sweep dir."""
    rows = collect(sweep)
    base = sweep.directory
    report = Report(
        rows=rows,
        table=format_table(sweep, rows),
        csv_uri=f"{base}/results.csv",
        markdown_uri=f"{base}/results.md",
        plot_uri=f"{base}/sweep.png",
    )
    storage.write_bytes(report.csv_uri, to_csv(sweep, rows).encode(), sweep.endpoint)
    storage.write_bytes(report.markdown_uri, to_markdown(sweep, rows).encode(), sweep.endpoint)
    storage.write_bytes(report.plot_uri, plot(sweep, rows), sweep.endpoint)
    return report
