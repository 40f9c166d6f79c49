"""Winning tickets: iterative magnitude pruning (IMP) with rewind, for the blocks the recipe trains.

The lottery ticket procedure (Frankle and Carbin, 2019; for pre-trained BERT, Chen et al., 2020): train, prune the
smallest-magnitude weights still alive, rewind the survivors to their starting values (the pre-trained weights, or
the weights of an early step ``k``), and train again; repeat. A *ticket* is the final set of masks.

What is pruned: the weight matrices (``nn.Linear``, GPT-2's ``Conv1D``) of the blocks that train under the recipe
(above the frozen boundary). Embeddings, norms, biases and the head stay dense unless asked (``include_head``). The
frozen blocks are never touched, so their outputs, and the prefix cache keyed by their weights, are the same in
every round.

Masks are applied with ``torch.nn.utils.prune.custom_from_mask``: the module's ``weight`` becomes
``weight_orig * weight_mask`` in every forward, so the gradient of a pruned entry is zero and no update, dense or
decayed, reaches the weight the model computes with. Masks are saved as safetensors (``hf_wb_ticket.safetensors``,
uint8, one tensor per pruned module, keyed by its weight's name) with the round, rate and per-layer sparsity in
``hf_wb_ticket.json``, and :func:`load_ticket` applies them to a freshly loaded pre-trained model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune
from transformers import TrainerCallback

from hf_wb.config import WBConfig
from hf_wb.freezing import plan_freeze
from hf_wb.layers import BLOCK, HEAD, LayerMap, layer_map, unit_name, unwrap_model

__all__ = [
    "MASKS_NAME",
    "TICKET_NAME",
    "TicketRound",
    "prunable_modules",
    "magnitude_masks",
    "apply_masks",
    "current_masks",
    "check_checkpoint_masks",
    "make_permanent",
    "sparsity",
    "save_ticket",
    "load_masks",
    "load_ticket",
    "find_ticket",
]

logger = logging.getLogger(__name__)

MASKS_NAME = "hf_wb_ticket.safetensors"
TICKET_NAME = "hf_wb_ticket.json"
SCOPES = ("global", "layer")


def _is_matrix_module(module: nn.Module) -> bool:
    weight = getattr(module, "weight_orig", getattr(module, "weight", None))
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def prunable_modules(
    model: nn.Module, config: WBConfig | None = None, lmap: LayerMap | None = None, include_head: bool = False
) -> dict[str, nn.Module]:
    """The modules whose weight matrices IMP prunes: Linear / Conv1D layers of the blocks ``config`` trains (and of
    the head with ``include_head``), by module name, in forward order."""
    config = config or WBConfig()
    model = unwrap_model(model)
    lmap = lmap or layer_map(model, config.layers_pattern)
    frozen = set(plan_freeze(model, config, lmap).frozen_units)
    out = {}
    for name, module in model.named_modules():
        if not name or not _is_matrix_module(module):
            continue
        info = lmap.module_units.get(name)
        if info is None:
            continue
        stack, role, depth = info
        if unit_name(stack, role, depth) in frozen or (role != BLOCK and not (include_head and role == HEAD)):
            continue
        out[name] = module
    if not out:
        raise ValueError(
            "No weight matrix to prune: the recipe trains no block with Linear layers. Lower `freeze_layers` or "
            "raise `top_layers` (or pass include_head=True)."
        )
    return out


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module computes with (``weight_orig * weight_mask`` once pruned)."""
    if hasattr(module, "weight_mask"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def current_masks(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The masks in force (all ones for a module not pruned yet), as bool tensors keyed by module name."""
    return {
        name: module.weight_mask.bool().clone()
        if hasattr(module, "weight_mask")
        else torch.ones_like(module.weight, dtype=torch.bool)
        for name, module in modules.items()
    }


def magnitude_masks(
    modules: dict[str, nn.Module], rate: float, scope: str = "global", masks: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Masks that prune a fraction ``rate`` of the weights still alive, smallest magnitude first.

    Args:
        modules: from :func:`prunable_modules` (their current, trained weights are scored).
        rate: fraction of the surviving weights to prune this round, in (0, 1).
        scope: ``"global"`` ranks all modules' weights together (Chen et al.), ``"layer"`` prunes each module by the
            same fraction.
        masks: the masks in force; None = :func:`current_masks` of ``modules``.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"`rate` must be in (0, 1) (the fraction of surviving weights pruned per round), got {rate}.")
    if scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
    masks = current_masks(modules) if masks is None else masks
    scores = {name: _effective_weight(m).abs().float() for name, m in modules.items()}
    groups = [list(modules)] if scope == "global" else [[name] for name in modules]
    out = {name: mask.clone().bool() for name, mask in masks.items()}
    for names in groups:
        flat = torch.cat([scores[n].flatten() for n in names])
        alive = torch.cat([out[n].flatten() for n in names])
        k = int(round(rate * int(alive.sum())))
        if k == 0:
            continue
        flat = torch.where(alive, flat, torch.full_like(flat, float("inf")))  # the dead are not pruned twice
        drop = torch.topk(flat, k, largest=False).indices
        keep = alive.clone()
        keep[drop] = False
        offset = 0
        for n in names:
            size = out[n].numel()
            out[n] = keep[offset : offset + size].view_as(out[n])
            offset += size
    return out


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Enforce ``masks`` (module name -> bool/0-1 tensor) with ``torch.nn.utils.prune.custom_from_mask``; a module
    already pruned gets its mask replaced."""
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    missing = sorted(set(masks) - set(modules))
    if missing:
        raise ValueError(f"The ticket's masks name modules this model does not have: {missing[:5]}.")
    for name, mask in masks.items():
        module = modules[name]
        weight = getattr(module, "weight_orig", getattr(module, "weight", None))
        if weight is None or tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"The ticket's mask for {name!r} has shape {tuple(mask.shape)} but the module's weight has "
                f"{None if weight is None else tuple(weight.shape)}: the ticket was found on another model."
            )
        mask = mask.to(device=weight.device, dtype=weight.dtype)
        if hasattr(module, "weight_mask"):
            module.weight_mask.copy_(mask)
        else:
            prune.custom_from_mask(module, "weight", mask)


def check_checkpoint_masks(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Refuse to resume a pruned checkpoint into a model without the same masks applied (or the reverse): its
    ``weight_orig`` / ``weight_mask`` tensors would not load into plain ``weight`` parameters, and the pruned modules
    would silently keep the fresh model's dense weights."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in Path(checkpoint).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys.update(f.keys())
    if not keys:
        return
    saved = {k.removesuffix(".weight_mask") for k in keys if k.endswith(".weight_mask")}
    here = {name for name, m in unwrap_model(model).named_modules() if hasattr(m, "weight_mask")}
    if saved != here:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it holds pruning masks for {len(saved)} modules but this model has "
            f"masks on {len(here)} (e.g. {sorted(saved ^ here)[:3]}). Apply the same ticket before building the "
            "trainer (hf_wb.tickets.load_ticket(model, round_folder)) and resume again."
        )


def make_permanent(model: nn.Module) -> None:
    """Fold every mask into its weight (``prune.remove``): plain ``weight`` parameters with zeros where pruned, the
    form ``save_pretrained`` writes for any ``transformers`` loader."""
    for module in unwrap_model(model).modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")


def sparsity(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of zeros per module and ``"total"`` over all of them."""
    out = {name: 1.0 - float(mask.float().mean()) for name, mask in masks.items()}
    zeros = sum(int((~mask.bool()).sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    out["total"] = zeros / max(total, 1)
    return out


def save_ticket(masks: dict[str, torch.Tensor], directory: str | os.PathLike, **info: Any) -> Path:
    """Write ``hf_wb_ticket.safetensors`` (uint8 masks) and ``hf_wb_ticket.json`` (``info`` + sparsity)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: mask.to(torch.uint8).contiguous().cpu() for name, mask in masks.items()}, directory / MASKS_NAME)
    summary = {**info, "sparsity": sparsity(masks)}
    (directory / TICKET_NAME).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory / MASKS_NAME


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Masks from a ticket folder or its ``hf_wb_ticket.safetensors``."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / MASKS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"No ticket at {path}: expected {MASKS_NAME} (written by hf_wb.tickets.save_ticket).")
    return {name: mask.bool() for name, mask in load_file(str(path)).items()}


