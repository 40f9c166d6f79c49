"""Statistics of a model's parameters, grouped into readable units, shared by the monitoring callbacks.

Two layers:

* pure functions on tensors and numbers (:func:`bimodality_coefficient`, :func:`kl_divergence`, :func:`depth_trend`,
  :func:`param_subrole`);
* :class:`ParamStats`, which groups a model's parameters once (block / role from :func:`hf_wb.layers.layer_map`,
  with a fallback for models without a block stack) and computes per-unit norms, update-to-weight ratios and
  histograms on the parameters' own device, moving only a handful of numbers to the CPU (two synchronisations per
  call), so that monitoring stays cheap on a GPU.

Units are named as :meth:`hf_wb.layers.LayerMap.unit` names them (``embeddings``, ``block_03``, ``head``, with an
``encoder/`` prefix when the model has several stacks). For models without a stack of blocks (a plain MLP), each
module that owns parameters is its own unit (``net.0``), or, past :data:`MAX_FALLBACK_UNITS` such modules, each
top-level child module is one.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_wb.layers import BLOCK, LayerMap, layer_map, unwrap_model

logger = logging.getLogger(__name__)

__all__ = [
    "ATTN",
    "FFN",
    "NORM",
    "OTHER",
    "MAX_FALLBACK_UNITS",
    "HistogramData",
    "ParamEntry",
    "ParamStats",
    "bimodality_coefficient",
    "depth_trend",
    "group_parameters",
    "kl_divergence",
    "histograms",
    "param_subrole",
    "to_floats",
]

ATTN = "attn"
FFN = "ffn"
NORM = "norm"
OTHER = "other"
WEIGHTS = "weights"
BIASES = "biases"
MAX_FALLBACK_UNITS = 48
SUBROLES = (ATTN, FFN, NORM)

# Checked in this order: a norm inside an attention sub-module ("attention.output.LayerNorm",
# "post_attention_layernorm") is a norm; an output projection inside attention ("attention.output.dense") is attention.
_NORM_RE = re.compile(r"(norm|(^|[._])ln(_\d+|_f)?($|[._]))", re.IGNORECASE)
_ATTN_RE = re.compile(
    r"(attn|attention|\.(q|k|v|o)(_proj|_lin)?$|\.(q|k|v|out)_lin$|query|key|value|\.qkv|c_attn)", re.IGNORECASE
)
_FFN_RE = re.compile(
    r"(mlp|ffn|feed_?forward|intermediate|densereludense|\.fc\d|\.c_fc|(gate|up|down)_proj|\.lin\d|\.w[io](_\d)?$"
    r"|\.output\.dense$|\.experts?)",
    re.IGNORECASE,
)


def param_subrole(param_name: str) -> str:
    """Role of a parameter inside its block from its module path: ``attn``, ``ffn``, ``norm`` or ``other``.

    >>> param_subrole("bert.encoder.layer.3.attention.output.dense.weight")
    'attn'
    >>> param_subrole("bert.encoder.layer.3.output.LayerNorm.weight")
    'norm'
    >>> param_subrole("model.layers.0.mlp.gate_proj.weight")
    'ffn'
    """
    module = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    module = "." + module
    if _NORM_RE.search(module):
        return NORM
    if _ATTN_RE.search(module):
        return ATTN
    if _FFN_RE.search(module):
        return FFN
    return OTHER


@dataclass(frozen=True)
class ParamEntry:
    """One parameter with the unit it is reported under.

    ``kind`` is ``weights`` or ``biases`` (a parameter whose name ends in ``bias``); ``order`` is the unit's position
    in forward order (embeddings, blocks bottom to top, head); ``depth`` is the block index (``None`` outside blocks
    and, in the fallback grouping, the unit's position among units).
    """

    name: str
    unit: str
    subrole: str
    kind: str
    stack: str
    depth: int | None
    order: int
    numel: int


def group_parameters(
    model: nn.Module, layers_pattern: str | None = None, lmap: LayerMap | None = None
) -> list[ParamEntry]:
    """Group every named parameter of ``model`` into units (see the module docstring), in forward order.

    ``lmap``: the run's layer map (the trainer's); computed from ``layers_pattern`` when None."""
    model = unwrap_model(model)
    named = list(model.named_parameters())
    if lmap is None:
        try:
            lmap = layer_map(model, layers_pattern=layers_pattern)
        except ValueError as exc:
            logger.info("No block stack found (%s); grouping parameters by the module that owns them.", exc)
            return _fallback_groups(named)
    units = lmap.units()
    position = {u: i for i, u in enumerate(units)}
    entries = []
    for name, param in named:
        if name not in lmap.params:
            continue
        info = lmap.params[name]
        unit = lmap.unit(name)
        entries.append(
            ParamEntry(
                name=name,
                unit=unit,
                subrole=_subrole(name, info.role == BLOCK),
                kind=_kind(name),
                stack=info.stack,
                depth=info.depth,
                order=position[unit],
                numel=param.numel(),
            )
        )
    return sorted(entries, key=lambda e: e.order)


def _subrole(name: str, in_block: bool) -> str:
    role = param_subrole(name)
    # outside blocks only norms are split out (an embeddings LayerNorm's ones would swamp the embeddings histogram)
    return role if in_block or role == NORM else OTHER


def _kind(name: str) -> str:
    return BIASES if name.rsplit(".", 1)[-1].endswith("bias") else WEIGHTS


def _fallback_groups(named: list[tuple[str, nn.Parameter]]) -> list[ParamEntry]:
    owners = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "" for n, _ in named))
    if len(owners) > MAX_FALLBACK_UNITS:
        owners = list(dict.fromkeys(n.split(".", 1)[0] if "." in n else "" for n, _ in named))
        owner_of = {n: (n.split(".", 1)[0] if "." in n else "") for n, _ in named}
    else:
        owner_of = {n: (n.rsplit(".", 1)[0] if "." in n else "") for n, _ in named}
    position = {o: i for i, o in enumerate(owners)}
    entries = []
    for name, param in named:
        owner = owner_of[name]
        entries.append(
            ParamEntry(
                name=name,
                unit=owner or "root",
                subrole=_subrole(name, False),
                kind=_kind(name),
                stack="",
                depth=position[owner],
                order=position[owner],
                numel=param.numel(),
            )
        )
    return entries


# ----------------------------------------------------------------------------------------------- pure statistics


def bimodality_coefficient(values: torch.Tensor) -> float:
    """Sarle's bimodality coefficient with the sample-size corrections used by SAS.

    ``BC = (G1**2 + 1) / (G2 + 3 (n-1)**2 / ((n-2)(n-3)))`` with ``G1`` the sample skewness and ``G2`` the sample
    excess kurtosis. A normal distribution gives 1/3, a uniform one 5/9 (~0.556, the usual cut-off), and a mixture of
    two well separated modes approaches 1. Returns ``nan`` for fewer than 4 values or a constant tensor.
    """
    x = values.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n < 4:
        return math.nan
    m2, m3, m4 = (float(v) for v in _central_moments(x))
    return _bc_from_moments(n, m2, m3, m4)


def _central_moments(x: torch.Tensor) -> torch.Tensor:
    d = x - x.mean()
    d2 = d * d
    return torch.stack([d2.mean(), (d2 * d).mean(), (d2 * d2).mean()])


def _bc_from_moments(n: int, m2: float, m3: float, m4: float) -> float:
    if n < 4 or not m2 > 0 or not math.isfinite(m2 + m3 + m4):
        return math.nan
    g1 = m3 / m2**1.5
    g2 = m4 / m2**2 - 3.0
    skew = g1 * math.sqrt(n * (n - 1)) / (n - 2)
    kurt = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * g2 + 6.0)
    return (skew**2 + 1.0) / (kurt + 3.0 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def kl_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """``KL(p || q)`` in nats for two discrete distributions (terms with ``p_i == 0`` contribute nothing)."""
    if len(p) != len(q):
        raise ValueError(f"`p` has {len(p)} entries and `q` has {len(q)}; they must describe the same classes.")
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi > 0:
            total += pi * (math.log(pi) - math.log(max(qi, 1e-300)))
    return total


def depth_trend(values: Sequence[float]) -> float:
    """Orders of magnitude by which ``values`` (ordered bottom to top) change from the first to the last entry.

    A least-squares line through ``log10(values)`` against depth, evaluated across the whole depth: ``+2`` means the
    top is 100x the bottom. Non-positive or non-finite values are ignored; fewer than two usable values give 0.
    """
    points = [(i, math.log10(v)) for i, v in enumerate(values) if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(i for i, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((i - mx) ** 2 for i, _ in points)
    sxy = sum((i - mx) * (y - my) for i, y in points)
    slope = sxy / sxx
    return slope * (points[-1][0] - points[0][0])


# ------------------------------------------------------------------------------------------ device-side statistics


@dataclass
class HistogramData:
    """A histogram in TensorBoard's layout: ``bucket_limits`` are the right edges of the buckets."""

    min: float
    max: float
    num: int
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


