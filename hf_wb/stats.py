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

from hf_wb.layers import BLOCK, layer_map, unwrap_model

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
    "param_subrole",
]

ATTN = "attn"
FFN = "ffn"
NORM = "norm"
OTHER = "other"
WEIGHTS = "weights"
BIASES = "biases"
MAX_FALLBACK_UNITS = 48

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


def group_parameters(model: nn.Module, layers_pattern: str | None = None) -> list[ParamEntry]:
    """Group every named parameter of ``model`` into units (see the module docstring), in forward order."""
    model = unwrap_model(model)
    named = list(model.named_parameters())
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
    """

    model: nn.Module
    layers_pattern: str | None = None
    update_sample_size: int = 65536
    entries: list[ParamEntry] = field(init=False)
    _tracked: list[_Tracked] = field(init=False, repr=False)
    _snapshot: list[torch.Tensor | None] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.model = unwrap_model(self.model)
        self.entries = group_parameters(self.model, self.layers_pattern)
        params = dict(self.model.named_parameters())
        self._tracked = []
        for entry in self.entries:
            p = params[entry.name]
            stride = max(1, p.numel() // self.update_sample_size) if self.update_sample_size > 0 else 1
            self._tracked.append(_Tracked(entry, p, stride))

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
        return self._unit_norms([(t.entry.unit, _local(t.param.detach())) for t in self._tracked])

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of the gradients of each unit; units without any gradient (frozen) are left out."""
        items = [(t.entry.unit, _local(t.param.grad)) for t in self._tracked if t.param.grad is not None]
        return self._unit_norms(items)

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
        squares = _to_cpu([torch.linalg.vector_norm(x.float()) ** 2 for _, x in items])
        out: dict[str, float] = {}
        for (unit, _), sq in zip(items, squares, strict=True):
            out[unit] = out.get(unit, 0.0) + sq
        return {u: math.sqrt(v) if v >= 0 else math.nan for u, v in out.items()}

    # -- update ratios ---------------------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Copy (a strided sample of) every trainable parameter, to compare after the optimizer step."""
        self._snapshot = [
            _local(t.param.detach()).reshape(-1)[:: t.stride].clone() if t.param.requires_grad else None
            for t in self._tracked
        ]

    @property
    def has_snapshot(self) -> bool:
        return self._snapshot is not None

    def update_ratios(self) -> dict[str, float]:
        """``||W_after - W_before|| / ||W_before||`` per unit since :meth:`snapshot` (trainable units only).

        The snapshot is consumed. Returns an empty dict when there is no snapshot.
        """
        if self._snapshot is None:
            return {}
        deltas, bases, units = [], [], []
        for t, before in zip(self._tracked, self._snapshot, strict=True):
            if before is None:
                continue
            after = _local(t.param.detach()).reshape(-1)[:: t.stride]
            deltas.append(torch.linalg.vector_norm(after.float() - before.float()) ** 2)
            bases.append(torch.linalg.vector_norm(before.float()) ** 2)
            units.append(t.entry.unit)
        self._snapshot = None
        if not units:
            return {}
        values = _to_cpu(deltas + bases)
        d_sq: dict[str, float] = {}
        w_sq: dict[str, float] = {}
        for i, unit in enumerate(units):
            d_sq[unit] = d_sq.get(unit, 0.0) + values[i]
            w_sq[unit] = w_sq.get(unit, 0.0) + values[len(units) + i]
        return {u: (math.sqrt(d_sq[u] / w_sq[u]) if w_sq[u] > 0 else math.inf) for u in d_sq}

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
        groups = self.histogram_groups(split_subroles)
        tensors = {tag: [_local(self._tracked[i].param.detach()) for i in idx] for tag, idx in groups.items()}
        return histograms(tensors, bins)

    def grad_histograms(self, bins: int = 64) -> dict[str, HistogramData]:
        """``grads/<unit>`` histograms of the current gradients (parameters without a gradient are skipped)."""
        tensors: dict[str, list[torch.Tensor]] = {}
        for t in self._tracked:
            if t.param.grad is not None:
                tensors.setdefault(f"grads/{t.entry.unit}", []).append(_local(t.param.grad))
        return histograms(tensors, bins)

    # -- per-tensor checks -------------------------------------------------------------------------------------------
    def first_nonfinite(self, grads: bool = False, limit_fraction: float | None = None) -> tuple[str, str] | None:
        """The first parameter (in forward order) holding NaN/Inf, or a magnitude above ``limit_fraction`` of its
        dtype's largest finite value; returns ``(name, unit)`` or ``None``. One synchronisation."""
        tensors = []
        for t in self._tracked:
            x = t.param.grad if grads else t.param.detach()
            tensors.append(None if x is None else _local(x))
        flags = []
        for x in tensors:
            if x is None or x.numel() == 0:
                flags.append(torch.zeros((), dtype=torch.bool))
                continue
            bad = ~torch.isfinite(x).all()
            if limit_fraction is not None and x.is_floating_point():
                bad = bad | (x.abs().amax() > limit_fraction * torch.finfo(x.dtype).max)
            flags.append(bad)
        if not flags:
            return None
        values = _to_cpu([f.float() for f in flags])
        for t, v in zip(self._tracked, values, strict=True):
            if v > 0:
                return t.entry.name, t.entry.unit
        return None

    def all_finite(self) -> bool:
        """Whether every parameter is finite (one norm per parameter, one synchronisation per device)."""
        norms = [torch.linalg.vector_norm(_local(t.param.detach()).float()) for t in self._tracked if t.param.numel()]
        return all(math.isfinite(v) for v in _to_cpu(norms))

    def bimodality(self, min_numel: int = 256) -> dict[str, float]:
        """Bimodality coefficient of every weight matrix (``ndim >= 2``, at least ``min_numel`` values), by name."""
        chosen = [
            t for t in self._tracked if t.entry.kind == WEIGHTS and t.param.ndim >= 2 and t.param.numel() >= min_numel
        ]
        if not chosen:
            return {}
        moments = _to_cpu(
            [m for t in chosen for m in _central_moments(_local(t.param.detach()).reshape(-1).to(torch.float64))]
        )
        out = {}
        for i, t in enumerate(chosen):
            m2, m3, m4 = moments[3 * i : 3 * i + 3]
            out[t.entry.name] = _bc_from_moments(_local(t.param.detach()).numel(), m2, m3, m4)
        return out

    def unit_of(self, name: str) -> str:
        for t in self._tracked:
            if t.entry.name == name:
                return t.entry.unit
        raise KeyError(name)


