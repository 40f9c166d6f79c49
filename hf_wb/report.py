"""``hf-wb report RUN_DIR``: one PNG of a run's weights, biases, gradients and learning rates, and its diagnostics.

The report reads every TensorBoard event file under ``RUN_DIR`` (the Trainer's ``output_dir`` or any folder inside
it), as written by :class:`~hf_wb.callbacks.WeightHistogramCallback`, the Trainer's ``TensorBoardCallback`` and
``WBTrainer``, and draws:

* one row per unit (embeddings, blocks, head; at most :data:`MAX_UNIT_ROWS`, evenly spread over depth) with the
  distribution over training steps of its weights (norm weights left out: they sit around 1), biases and gradients,
  as heat maps: x is the step, y the value, the colour the share of values in each bin at that step;
* the training loss, the learning rate of every param group (``train/lr/<group>`` logged by ``WBTrainer``, else the
  callback's ``lr/<group>``, else ``train/learning_rate``), the gradient norm of every unit and the update-to-weight
  ratio of every unit (with the ~1e-3 rule of thumb);
* the findings of :class:`~hf_wb.callbacks.WeightDiagnosticsCallback` (``diagnostics.json``), which ``main`` also
  prints as a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_wb.extras import require

logger = logging.getLogger(__name__)

__all__ = ["RunData", "load_run", "render_report", "findings_table", "main", "MAX_UNIT_ROWS"]

MAX_UNIT_ROWS = 8
SMALL_GROUP = 32  # groups with at most this many values (an output bias) are drawn as mean and range lines
_Y_BINS = 80


@dataclass
class Histogram:
    step: int
    edges: np.ndarray  # len(counts) + 1
    counts: np.ndarray
    total: float = 0.0  # sum of the values

    @property
    def num(self) -> float:
        return float(self.counts.sum())


@dataclass
class RunData:
    """Scalars and histograms of a run, merged over all its event files, and its diagnostics findings."""

    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    findings: list[dict[str, Any]] = field(default_factory=list)
    event_dirs: list[str] = field(default_factory=list)


def _event_dirs(run_dir: Path) -> list[Path]:
    dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*") if p.is_file()})
    return dirs


def _find_diagnostics(run_dir: Path) -> Path | None:
    from hf_wb.callbacks.diagnostics import DIAGNOSTICS_FILE

    for folder in [run_dir, *list(run_dir.parents)[:2]]:
        if (folder / DIAGNOSTICS_FILE).is_file():
            return folder / DIAGNOSTICS_FILE
    found = sorted(run_dir.rglob(DIAGNOSTICS_FILE))
    return found[0] if found else None


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read every event file under ``run_dir`` (and ``diagnostics.json`` in it, or up to two folders above it).

    When the same tag appears in several event folders, the series with the most points is kept.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ValueError: no TensorBoard event file under ``run_dir``.
    """
    require("tensorboard", feature="Reading a run's TensorBoard events (hf-wb report)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"`RUN_DIR`={str(run)!r} is not a folder; pass the Trainer's output_dir.")
    dirs = _event_dirs(run)
    if not dirs:
        raise ValueError(
            f"No TensorBoard event files under {str(run)!r}. Train with WeightHistogramCallback (WBConfig."
            "histogram_steps > 0) or report_to='tensorboard', then pass the run's output_dir."
        )
    data = RunData(event_dirs=[str(d) for d in dirs])
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"histograms": 0, "scalars": 0, "tensors": 1}).Reload()
        tags = acc.Tags()
        for tag in tags.get("scalars", []):
            series = [(e.step, float(e.value)) for e in acc.Scalars(tag)]
            if len(series) > len(data.scalars.get(tag, [])):
                data.scalars[tag] = series
        for tag in tags.get("histograms", []):
            series = [_histogram(e.step, e.histogram_value) for e in acc.Histograms(tag)]
            series = [h for h in series if h is not None]
            if len(series) > len(data.histograms.get(tag, [])):
                data.histograms[tag] = series
    for series in (*data.scalars.values(), *data.histograms.values()):
        series.sort(key=lambda x: x[0] if isinstance(x, tuple) else x.step)
    path = _find_diagnostics(run)
    if path is not None:
        try:
            data.findings = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("Could not read %s: %s", path, exc)
    return data


def _histogram(step: int, value: Any) -> Histogram | None:
    limits = np.asarray(list(value.bucket_limit), dtype=float)
    counts = np.asarray(list(value.bucket), dtype=float)
    if counts.size == 0 or counts.sum() <= 0:
        return None
    left = min(float(value.min), limits[0]) if np.isfinite(value.min) else limits[0]
    edges = np.concatenate([[left], limits])
    # TensorFlow-style histograms have +-DBL_MAX outer limits: clip them to the data range
    edges = np.clip(edges, float(value.min), float(value.max)) if value.max > value.min else edges
    return Histogram(step, edges, counts, float(value.sum))