def load_ticket(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the ticket at ``path`` to ``model`` (typically the pre-trained model, i.e. rewound) and return it."""
    apply_masks(model, load_masks(path))
    return model


@dataclass
class TicketRound:
    """One IMP round: its index, the sparsity it trained at, the metrics of its trainer's evaluation, and what the
    round cost (process CPU and wall seconds of its training and evaluation) with the state of the frozen-prefix cache
    (``"fill"``: this round computed it, ``"reuse"``: an earlier round's, ``"off"``: none)."""

    round: int
    sparsity: float
    metrics: dict[str, float] = field(default_factory=dict)
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    prefix_cache: str = "off"


def find_ticket(
    model_init: Callable[[], nn.Module],
    make_trainer: Callable[[nn.Module], Any],
    rounds: int,
    rate: float,
    output_dir: str | os.PathLike,
    scope: str = "global",
    include_head: bool = False,
    rewind_step: int = 0,
    share_prefix_cache: bool = True,
    on_round: Callable[[TicketRound], None] | None = None,
) -> list[TicketRound]:
    """Iterative magnitude pruning with rewind.

    Each round: ``model_init()`` (the pre-trained model, made the same way every round), the masks in force applied,
    ``make_trainer(model)`` (a ``WBTrainer``: its recipe decides which blocks train and so which are pruned), the
    late-rewind weights loaded (``rewind_step > 0``), ``train()``, ``evaluate()``, then ``rate`` of the surviving
    weights pruned by magnitude for the next round.

    Args:
        model_init: makes the starting model; call ``transformers.set_seed`` inside it so that a newly initialised
            head starts the same in every round.
        make_trainer: ``model -> WBTrainer``.
        rounds: pruning rounds R; R + 1 trainings: round 0 dense, round ``r`` at sparsity ``1 - (1 - rate) ** r``.
        rate: fraction of the surviving weights pruned after each round, in (0, 1).
        output_dir: ``round_<r>/`` folders with the masks each round trained with; the ticket (the masks of the last
            round, at the highest sparsity) in ``output_dir`` itself, with the history of rounds in
            ``hf_wb_ticket.json``.
        scope: ``"global"`` or ``"layer"`` (see :func:`magnitude_masks`).
        include_head: prune the head's weight matrices too.
        rewind_step: 0 = rewind to the starting weights; ``k`` = to the trainable weights after ``k`` steps of round 0
            (late rewinding, Frankle et al., 2020).
        share_prefix_cache: the rounds share one frozen-prefix cache (the recipe's ``cache_frozen_prefix`` decides
            whether there is one): pruning touches only the trained blocks, so the frozen blocks' outputs are the same
            in every round, and round 1 onwards trains the top blocks only. The cache's key (frozen weights, boundary,
            dtype, data) is checked at every reuse, as in a search.
        on_round: called with each :class:`TicketRound` once the round is trained, evaluated and its masks saved
            (a progress table, a log that survives an interrupted search).

    Returns:
        One :class:`TicketRound` per round (sparsity trained at, evaluation metrics, per-layer sparsity).
    """
    if rounds < 1:
        raise ValueError(f"`rounds` must be >= 1, got {rounds}.")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"`rate` must be in (0, 1) (the fraction of surviving weights pruned per round), got {rate}.")
    output_dir = Path(output_dir)
    masks: dict[str, torch.Tensor] | None = None
    rewind: dict[str, torch.Tensor] = {}
    history: list[TicketRound] = []
    pool: dict[Any, Any] | None = {} if share_prefix_cache else None
    for r in range(rounds + 1):
        model = model_init()
        if masks is not None:  # before the trainer: its layer map and groups see the pruned parameters' names
            apply_masks(model, masks)
        trainer = make_trainer(model)
        _check_recipe_keeps_weights(trainer.wb_config, include_head)
        modules = prunable_modules(model, trainer.wb_config, None, include_head)
        if rewind:
            _load_rewind(model, rewind)
        elif r == 0 and rewind_step:
            trainer.add_callback(_Snapshot(rewind_step, model, rewind))
        if pool is not None and getattr(trainer, "wb_cache_pool", None) is None:
            trainer.wb_cache_pool = pool
        filled = len(pool or {})
        cpu, wall = time.process_time(), time.perf_counter()
        trainer.train()
        if r == 0 and rewind_step and not rewind:
            raise ValueError(f"`rewind_step`={rewind_step} was never reached: round 0 trained fewer steps.")
        in_force = current_masks(modules)
        metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        status = getattr(trainer, "wb_cache_status", None) or {}
        cache = ("reuse" if pool and len(pool) == filled and r > 0 else "fill") if status.get("on") else "off"
        layers = sparsity(in_force)
        history.append(
            TicketRound(
                r,
                layers.pop("total"),
                {k: float(v) for k, v in metrics.items()},
                layers,
                round(cpu, 3),
                round(wall, 3),
                cache,
            )
        )
        logger.info(
            "hf_wb ticket round %d: sparsity %.1f%%, %.1f CPU s (prefix cache %s)", r, 100 * history[-1].sparsity,
            cpu, cache,
        )  # fmt: skip
        save_ticket(in_force, output_dir / f"round_{r}", round=r, rate=rate, scope=scope, metrics=history[-1].metrics)
        if on_round is not None:
            on_round(history[-1])
        if r < rounds:
            masks = magnitude_masks(modules, rate, scope, in_force)
    save_ticket(in_force, output_dir, rounds=rounds, rate=rate, scope=scope, history=[asdict(h) for h in history])
    return history


def _check_recipe_keeps_weights(config: WBConfig, include_head: bool) -> None:
    """Pruned modules compute with ``weight_orig * weight_mask``: a recipe that writes new weights into them at
    construction would write into a temporary and be lost. Refuse it rather than train something else."""
    if config.reinit_top_layers:
        raise ValueError(
            f"`reinit_top_layers`={config.reinit_top_layers} re-initialises the blocks a ticket prunes and rewinds; "
            "a winning ticket rewinds to the starting weights. Set `reinit_top_layers=0` for ticket search."
        )
    if include_head and config.head_init != "keep":
        raise ValueError(
            f"`head_init`={config.head_init!r} with include_head=True would re-initialise a pruned head. Use "
            "`head_init='keep'` (seed the head's init in model_init) or leave the head dense."
        )


def _load_rewind(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy the rewind weights in (a pruned module's ``weight`` goes to its ``weight_orig``)."""
    params = dict(unwrap_model(model).named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            target = params.get(name) if name in params else params.get(name + "_orig")
            if target is None:
                raise ValueError(f"The rewind weights hold {name!r}, which this model does not have.")
            target.copy_(value)


class _Snapshot(TrainerCallback):
    """Keep a copy of the trainable weights after ``step`` optimizer steps (late rewinding)."""

    def __init__(self, step: int, model: nn.Module, store: dict[str, torch.Tensor]) -> None:
        self.step, self.model, self.store = step, model, store

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and not self.store:
            named = unwrap_model(self.model).named_parameters()
            self.store.update({n: p.detach().clone() for n, p in named if p.requires_grad})