def histograms(tensors: dict[str, list[torch.Tensor]], bins: int = 64) -> dict[str, HistogramData]:
    """Histograms of groups of tensors (each group pooled), computed on the tensors' device with ``torch.histc``.

    Non-finite entries are left out of the buckets. Two synchronisations in all: one for the ranges, one for the
    counts and moments.
    """
    groups = {}
    for tag, xs in tensors.items():
        flat = [x.detach().reshape(-1) for x in xs if x is not None and x.numel() > 0]
        if flat:
            groups[tag] = flat
    if not groups:
        return {}
    ranges_dev = []
    for xs in groups.values():
        for x in xs:
            ranges_dev.extend(_finite_aminmax(x))
    ranges = _to_cpu(ranges_dev)
    bounds: dict[str, tuple[float, float]] = {}
    k = 0
    for tag, xs in groups.items():
        lo, hi = math.inf, -math.inf
        for _ in xs:
            lo, hi = min(lo, ranges[k]), max(hi, ranges[k + 1])
            k += 2
        if not math.isfinite(lo) or not math.isfinite(hi):  # nothing finite at all
            lo, hi = 0.0, 0.0
        if hi <= lo:
            pad = max(abs(lo) * 1e-3, 1e-8)
            lo, hi = lo - pad, hi + pad
        bounds[tag] = (lo, hi)
    results_dev = []
    for tag, xs in groups.items():
        lo, hi = bounds[tag]
        counts, s1, s2 = None, None, None
        for x in xs:
            xf = x.float()
            # histc ignores NaN and values outside [lo, hi] (so +-inf too): only finite values are counted
            c = torch.histc(xf, bins=bins, min=lo, max=hi).double()
            xd = torch.where(torch.isfinite(xf), xf, torch.zeros((), dtype=xf.dtype, device=xf.device)).double()
            a, b = xd.sum(), (xd * xd).sum()
            counts = c if counts is None else counts + c
            s1 = a if s1 is None else s1 + a
            s2 = b if s2 is None else s2 + b
        results_dev.extend([counts, s1.reshape(1), s2.reshape(1)])
    flat = _to_cpu(results_dev)
    out: dict[str, HistogramData] = {}
    i = 0
    for tag in groups:
        counts_list = flat[i : i + bins]
        s1, s2 = flat[i + bins], flat[i + bins + 1]
        i += bins + 2
        lo, hi = bounds[tag]
        width = (hi - lo) / bins
        limits = [lo + width * (j + 1) for j in range(bins)]
        num = int(round(sum(counts_list)))
        out[tag] = HistogramData(
            min=lo, max=hi, num=num, sum=s1, sum_squares=s2, bucket_limits=limits, bucket_counts=counts_list
        )
    return out


def _finite_aminmax(x: torch.Tensor) -> list[torch.Tensor]:
    xf = x.float()
    finite = torch.isfinite(xf)
    lo = torch.where(finite, xf, torch.full((), math.inf, device=xf.device)).amin()
    hi = torch.where(finite, xf, torch.full((), -math.inf, device=xf.device)).amax()
    return [lo, hi]


def _local(x: torch.Tensor | None) -> torch.Tensor | None:
    """The local shard of a DTensor (FSDP2 / tensor parallel), the tensor itself otherwise."""
    if x is not None and hasattr(x, "to_local"):
        return x.to_local()
    return x


def _to_cpu(values: Iterable[torch.Tensor]) -> list[float]:
    """Move a list of 0-d/1-d tensors to the CPU in one copy per device and return them as floats."""
    values = list(values)
    if not values:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        by_device.setdefault(v.device, []).append(i)
    out: list[float] = [0.0] * sum(v.numel() for v in values)
    # positions of each value in the flattened output
    offsets = []
    pos = 0
    for v in values:
        offsets.append(pos)
        pos += v.numel()
    for idx in by_device.values():
        cat = torch.cat([values[i].reshape(-1).double() for i in idx]).cpu().tolist()
        k = 0
        for i in idx:
            n = values[i].numel()
            out[offsets[i] : offsets[i] + n] = cat[k : k + n]
            k += n
    return out