def _rebin(h: Histogram, grid: np.ndarray) -> np.ndarray:
    """Counts of ``h`` on the bins of ``grid``, assuming values spread evenly inside each bucket."""
    cdf = np.concatenate([[0.0], np.cumsum(h.counts)])
    edges = h.edges.copy()
    # make the edges strictly increasing for interpolation
    edges = np.maximum.accumulate(edges + np.arange(edges.size) * 1e-15 * max(1.0, np.abs(edges).max()))
    return np.diff(np.interp(grid, edges, cdf, left=0.0, right=cdf[-1]))


def _pooled_range(series: list[Histogram], tail: float = 0.005) -> tuple[float, float]:
    """Central ``1 - 2 tail`` range of the values of all steps pooled, each step weighing the same."""
    lo, hi = min(h.edges[0] for h in series), max(h.edges[-1] for h in series)
    if not hi > lo:
        return lo, hi
    grid = np.linspace(lo, hi, 4001)
    pooled = sum(_rebin(h, grid) / max(h.counts.sum(), 1e-300) for h in series)
    cdf = np.concatenate([[0.0], np.cumsum(pooled)])
    cdf /= cdf[-1]
    return float(np.interp(tail, cdf, grid)), float(np.interp(1 - tail, cdf, grid))


def _merge(series_list: list[list[Histogram]]) -> list[Histogram]:
    """Pool several histogram series (e.g. a unit's attn and ffn weights) step by step."""
    if len(series_list) == 1:
        return series_list[0]
    steps = sorted(set.intersection(*(set(h.step for h in s) for s in series_list)))
    merged = []
    for step in steps:
        hs = [next(h for h in s if h.step == step) for s in series_list]
        grid = np.unique(np.concatenate([h.edges for h in hs]))  # every bucket edge: no resolution lost
        if grid.size < 2:
            grid = np.array([grid[0] - 1e-8, grid[0] + 1e-8])
        merged.append(Histogram(step, grid, sum(_rebin(h, grid) for h in hs), sum(h.total for h in hs)))
    return merged


def _units(data: RunData) -> list[str]:
    """Units in forward order, from the ``weight_norm/<unit>`` scalars (else the histogram tags)."""
    units = [t.split("/", 1)[1] for t in data.scalars if t.startswith("weight_norm/")]
    if not units:
        units = list(dict.fromkeys(_unit_of(t) for t in data.histograms))
    return units


def _unit_of(tag: str) -> str:
    parts = tag.split("/")[1:]
    if parts and parts[-1] in {"attn", "ffn", "norm"}:
        parts = parts[:-1]
    return "/".join(parts)


def _pick_rows(units: list[str], limit: int) -> list[str]:
    if len(units) <= limit:
        return units
    idx = sorted({round(i * (len(units) - 1) / (limit - 1)) for i in range(limit)})
    return [units[i] for i in idx]


def _unit_series(data: RunData, kind: str, unit: str) -> list[Histogram] | None:
    if kind == "weights":
        tags = [t for t in data.histograms if t.startswith("weights/") and _unit_of(t) == unit]
        tags = [t for t in tags if not t.endswith("/norm")] or tags
    else:
        tags = [t for t in data.histograms if t == f"{kind}/{unit}"]
    if not tags:
        return None
    return _merge([data.histograms[t] for t in tags])


def _heatmap(ax, series: list[Histogram], title: str) -> None:
    import matplotlib.colors as mcolors

    lo, hi = _pooled_range(series)
    if not hi > lo:
        lo, hi = min(h.edges[0] for h in series), max(h.edges[-1] for h in series)
    if not hi > lo:
        lo, hi = lo - 1e-3, hi + 1e-3
    grid = np.linspace(lo, hi, _Y_BINS + 1)
    columns = []
    for h in series:
        c = _rebin(h, grid)
        total = h.counts.sum()
        columns.append(c / total if total > 0 else c)
    z = np.array(columns).T  # (bins, steps)
    steps = np.array([h.step for h in series], dtype=float)
    if steps.size == 1:
        x_edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    else:
        mids = (steps[1:] + steps[:-1]) / 2
        x_edges = np.concatenate([[steps[0] - (mids[0] - steps[0])], mids, [steps[-1] + (steps[-1] - mids[-1])]])
    positive = z[z > 0]
    vmin = max(positive.min(), 1e-4) if positive.size else 1e-4
    ax.pcolormesh(
        x_edges,
        grid,
        np.maximum(z, vmin),
        cmap="magma",
        norm=mcolors.LogNorm(vmin=vmin, vmax=max(z.max(), vmin * 10)),
        shading="flat",
    )
    ax.set_title(title, fontsize=8, loc="left")
    ax.tick_params(labelsize=7)
    if lo < 0 < hi:
        ax.axhline(0.0, color="white", lw=0.4, alpha=0.5)


