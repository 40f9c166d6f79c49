"""``hf-wb report RUN_DIR``: one PNG that says what fine-tuning did to a run's weights, and its diagnostics.

The report reads every TensorBoard event file under ``RUN_DIR`` (the Trainer's ``output_dir`` or any folder inside
it), as written by :class:`~hf_wb.callbacks.WeightHistogramCallback`, the Trainer's ``TensorBoardCallback`` and
``WBTrainer``, and ``diagnostics.json``. Every panel shares one step axis that starts at 0; each diagnostics finding
is a dotted vertical line at its step on every panel (red critical, orange warning, grey info), numbered on the loss
panel and listed at the bottom. From the top:

* the training loss with the eval loss, the eval metric(s) (``eval/<metric>``), the learning rate of every param
  group (``train/lr/<group>`` logged by ``WBTrainer``, else the callback's ``lr/<group>``, else
  ``train/learning_rate``), and the output bias over time: for a classifier the class probabilities the bias alone
  implies (``softmax(b)``; ``sigmoid(b)`` multi-label; ``b`` for regression) as lines, with the label prior (or
  mean target) as dashed lines in the same colours, noted when the hf_wb recipe set the bias to it at step 0;
* per unit (embeddings, blocks, head; colours bottom to top): the drift from the start ``||W - W0|| / ||W0||``, the
  update ratio of one step ``||dW|| / ||W||`` (with the ~1e-3 rule of thumb) and the gradient norm;
* one line naming the frozen units (no gradient, drift 0) and their share of the values, instead of rows of identical
  pictures;
* one row per trained unit (at most :data:`MAX_UNIT_ROWS`, spread over depth) with heat maps of the distribution of
  ``W - W0`` (weights, then biases) and of the gradients: x is the step (a column covers the steps since the
  previous histogram), y the value, the colour the share of values in each bin. Fine-tuning moves weights by a tiny
  fraction of their spread, so the distribution of ``W`` itself barely changes; its drift shows what training did.
  Runs recorded without drift (older event files, ``drift=False``) get the raw weight and bias distributions;
* the diagnostics findings, which ``main`` also prints as a table with their advice.

A run trained with a winning ticket applied (``hf-wb ticket``'s ``round_<r>`` folders, or any run of a model with
:func:`hf_wb.tickets.load_ticket` masks) gets one more panel next to the gradient norms: the sparsity per unit (bars,
the fraction of zeros in each unit's pruned weight matrices), from the run's ``hf_wb_summary.json`` (per unit) or
else its ``hf_wb_ticket.json`` (per pruned module); ``main`` prints it too. A dense round 0 gets no panel.
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

__all__ = [
    "RunData",
    "load_run",
    "render_report",
    "build_figure",
    "findings_table",
    "sparsity_text",
    "main",
    "MAX_UNIT_ROWS",
]

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
    sparsity: dict[str, float] = field(default_factory=dict)  # unit (or pruned module) -> fraction of zeros
    sparsity_total: float | None = None
    sparsity_source: str = ""


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


def _find_file(run_dir: Path, name: str) -> Path | None:
    for folder in [run_dir, *list(run_dir.parents)[:2]]:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_sparsity(run_dir: Path, data: RunData) -> None:
    """The pruning masks the run trained with: per unit from ``hf_wb_summary.json``, else per pruned module from
    ``hf_wb_ticket.json`` (in ``run_dir`` or up to two folders above it); nothing for a dense run."""
    from hf_wb.summary import SUMMARY_NAME

    path = _find_file(run_dir, SUMMARY_NAME)
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("sparsity") if path else None
        if recorded:
            data.sparsity, data.sparsity_total = dict(recorded["units"]), float(recorded["total"])
            data.sparsity_source = str(path)
            return
        path = _find_file(run_dir, "hf_wb_ticket.json")  # = hf_wb.tickets.TICKET_NAME, without importing torch
        ticket = json.loads(path.read_text(encoding="utf-8")).get("sparsity") if path else None
        if ticket and ticket.get("total"):
            data.sparsity_total = float(ticket.pop("total"))
            data.sparsity, data.sparsity_source = {k: float(v) for k, v in ticket.items()}, str(path)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        logger.warning("Could not read the run's sparsity from %s: %s", path, exc)


def load_run(run_dir: str | os.PathLike) -> RunData:
    """Read every event file under ``run_dir`` (and ``diagnostics.json`` in it, or up to two folders above it; the
    sparsity of a pruned run from ``hf_wb_summary.json`` or ``hf_wb_ticket.json``, likewise).

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
    _read_sparsity(run, data)
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