@dataclass
class _Tracked:
    entry: ParamEntry
    param: nn.Parameter
    stride: int = 1


@dataclass
class ParamStats:
    """Per-unit statistics of one model's parameters, computed where the parameters live.

    Args:
        model: the model (wrappers are removed).
        layers_pattern: passed to :func:`hf_wb.layers.layer_map`.
        update_sample_size: for update-to-weight ratios, parameters larger than this are snapshotted on a fixed
            strided subset of about this many elements (so the snapshot costs at most ``update_sample_size`` values
            per tensor instead of a copy of the model); smaller ones are copied whole.
        lmap: the run's layer map (shared with the trainer); None = computed from ``layers_pattern``.
    """

    model: nn.Module
    layers_pattern: str | None = None
    update_sample_size: int = 65536
    lmap: LayerMap | None = None
    entries: list[ParamEntry] = field(init=False)
    _tracked: list[_Tracked] = field(init=False, repr=False)
    _snapshot: list[torch.Tensor | None] | None = field(init=False, default=None, repr=False)
    _views: list[torch.Tensor | None] = field(init=False, repr=False)
    _reference: list[torch.Tensor | None] = field(init=False, repr=False)
    _reference_sq: dict[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model = unwrap_model(self.model)
        self.entries = group_parameters(self.model, self.layers_pattern, self.lmap)
        params = dict(self.model.named_parameters())
        self._tracked = []
        for entry in self.entries:
            p = params[entry.name]
            stride = max(1, p.numel() // self.update_sample_size) if self.update_sample_size > 0 else 1
            self._tracked.append(_Tracked(entry, p, stride))
        self._views = [None] * len(self._tracked)
        self._reference = [None] * len(self._tracked)
        self._reference_sq = {}

    def _weights(self) -> list[torch.Tensor]:
        """Flat, detached views of the parameters (local shards), built once and rebuilt only when a parameter's
        storage changed: every operation saved here is a kernel launch saved per tensor on a GPU."""
        for i, t in enumerate(self._tracked):
            v = self._views[i]
            p = t.param
            if hasattr(p, "to_local"):  # DTensor: the local shard may move
                self._views[i] = _local(p.detach()).reshape(-1)
            elif v is None or v.data_ptr() != p.data_ptr() or v.numel() != p.numel():
                self._views[i] = p.detach().reshape(-1)
        return self._views  # type: ignore[return-value]

    def _grads(self) -> list[torch.Tensor | None]:
        return [None if t.param.grad is None else _local(t.param.grad).reshape(-1) for t in self._tracked]

    # -- units ---------------------------------------------------------------------------------------------------
    def units(self) -> list[str]:
        """Units in forward order."""
        return list(dict.fromkeys(e.unit for e in self.entries))

    def block_units(self) -> dict[str, list[str]]:
        """Block units of each stack, bottom to top (the fallback grouping counts every unit as a block)."""
        stacks: dict[str, dict[int, str]] = {}
        for e in self.entries:
            if e.depth is not None:
                stacks.setdefault(e.stack, {})[e.depth] = e.unit
        return {s: [units[d] for d in sorted(units)] for s, units in stacks.items()}

    def trainable_units(self) -> set[str]:
        return {t.entry.unit for t in self._tracked if t.param.requires_grad}

    # -- norms ---------------------------------------------------------------------------------------------------
    def weight_norms(self) -> dict[str, float]:
        """L2 norm of all the parameters (weights and biases) of each unit."""
        return self._unit_norms([(t.entry.unit, v) for t, v in zip(self._tracked, self._weights(), strict=True)])

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of the gradients of each unit; units without any gradient (frozen) are left out."""
        grads = self._grads()
        return self._unit_norms(
            [(t.entry.unit, g) for t, g in zip(self._tracked, grads, strict=True) if g is not None]
        )

    def grad_rms(self) -> dict[str, float]:
        """Root mean square of the gradient entries of each unit (comparable across units of different sizes)."""
        norms = self.grad_norms()
        sizes: dict[str, int] = {}
        for t in self._tracked:
            if t.param.grad is not None:
                sizes[t.entry.unit] = sizes.get(t.entry.unit, 0) + t.param.grad.numel()
        return {u: n / math.sqrt(sizes[u]) for u, n in norms.items() if sizes.get(u)}

    @staticmethod
    def _unit_norms(items: list[tuple[str, torch.Tensor]]) -> dict[str, float]:
        if not items:
            return {}
        norms = to_floats(_norms([x for _, x in items]))
        out: dict[str, float] = {}
        for (unit, _), n in zip(items, norms, strict=True):
            out[unit] = out.get(unit, 0.0) + n * n
        return {u: math.sqrt(v) for u, v in out.items()}

    # -- update ratios ---------------------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Copy (a strided sample of) every trainable parameter, to compare after the optimizer step."""
        samples = [
            v[:: t.stride] if t.param.requires_grad else None
            for t, v in zip(self._tracked, self._weights(), strict=True)
        ]
        kept = [x for x in samples if x is not None]
        copies = iter(_copies(kept))
        self._snapshot = [None if x is None else next(copies) for x in samples]

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def update_ratios(self) -> dict[str, float]:
        """``||W_after - W_before|| / ||W_before||`` per unit since :meth:`snapshot` (trainable units only).

        The snapshot is consumed. Returns an empty dict when there is no snapshot.
        """
        if self._snapshot is None:
            return {}
        befores, afters, units = [], [], []
        for t, v, before in zip(self._tracked, self._weights(), self._snapshot, strict=True):
            if before is None:
                continue
            befores.append(before)
            afters.append(v[:: t.stride].float())
            units.append(t.entry.unit)
        self._snapshot = None
        if not units:
            return {}
        deltas = (
            torch._foreach_sub(afters, befores)
            if hasattr(torch, "_foreach_sub")
            else [a - b for a, b in zip(afters, befores, strict=True)]
        )
        values = to_floats(_norms(deltas) + _norms(befores))
        d_sq: dict[str, float] = {}
        w_sq: dict[str, float] = {}
        for i, unit in enumerate(units):
            d_sq[unit] = d_sq.get(unit, 0.0) + values[i] ** 2
            w_sq[unit] = w_sq.get(unit, 0.0) + values[len(units) + i] ** 2
        return {u: (math.sqrt(d_sq[u] / w_sq[u]) if w_sq[u] > 0 else math.inf) for u in d_sq}

    # -- drift from the starting weights ---------------------------------------------------------------------------
    def keep_reference(self) -> int:
        """Keep a CPU copy ``W0`` of every trainable parameter that has none yet; return the number of values copied.

        Frozen parameters are not copied (their drift is 0 by construction); a parameter unfrozen later gets its copy
        the first time this is called after it became trainable, which is its starting value, since a frozen
        parameter does not change. Copies keep the parameter's dtype (exact, and no larger than the parameter); on a
        CUDA device they go to pinned memory so the copies back are fast.
        """
        copied = 0
        views = self._weights()
        for i, t in enumerate(self._tracked):
            if self._reference[i] is not None or not t.param.requires_grad or not t.param.is_floating_point():
                continue
            v = views[i]
            ref = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=v.is_cuda)
            ref.copy_(v)
            self._reference[i] = ref
            self._reference_sq[t.entry.unit] = self._reference_sq.get(t.entry.unit, 0.0) + float(
                torch.dot(ref.double(), ref.double())
            )
            copied += ref.numel()
        return copied

    @property
    def reference_bytes(self) -> int:
        """Memory held by the ``W0`` copies."""
        return sum(r.numel() * r.element_size() for r in self._reference if r is not None)

    def drift_histograms(self, bins: int = 64) -> tuple[dict[str, HistogramData], dict[str, float]]:
        """Histograms of ``W - W0`` and the relative drift ``||W - W0|| / ||W0||`` of every unit with a reference.

        Returns ``({"drift/<unit>": weights (norms included), "drift_biases/<unit>": biases}, {unit: ratio})``; the
        ratio covers all the unit's parameters that have a reference (weights and biases). Computed unit by unit on
        the parameters' device, so at most one unit's differences exist at a time (float32).
        """
        views = self._weights()
        by_unit: dict[str, list[int]] = {}
        for i, t in enumerate(self._tracked):
            if self._reference[i] is not None:
                by_unit.setdefault(t.entry.unit, []).append(i)
        hists: dict[str, HistogramData] = {}
        ratios: dict[str, float] = {}
        for unit, idx in by_unit.items():
            groups: dict[str, list[torch.Tensor]] = {}
            for i in idx:
                v = views[i]
                ref = self._reference[i].to(v.device, non_blocking=True)
                tag = "drift_biases" if self._tracked[i].entry.kind == BIASES else "drift"
                groups.setdefault(f"{tag}/{unit}", []).append(v.float() - ref.float())
            unit_hists = histograms(groups, bins)
            hists.update(unit_hists)
            w0 = self._reference_sq.get(unit, 0.0)
            d = sum(h.sum_squares for h in unit_hists.values())
            ratios[unit] = math.sqrt(d / w0) if w0 > 0 else math.inf
        return hists, ratios

    # -- histograms ------------------------------------------------------------------------------------------------
    def histogram_groups(self, split_subroles: bool = True) -> dict[str, list[int]]:
        """Histogram tags of weights and biases -> indices of the tracked parameters in each.

        ``weights/<unit>/<subrole>`` for block weights (``weights/<unit>`` outside blocks or when ``split_subroles``
        is False), ``biases/<unit>`` for biases.
        """
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(self._tracked):
            e = t.entry
            if e.kind == BIASES:
                tag = f"biases/{e.unit}"
            elif split_subroles and e.subrole != OTHER:
                tag = f"weights/{e.unit}/{e.subrole}"
            else:
                tag = f"weights/{e.unit}"
            groups.setdefault(tag, []).append(i)
        return groups

    def weight_histograms(self, bins: int = 64, split_subroles: bool = True) -> dict[str, HistogramData]:
        """Histograms of the weights and biases, tagged as :meth:`histogram_groups` says."""
        views = self._weights()
        groups = self.histogram_groups(split_subroles)
        return histograms({tag: [views[i] for i in idx] for tag, idx in groups.items()}, bins)

    def grad_histograms(self, bins: int = 64) -> dict[str, HistogramData]:
        """``grads/<unit>`` histograms of the current gradients (parameters without a gradient are skipped)."""
        tensors: dict[str, list[torch.Tensor]] = {}
        for t, g in zip(self._tracked, self._grads(), strict=True):
            if g is not None:
                tensors.setdefault(f"grads/{t.entry.unit}", []).append(g)
        return histograms(tensors, bins)

    @staticmethod
    def unit_norms_from(hists: dict[str, HistogramData]) -> dict[str, float]:
        """Per-unit L2 norms from histograms tagged ``<kind>/<unit>[/<role>]`` (their sums of squares): the norms
        come for free with the histograms. Non-finite values, which histograms leave out, are left out here too."""
        squares: dict[str, float] = {}
        for tag, h in hists.items():
            parts = tag.split("/")[1:]
            if len(parts) > 1 and parts[-1] in SUBROLES:
                parts = parts[:-1]
            unit = "/".join(parts)
            squares[unit] = squares.get(unit, 0.0) + h.sum_squares
        return {u: math.sqrt(v) for u, v in squares.items()}

    # -- per-tensor checks -------------------------------------------------------------------------------------------
    def first_nonfinite(self, grads: bool = False, limit_fraction: float | None = None) -> tuple[str, str] | None:
        """The first parameter (in forward order) holding NaN/Inf, or a magnitude above ``limit_fraction`` of its
        dtype's largest finite value; returns ``(name, unit)`` or ``None``.

        One norm per tensor and one synchronisation; only tensors whose norm is non-finite or above the limit (the
        norm bounds the largest magnitude from above) are then looked at element by element.
        """
        found = self._first_bad([("", self._grads() if grads else self._weights())], limit_fraction)
        return found[:2] if found else None

    def first_nonfinite_step(self, limit_fraction: float | None = None) -> tuple[str, str, str] | None:
        """The weights, then the gradients, checked in one pass (one fused norm per tensor, one synchronisation):
        ``(name, unit, "weights" | "gradients")`` of the first tensor in forward order holding NaN/Inf (or a
        magnitude above ``limit_fraction`` of its dtype's maximum), weights first since a non-finite weight makes
        every gradient below it non-finite too; ``None`` when all are finite."""
        return self._first_bad([("weights", self._weights()), ("gradients", self._grads())], limit_fraction)

    def _first_bad(self, sources: list, limit_fraction: float | None) -> tuple[str, str, str] | None:
        items = []
        for where, xs in sources:
            for t, x in zip(self._tracked, xs, strict=True):
                if x is not None and x.numel() and x.is_floating_point():
                    items.append((where, t, x))
        if not items:
            return None
        norms = to_floats(_norms([x for _, _, x in items]))
        for (where, t, x), norm in zip(items, norms, strict=True):
            limit = math.inf if limit_fraction is None else limit_fraction * torch.finfo(x.dtype).max
            if math.isfinite(norm) and norm <= limit:
                continue
            bad = not bool(torch.isfinite(x).all())
            if not bad and limit_fraction is not None:
                bad = float(x.abs().amax()) > limit
            if bad:
                return t.entry.name, t.entry.unit, where
        return None

    def all_finite(self) -> bool:
        """Whether the norm of every parameter is finite (one fused norm per parameter, one synchronisation)."""
        tensors = [v for v in self._weights() if v.numel() and v.is_floating_point()]
        return all(math.isfinite(v) for v in to_floats(_norms(tensors)))

    def bimodality(self, min_numel: int = 256) -> dict[str, float]:
        """Bimodality coefficient of every weight matrix (``ndim >= 2``, at least ``min_numel`` values), by name.

        Matrices larger than ``update_sample_size`` are measured on the same fixed strided sample as the update
        ratios (the coefficient of a 65536-value sample is within about 0.01 of the whole matrix's).
        """
        views = self._weights()
        chosen = [
            (t, views[i])
            for i, t in enumerate(self._tracked)
            if t.entry.kind == WEIGHTS and t.param.ndim >= 2 and t.param.numel() >= min_numel
        ]
        if not chosen:
            return {}
        samples = [v[:: t.stride].float() for t, v in chosen]
        chosen = [t for t, _ in chosen]
        moments = to_floats([m for x in samples for m in _central_moments(x)])
        out = {}
        for i, (t, x) in enumerate(zip(chosen, samples, strict=True)):
            m2, m3, m4 = moments[3 * i : 3 * i + 3]
            out[t.entry.name] = _bc_from_moments(x.numel(), m2, m3, m4)
        return out

    def unit_of(self, name: str) -> str:
        for t in self._tracked:
            if t.entry.name == name:
                return t.entry.unit
        raise KeyError(name)


TAIL_SIGMAS = 6.0
MAX_TAIL_BINS = 4
CAT_LIMIT = 1 << 20


def histograms(tensors: dict[str, list[torch.Tensor]], bins: int = 64) -> dict[str, HistogramData]:
    """Histograms of groups of tensors (each group pooled), computed on the tensors' device with ``torch.histc``.

    Buckets: ``bins`` equal buckets over ``mean +- 6 std`` of the group (:data:`TAIL_SIGMAS`, clipped to its
    ``[min, max]``), plus one bucket for each tail beyond, so that a few outliers (common in pretrained weights) do
    not squeeze the bulk of the distribution into a handful of buckets. Non-finite entries are left out. Two
    synchronisations in all (ranges and moments, then counts), about four kernels per tensor.
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for tag, xs in tensors.items():
        flat = [x if x.dim() == 1 else x.detach().reshape(-1) for x in xs if x is not None and x.numel() > 0]
        flat = [x if x.dtype == torch.float32 else x.float() for x in flat]
        # pool the small tensors of a group (biases, norms, small matrices) into one: fewer kernel launches
        small = [x for x in flat if x.numel() < CAT_LIMIT]
        if len(small) > 1 and len({x.device for x in small}) == 1:
            flat = [x for x in flat if x.numel() >= CAT_LIMIT] + [torch.cat(small)]
        if flat:
            groups[tag] = flat
    if not groups:
        return {}
    # pass 1: min, max, sum, sum of squares of every tensor
    firsts = []
    for xs in groups.values():
        for x in xs:
            lo, hi = torch.aminmax(x)
            firsts.extend([lo, hi, x.sum(), torch.dot(x, x)])
    values = to_floats(firsts)
    stats: dict[str, list[float]] = {}
    k = 0
    for tag, xs in groups.items():
        part = [values[k + 4 * i : k + 4 * i + 4] for i in range(len(xs))]
        k += 4 * len(xs)
        if not all(math.isfinite(v) for row in part for v in row):
            # rare path: drop NaN/Inf (and values whose square overflows) from this group
            xs = [x[torch.isfinite(x)] for x in xs]
            xs = [x for x in xs if x.numel()]
            groups[tag] = xs
            part = [to_floats([*torch.aminmax(x), x.sum(), torch.dot(x.double(), x.double())]) for x in xs]
        n = sum(x.numel() for x in xs)
        lo, hi = min((r[0] for r in part), default=0.0), max((r[1] for r in part), default=0.0)
        total, squares = sum(r[2] for r in part), sum(r[3] for r in part)
        stats[tag] = [n, lo, hi, total, squares]
    # pass 2: one histc per tensor over a grid whose central `bins` buckets span mean +- 6 std
    seconds, layout = [], {}
    for tag, xs in groups.items():
        n, lo, hi, total, squares = stats[tag]
        if n == 0:
            continue
        mean = total / n
        std = math.sqrt(max(squares / n - mean * mean, 0.0))
        a, b = max(lo, mean - TAIL_SIGMAS * std), min(hi, mean + TAIL_SIGMAS * std)
        if not b > a:
            a, b = lo, hi
        if not b > a:
            pad = max(abs(a) * 1e-3, 1e-8)
            a, b = a - pad, b + pad
        width = (b - a) / bins
        left = math.ceil((a - lo) / width - 1e-9) if lo < a else 0
        right = math.ceil((hi - b) / width - 1e-9) if hi > b else 0
        if left + right <= MAX_TAIL_BINS * bins:  # one histc over an extended grid, tails merged afterwards
            grid_lo, grid_hi, nbins = a - left * width, b + right * width, bins + left + right
            counts = sum(torch.histc(x, bins=nbins, min=grid_lo, max=grid_hi) for x in xs)
            seconds.append(counts)
            layout[tag] = (a, b, lo, hi, left, right, None)
        else:  # far outliers: central histc plus two comparisons
            counts = sum(torch.histc(x, bins=bins, min=a, max=b) for x in xs)
            below = sum((x < a).sum() for x in xs)
            above = sum((x > b).sum() for x in xs)
            seconds.append(torch.cat([below.reshape(1).to(counts), counts, above.reshape(1).to(counts)]))
            layout[tag] = (a, b, lo, hi, 1, 1, "split")
    flat = to_floats(seconds)
    out: dict[str, HistogramData] = {}
    i = 0
    for tag, (a, b, lo, hi, left, right, mode) in layout.items():
        size = bins + left + right if mode is None else bins + 2
        raw = flat[i : i + size]
        i += size
        if mode is None:
            below, central, above = sum(raw[:left]), raw[left : left + bins], sum(raw[left + bins :])
        else:
            below, central, above = raw[0], raw[1 : bins + 1], raw[-1]
        width = (b - a) / bins
        limits = [a + width * (j + 1) for j in range(bins)]
        counts = list(central)
        if left:
            limits.insert(0, a)
            counts.insert(0, below)
        if right:
            limits[-1] = b
            limits.append(hi)
            counts.append(above)
        n, _, _, total, squares = stats[tag]
        out[tag] = HistogramData(
            min=min(lo, a),
            max=max(hi, b),
            num=int(round(sum(counts))),
            sum=total,
            sum_squares=squares,
            bucket_limits=limits,
            bucket_counts=counts,
        )
    return out


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """float32 copies of ``tensors`` (one fused ``torch._foreach_mul`` per device and dtype where available)."""
    if not tensors:
        return []
    if not hasattr(torch, "_foreach_mul"):
        return [x.float().clone() for x in tensors]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple, list[int]] = {}
    for i, x in enumerate(tensors):
        buckets.setdefault((x.device, x.dtype), []).append(i)
    for idx in buckets.values():
        for i, c in zip(idx, torch._foreach_mul([tensors[i] for i in idx], 1.0), strict=True):
            out[i] = c.float()
    return out  # type: ignore[return-value]


def _norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each tensor (fused per device and dtype with ``torch._foreach_norm`` where available)."""
    if not tensors:
        return []
    if hasattr(torch, "_foreach_norm"):
        out: list[torch.Tensor | None] = [None] * len(tensors)
        buckets: dict[tuple, list[int]] = {}
        for i, x in enumerate(tensors):
            buckets.setdefault((x.device, x.dtype), []).append(i)
        for idx in buckets.values():
            for i, n in zip(idx, torch._foreach_norm([tensors[i] for i in idx]), strict=True):
                out[i] = n.float()
        return out
    return [torch.linalg.vector_norm(x).float() for x in tensors]


def _local(x: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (FSDP2 / tensor parallel), the tensor itself otherwise."""
    if x is not None and hasattr(x, "to_local"):
        return x.to_local()
    return x


def to_floats(values: Iterable[torch.Tensor]) -> list[float]:
    """Flatten a list of tensors into Python floats with one copy to the CPU per (device, dtype)."""
    values = list(values)
    if not values:
        return []
    offsets, pos = [], 0
    for v in values:
        offsets.append(pos)
        pos += v.numel()
    out: list[float] = [0.0] * pos
    buckets: dict[tuple, list[int]] = {}
    for i, v in enumerate(values):
        buckets.setdefault((v.device, v.dtype), []).append(i)
    for idx in buckets.values():
        parts = [values[i].reshape(-1) for i in idx]
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().tolist()
        k = 0
        for i in idx:
            n = values[i].numel()
            out[offsets[i] : offsets[i] + n] = flat[k : k + n]
            k += n
    return out