def _range_lines(ax, series: list[Histogram], title: str) -> None:
    steps = [h.step for h in series]
    ax.fill_between(steps, [h.edges[0] for h in series], [h.edges[-1] for h in series], color="C1", alpha=0.3,
                    label="min to max")  # fmt: skip
    ax.plot(steps, [h.total / h.num for h in series], color="C1", lw=1.2, label="mean")
    ax.set_title(title, fontsize=8, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, frameon=False, loc="best")


def _lr_series(data: RunData) -> dict[str, list[tuple[int, float]]]:
    for prefix in ("train/lr/", "lr/"):
        found = {t[len(prefix) :]: s for t, s in data.scalars.items() if t.startswith(prefix)}
        if found:
            return found
    if "train/learning_rate" in data.scalars:
        return {"learning_rate": data.scalars["train/learning_rate"]}
    return {}


def _lines(ax, series: dict[str, list[tuple[int, float]]], title: str, log: bool = False, max_legend: int = 10):
    import matplotlib

    if not series:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, fontsize=9, color="grey")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    cmap = matplotlib.colormaps["viridis"]
    n = len(series)
    for i, (name, points) in enumerate(series.items()):
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        if log:
            ys = [y if y > 0 and math.isfinite(y) else np.nan for y in ys]
        ax.plot(
            xs,
            ys,
            color=cmap(i / max(1, n - 1)) if n > 1 else "C0",
            lw=1.2,
            marker="." if len(xs) < 30 else None,
            label=name,
        )
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if 1 < n <= max_legend:
        ax.legend(fontsize=6, ncol=2 if n > 5 else 1, frameon=False)
    elif n > max_legend:
        ax.text(
            0.99,
            0.98,
            f"{n} series, bottom (dark) to top (light)",
            ha="right",
            va="top",
            fontsize=6,
            transform=ax.transAxes,
        )