_SEVERITY_COLOURS = {"critical": "red", "warning": "darkorange", "info": "grey"}
_EVAL_SKIP = {"loss", "runtime", "samples_per_second", "steps_per_second", "epoch"}


def _max_step(data: RunData) -> int:
    steps = [s for series in data.scalars.values() for s, _ in series[-1:]]
    steps += [series[-1].step for series in data.histograms.values() if series]
    return max(steps, default=1) or 1


def _trainable_units(data: RunData, units: list[str]) -> list[str]:
    """Units that trained: they have gradients or a drift from the start."""
    marks = ("grad_norm/", "drift_ratio/", "update_ratio/")
    seen = {t.split("/", 1)[1] for t in data.scalars if t.startswith(marks)}
    seen |= {_unit_of(t) for t in data.histograms if t.startswith(("grads/", "drift/"))}
    return [u for u in units if u in seen]


def _unit_sizes(data: RunData) -> dict[str, int]:
    """Number of parameter values of each unit, from the counts of its first weight and bias histograms."""
    sizes: dict[str, int] = {}
    for tag, series in data.histograms.items():
        if tag.startswith(("weights/", "biases/")) and series:
            unit = _unit_of(tag)
            sizes[unit] = sizes.get(unit, 0) + int(round(series[0].num))
    return sizes


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _unit_colours(units: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    n = len(units)
    return {u: cmap(0.9 * i / max(1, n - 1)) for i, u in enumerate(units)}


def _mark_findings(ax, findings: Sequence[dict[str, Any]], numbers: bool = False) -> None:
    """A dotted vertical line at the step of each finding (red critical, orange warning, grey info)."""
    import matplotlib.transforms as mtransforms

    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for i, f in enumerate(findings, 1):
        step = f.get("step")
        if not isinstance(step, (int, float)):
            continue
        colour = _SEVERITY_COLOURS.get(f.get("severity"), "grey")
        ax.axvline(step, color=colour, lw=0.9, ls=":", alpha=0.9, zorder=5)
        if numbers:
            ax.text(step, 1.0, str(i), transform=trans, color=colour, fontsize=7, ha="center", va="bottom",
                    fontweight="bold", clip_on=False)  # fmt: skip


def _heatmap(ax, series: list[Histogram], title: str, symmetric: bool = False) -> None:
    import matplotlib.colors as mcolors

    lo, hi = _pooled_range(series)
    if not hi > lo:
        lo, hi = min(h.edges[0] for h in series), max(h.edges[-1] for h in series)
    if symmetric:
        lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
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
    # column i covers (previous step, step]: what happened since the last histogram; the axis starts at 0
    width = float(np.diff(steps).min()) if steps.size > 1 else max(steps[0], 1.0)
    x_edges = np.concatenate([[max(steps[0] - width, 0.0)], steps])
    if x_edges[1] <= x_edges[0]:
        x_edges[1] = x_edges[0] + 0.5
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
        found = {k: v for k, v in found.items() if not k.endswith("no_decay")} or found
        if found:
            return found
    if "train/learning_rate" in data.scalars:
        return {"learning_rate": data.scalars["train/learning_rate"]}
    return {}


def _lines(
    ax,
    series: dict[str, list[tuple[int, float]]],
    title: str,
    log: bool = False,
    max_legend: int = 10,
    colours: dict[str, Any] | None = None,
    empty: str = "not logged",
):
    import matplotlib

    ax.set_title(title, fontsize=9, loc="left")
    if not series:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey")
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        return
    cmap = matplotlib.colormaps["viridis"]
    n = len(series)
    for i, (name, points) in enumerate(series.items()):
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        if log:
            ys = [y if y > 0 and math.isfinite(y) else np.nan for y in ys]
        colour = (colours or {}).get(name) or (cmap(0.9 * i / max(1, n - 1)) if n > 1 else "C0")
        ax.plot(xs, ys, color=colour, lw=1.2, marker="." if len(xs) < 30 else None, label=name)
    if log:
        ax.set_yscale("log")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if 1 < n <= max_legend:
        ax.legend(fontsize=6, ncol=2 if n > 5 else 1, frameon=False)
    elif n > max_legend:
        ax.text(0.99, 0.98, f"{n} series, bottom (dark) to top (light)", ha="right", va="top", fontsize=6,
                transform=ax.transAxes)  # fmt: skip


def _loss_panel(ax, data: RunData) -> None:
    train = data.scalars.get("train/loss")
    evals = data.scalars.get("eval/loss")
    series = {}
    if train:
        series["training loss"] = train
    if evals:
        series["eval loss"] = evals
    _lines(ax, series, "loss (training, eval)", colours={"training loss": "C0", "eval loss": "C3"})
    for line in ax.get_lines():
        if line.get_label() == "eval loss":
            line.set_linestyle("--")
            line.set_marker("o")
            line.set_markersize(3)


def _eval_panel(ax, data: RunData) -> None:
    metrics = {t[len("eval/") :]: s for t, s in data.scalars.items() if t.startswith("eval/")}
    metrics = {k: v for k, v in metrics.items() if k not in _EVAL_SKIP}
    if len(metrics) == 2 and "combined_score" in metrics:  # one metric: combined_score repeats it
        metrics.pop("combined_score")
    _lines(ax, metrics, "eval metric", empty="no evaluation logged\n(set eval_strategy)")
    for line in ax.get_lines():
        line.set_marker("o")
        line.set_markersize(3)
    if metrics:
        name, points = next(iter(metrics.items()))
        best = max(points, key=lambda p: p[1])
        ax.annotate(f"best {best[1]:.3f} @ {best[0]}", (best[0], best[1]), fontsize=6, xytext=(3, -9),
                    textcoords="offset points")  # fmt: skip


def _head_panel(ax, data: RunData) -> None:
    implied = {t: s for t, s in data.scalars.items() if t.startswith("head/implied/")}
    if not implied:
        series = data.histograms.get("biases/head")
        if series:
            _range_lines(ax, series, f"output bias ({int(series[-1].num)} values)")
        else:
            _lines(ax, {}, "output bias")
        return
    link = next(iter(implied)).split("/")[2]
    classes = sorted(implied, key=lambda t: int(t.rsplit("/", 1)[1]))
    priors = {t.rsplit("/", 1)[1]: s for t, s in data.scalars.items() if t.startswith("head/label_prior/")}
    applied = data.scalars.get("head/bias_prior_applied")
    for i, tag in enumerate(classes):
        k = tag.rsplit("/", 1)[1]
        points = implied[tag]
        colour = f"C{i % 10}"
        ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, lw=1.4,
                marker="." if len(points) < 30 else None, label=f"class {k}")  # fmt: skip
        if k in priors:  # wide and pale under the solid line: visible where the bias stays at the prior
            ax.axhline(priors[k][0][1], color=colour, lw=3.0, ls="--", alpha=0.35, zorder=1)
            ax.text(0.99, priors[k][0][1], f"prior {priors[k][0][1]:.3g}", color=colour, fontsize=6, ha="right",
                    va="bottom", transform=ax.get_yaxis_transform())  # fmt: skip
    what = {
        "softmax": "softmax(b): class probabilities the bias implies",
        "sigmoid": "sigmoid(b) per label of the output bias b",
        "identity": "output bias b",
    }.get(link, link)
    ref = {"identity": "mean target"}.get(link, "label prior")
    note = ""
    if priors:
        note = f"; dashed: {ref}" + (" (set as the bias at step 0)" if applied and applied[0][1] > 0 else "")
        note = "\n" + note[2:]
    ax.set_title(f"{what}{note}", fontsize=7.5, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(classes) <= 10:
        ax.legend(fontsize=6, frameon=False, ncol=2 if len(classes) > 3 else 1)


def _sparsity_panel(ax, data: RunData, colours: dict[str, Any]) -> None:
    """Horizontal bars: the fraction of zeros in each unit's (or pruned module's) weight matrices, bottom unit
    lowest."""
    names = list(data.sparsity)
    values = [100 * data.sparsity[n] for n in names]
    labels = [_short_module(n) for n in names]
    ax.barh(range(len(names)), values, color=[colours.get(n, "C2") for n in names], height=0.7)
    for i, v in enumerate(values):
        ax.text(min(v, 100) + 1, i, f"{v:.1f}%", va="center", fontsize=6)
    ax.set_yticks(range(len(names)), labels, fontsize=6 if len(names) > 8 else 7)
    ax.set_xlim(0, 115)
    ax.set_xlabel("% of weights pruned", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    total = f"{100 * data.sparsity_total:.1f}%" if data.sparsity_total is not None else "?"
    ax.set_title(f"pruned per unit (ticket, {total} overall)", fontsize=9, loc="left")


def _short_module(name: str) -> str:
    """``bert.encoder.layer.2.attention.self.query`` -> ``layer.2.attention.self.query``; units unchanged."""
    parts = name.split(".")
    return ".".join(parts[-5:]) if len(parts) > 5 else name


def sparsity_text(data: RunData) -> str:
    """The sparsity of a pruned run in one line (empty for a dense run)."""
    if not data.sparsity:
        return ""
    per = ", ".join(f"{_short_module(n)} {100 * v:.1f}%" for n, v in data.sparsity.items())
    return f"Ticket sparsity {100 * (data.sparsity_total or 0.0):.1f}% ({per}); from {data.sparsity_source}"


def _render(data: RunData, run_dir: str | os.PathLike, output: str | os.PathLike | None) -> Path:
    output = Path(output) if output is not None else Path(run_dir) / "hf_wb_report.png"
    fig = build_figure(data, Path(run_dir).resolve().name)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    return output


def build_figure(data: RunData, name: str = "run"):
    """The report as a matplotlib ``Figure`` (what :func:`render_report` saves); see the module docstring."""
    # a bare Figure (Agg canvas) rather than pyplot: no global backend switch, nothing left open
    require("matplotlib", feature="Rendering the report (hf-wb report)")
    from matplotlib.figure import Figure

    all_units = _units(data)
    trainable = _trainable_units(data, all_units)
    frozen = [u for u in all_units if u not in trainable]
    drift = any(t.startswith("drift/") for t in data.histograms)
    rows_units = _pick_rows(trainable if trainable else all_units, MAX_UNIT_ROWS)
    if drift:
        kinds = [k for k in ("drift", "drift_biases", "grads") if any(_unit_series(data, k, u) for u in rows_units)]
    else:
        kinds = [k for k in ("weights", "biases", "grads") if any(_unit_series(data, k, u) for u in rows_units)]
    n_rows = len(rows_units) if kinds else 0
    findings = list(data.findings)
    n_findings = min(len(findings), 10)
    last = _max_step(data)

    top_h, unit_h, note_h = 2.6, 1.5, 0.45
    find_h = 0.26 * n_findings + 0.45 if findings else 0.0
    ratios = [top_h, top_h, note_h] + [unit_h] * n_rows + ([find_h] if findings else [])
    height = sum(ratios) + 1.4
    fig = Figure(figsize=(15, height), dpi=110)
    grid = fig.add_gridspec(
        len(ratios), 1, height_ratios=ratios, hspace=0.55, top=1 - 1.0 / height, bottom=0.25 / height,
        left=0.05, right=0.98,
    )  # fmt: skip
    fig.suptitle(f"hf-wb report: {name} (steps 0 to {last})", fontsize=12, x=0.01,
                 ha="left")  # fmt: skip
    fig.text(
        0.01, 1 - 0.45 / height,
        "every panel shares the step axis from 0; dotted verticals: diagnostics findings (numbered on the loss "
        "panel, listed at the bottom; red critical, orange warning, grey info)"
        + ("" if findings else "; no findings in this run"),
        ha="left", va="top", fontsize=7, color="dimgrey",
    )  # fmt: skip
    axes = []
    colours = _unit_colours(all_units)

    row1 = grid[0].subgridspec(1, 4, wspace=0.28)
    ax = fig.add_subplot(row1[0, 0])
    _loss_panel(ax, data)
    _mark_findings(ax, findings, numbers=True)
    axes.append(ax)
    ax = fig.add_subplot(row1[0, 1])
    _eval_panel(ax, data)
    axes.append(ax)
    ax = fig.add_subplot(row1[0, 2])
    _lines(ax, _lr_series(data), "learning rate per param group", log=True, colours=colours)
    axes.append(ax)
    ax = fig.add_subplot(row1[0, 3])
    _head_panel(ax, data)
    axes.append(ax)

    row2 = grid[1].subgridspec(1, 4 if data.sparsity else 3, wspace=0.22)
    ratio_series = {t.split("/", 1)[1]: s for t, s in data.scalars.items() if t.startswith("drift_ratio/")}
    ax = fig.add_subplot(row2[0, 0])
    _lines(ax, ratio_series, "drift from the start  ||W - W0|| / ||W0||  per unit", log=True, colours=colours,
           empty="not recorded (WeightHistogramCallback(drift=True))")  # fmt: skip
    axes.append(ax)
    updates = {t.split("/", 1)[1]: s for t, s in data.scalars.items() if t.startswith("update_ratio/")}
    ax = fig.add_subplot(row2[0, 1])
    _lines(ax, updates, "update / weight ratio of one step  ||dW|| / ||W||", log=True, colours=colours)
    if updates:
        ax.axhline(1e-3, color="red", lw=0.8, ls="--", alpha=0.7)
        ax.text(0.01, 1e-3, " ~1e-3 rule of thumb", color="red", fontsize=6, va="bottom",
                transform=ax.get_yaxis_transform())  # fmt: skip
    axes.append(ax)
    grads = {t.split("/", 1)[1]: s for t, s in data.scalars.items() if t.startswith("grad_norm/")}
    ax = fig.add_subplot(row2[0, 2])
    _lines(ax, grads, "gradient norm per unit (after clipping)", log=True, colours=colours)
    axes.append(ax)
    if data.sparsity:  # not on the step axis: not in `axes`
        _sparsity_panel(fig.add_subplot(row2[0, 3]), data, colours)

    note = fig.add_subplot(grid[2])
    note.set_axis_off()
    sizes = _unit_sizes(data)
    total = sum(sizes.values())
    if frozen:
        n_frozen = sum(sizes.get(u, 0) for u in frozen)
        share = f" ({_fmt_count(n_frozen)} of {_fmt_count(total)} values)" if total else ""
        text = f"Frozen, not trained (drift 0, not drawn): {', '.join(frozen)}{share}."
    else:
        text = "Every unit trained."
    if n_rows and drift:
        text += (
            "  Heat maps below, per trained unit: the distribution of W - W0 (weights, then biases) and of the "
            "gradients; x = step, y = value, colour = share of the unit's values in each bin (log; black = none); "
            "central 99% shown."
        )
    elif n_rows:
        text += "  Heat maps below: distributions of the weights, biases and gradients (no drift recorded)."
    note.text(0, 0.5, text, va="center", ha="left", fontsize=8, wrap=True, transform=note.transAxes)

    if n_rows:
        heat = grid[3 : 3 + n_rows].subgridspec(n_rows, len(kinds), hspace=0.7, wspace=0.18)
        labels = {
            "drift": "W - W0 (weights)",
            "drift_biases": "b - b0 (biases)",
            "weights": "weights",
            "biases": "biases",
            "grads": "gradients (after clipping)",
        }
        for r, unit in enumerate(rows_units):
            for c, kind in enumerate(kinds):
                ax = fig.add_subplot(heat[r, c])
                series = _unit_series(data, kind, unit)
                if series and max(h.num for h in series) <= SMALL_GROUP:
                    _range_lines(ax, series, f"{unit} {labels[kind]} ({int(series[-1].num)} values)")
                elif series:
                    _heatmap(ax, series, f"{unit} {labels[kind]}", symmetric=kind.startswith("drift"))
                else:
                    ax.set_yticks([])
                    ax.set_title(f"{unit} {labels[kind]}: none", fontsize=8, loc="left", color="grey")
                if r == n_rows - 1:
                    ax.set_xlabel("step", fontsize=7)
                axes.append(ax)
    for ax in axes:
        ax.set_xlim(0, last)
        if ax is not axes[0]:
            _mark_findings(ax, findings)
    if findings:
        ax = fig.add_subplot(grid[-1])
        ax.set_axis_off()
        lines = [f"Diagnostics ({len(findings)} findings; `hf-wb report` prints them all with advice):"]
        for i, f in enumerate(findings[:n_findings], 1):
            layers = ", ".join(f.get("layers", [])[:4]) + (" ..." if len(f.get("layers", [])) > 4 else "")
            head = f"  [{i}] step {f.get('step')}: {f.get('severity')} {f.get('kind')} in {layers}"
            text = f"{head}: {f.get('message', '')}"
            lines.append(text[:190])
        ax.text(0, 1, "\n".join(lines), va="top", ha="left", fontsize=8, family="monospace", transform=ax.transAxes)
    return fig


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
    if data.sparsity:
        print(sparsity_text(data))
    print(findings_table(findings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