def findings_table(findings: Sequence[dict[str, Any]], width: int = 119) -> str:
    """The findings as a plain-text table (step, severity, kind, layers, message)."""
    if not findings:
        return "No diagnostics findings."
    rows = [("step", "severity", "kind", "layers", "message")]
    for f in findings:
        layers = f.get("layers", [])
        shown = ", ".join(layers[:3]) + (f" (+{len(layers) - 3})" if len(layers) > 3 else "")
        rows.append((str(f.get("step", "")), f.get("severity", ""), f.get("kind", ""), shown, f.get("message", "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    widths = [min(w, 40) for w in widths]
    rest = max(20, width - sum(widths) - 8)
    lines = []
    for j, r in enumerate(rows):
        cells = [r[i][: widths[i]].ljust(widths[i]) for i in range(4)]
        msg = textwrap.wrap(r[4], rest) or [""]
        lines.append("  ".join([*cells, msg[0]]))
        pad = "  ".join(" " * w for w in widths)
        lines.extend(f"{pad}  {m}" for m in msg[1:])
        if j == 0:
            lines.append("-" * min(width, sum(widths) + 8 + rest))
    advice = {f.get("kind"): f.get("advice", "") for f in findings}
    lines.append("")
    for kind, text in advice.items():
        lines.extend(textwrap.wrap(f"advice for {kind}: {text}", width, subsequent_indent="    "))
    return "\n".join(lines)


def render_report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Render the report of the run in ``run_dir`` to a PNG (default ``<run_dir>/hf_wb_report.png``); return it."""
    return _render(load_run(run_dir), run_dir, output)


def _render(data: RunData, run_dir: str | os.PathLike, output: str | os.PathLike | None) -> Path:
    # a bare Figure (Agg canvas) rather than pyplot: no global backend switch, nothing left open
    require("matplotlib", feature="Rendering the report (hf-wb report)")
    from matplotlib.figure import Figure

    output = Path(output) if output is not None else Path(run_dir) / "hf_wb_report.png"
    units = _pick_rows(_units(data), MAX_UNIT_ROWS)
    kinds = [k for k in ("weights", "biases", "grads") if any(_unit_series(data, k, u) for u in units)]
    n_rows = len(units) if kinds else 0
    n_findings = min(len(data.findings), 8)
    height = 1.55 * n_rows + 3.2 + (0.28 * n_findings + 0.5 if data.findings else 0) + 0.8
    fig = Figure(figsize=(15, height), dpi=110)
    ratios = [1.55] * n_rows + [3.2] + ([0.28 * n_findings + 0.5] if data.findings else [])
    grid = fig.add_gridspec(
        len(ratios), 1, height_ratios=ratios, hspace=0.45, top=1 - 0.8 / height, bottom=0.03, left=0.05, right=0.98
    )
    fig.suptitle(f"hf-wb report: {Path(run_dir).resolve().name}", fontsize=12, x=0.01, ha="left")
    if n_rows:
        fig.text(
            0.99,
            1 - 0.25 / height,
            "heat maps: x = step, y = value, colour = share of the unit's values in each bin at that step (log; black "
            "= none); central 99% of values shown",
            ha="right",
            va="top",
            fontsize=7,
            color="dimgrey",
        )

    if n_rows:
        heat = grid[:n_rows].subgridspec(n_rows, len(kinds), hspace=0.6, wspace=0.18)
        labels = {"weights": "weights", "biases": "biases", "grads": "gradients (after clipping)"}
        for r, unit in enumerate(units):
            for c, kind in enumerate(kinds):
                ax = fig.add_subplot(heat[r, c])
                series = _unit_series(data, kind, unit)
                if series and max(h.num for h in series) <= SMALL_GROUP:
                    _range_lines(ax, series, f"{unit} {labels[kind]} ({int(series[-1].num)} values)")
                elif series:
                    _heatmap(ax, series, f"{unit} {labels[kind]}")
                else:
                    ax.set_axis_off()
                    ax.set_title(f"{unit} {labels[kind]}: none", fontsize=8, loc="left", color="grey")
                if r == n_rows - 1:
                    ax.set_xlabel("step", fontsize=7)
    bottom = grid[n_rows].subgridspec(1, 4, wspace=0.25)
    loss = {k: v for k, v in data.scalars.items() if k == "train/loss"}
    _lines(fig.add_subplot(bottom[0, 0]), {"loss": loss["train/loss"]} if loss else {}, "training loss")
    _lines(fig.add_subplot(bottom[0, 1]), _lr_series(data), "learning rate per param group", log=True)
    grads = {t.split("/", 1)[1]: s for t, s in data.scalars.items() if t.startswith("grad_norm/")}
    _lines(fig.add_subplot(bottom[0, 2]), grads, "gradient norm per unit", log=True)
    ratios_ = {t.split("/", 1)[1]: s for t, s in data.scalars.items() if t.startswith("update_ratio/")}
    ax = fig.add_subplot(bottom[0, 3])
    _lines(ax, ratios_, "update / weight ratio per unit", log=True)
    if ratios_:
        ax.axhline(1e-3, color="red", lw=0.8, ls="--", alpha=0.7)
        ax.text(ax.get_xlim()[0], 1e-3, " ~1e-3", color="red", fontsize=6, va="bottom")
    if data.findings:
        ax = fig.add_subplot(grid[n_rows + 1])
        ax.set_axis_off()
        lines = [f"Diagnostics ({len(data.findings)} findings):"]
        for f in data.findings[:n_findings]:
            layers = ", ".join(f.get("layers", [])[:4]) + (" ..." if len(f.get("layers", [])) > 4 else "")
            lines.append(
                f"  step {f.get('step')}: [{f.get('severity')}] {f.get('kind')} in {layers}: {f.get('message', '')}"[
                    :200
                ]
            )
        ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace", transform=ax.transAxes)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    return output


def main(argv: list[str] | None = None) -> int:
    """``hf-wb report RUN_DIR [--output PNG]``."""
    parser = argparse.ArgumentParser(
        prog="hf-wb report",
        description="Render a PNG of a run's weight/bias/gradient distributions, learning rates and gradient norms "
        "from its TensorBoard event files, and print its diagnostics.",
    )
    parser.add_argument("run_dir", help="the Trainer's output_dir (or any folder holding the run's event files)")
    parser.add_argument("--output", "-o", default=None, help="PNG to write (default RUN_DIR/hf_wb_report.png)")
    args = parser.parse_args(argv)
    try:
        data = load_run(args.run_dir)
        path = _render(data, args.run_dir, args.output)
        findings = data.findings
    except (FileNotFoundError, ValueError) as exc:
        print(f"hf-wb report: error: {exc}", file=sys.stderr)
        return 2
    print(f"Report written to {path}")
    print(findings_table(findings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
