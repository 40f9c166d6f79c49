"""Which engine trains a `WBTrainer` (single process, DDP, FSDP1, FSDP2, DeepSpeed ZeRO-n), how wrapped parameter
names map back to the model's own, and the guards that keep the recipe exact under each engine.

The recipe is computed on the model's own parameter names (``bert.encoder.layer.0.attention.self.query.weight``).
Wrappers insert path components into them: FSDP1 ``_fsdp_wrapped_module``, ``torch.compile``'s ``_orig_mod`` and
activation checkpointing's ``_checkpoint_wrapped_module``. :func:`canonical_name` removes them, so the optimizer's
groups built on a wrapped model carry exactly the names and rates they have on the unwrapped one.

Guards (:func:`check_requested_engine`, run by `WBTrainer` at construction, from the ``TrainingArguments`` and the
accelerate launch environment, before anything is wrapped):

- a DeepSpeed config with an ``optimizer`` or ``scheduler`` block is refused: DeepSpeed would build its own optimizer
  over all parameters (one group, no multipliers) or write one rate into every group;
- FSDP1 without ``use_orig_params``: it flattens the parameters of each wrapped unit into one tensor, so per-block
  rates and partly frozen units cannot be expressed;
- under an engine that shards parameters, gradients or optimizer state (FSDP1, FSDP2, DeepSpeed ZeRO-1/2/3) the
  features that read or rewire individual parameters after wrapping are refused: gradual unfreezing (adds groups
  to an optimizer the engine has already partitioned), the frozen-prefix cache (skips forwards the engine hooks into;
  ``cache_frozen_prefix='auto'`` falls back to no cache there, with the reason logged and in the run summary),
  monitoring (histograms and diagnostics would describe one rank's shard, or find no gradient at all) and the
  recipe's layer-wise optimizers ``lamb`` and ``kfac`` (they need each whole weight and gradient).

The checks go by the engine the configuration asks for, also where accelerate ends up running something else (an
FSDP config on a machine without GPUs runs as DDP): a configuration refused on the GPU cluster is refused on the
laptop too. :func:`detect_engine` says what actually runs; `WBTrainer` logs it once, with the world size, and warns
when an FSDP configuration runs as plain DDP or as one process.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from hf_wb.config import WBConfig
from hf_wb.layers import unwrap_model

__all__ = [
    "WRAPPER_COMPONENTS",
    "Engine",
    "canonical_name",
    "canonical_named_parameters",
    "check_deepspeed_config",
    "check_requested_engine",
    "detect_engine",
    "requested_engine",
    "skip_unused_parameter_search",
]

logger = logging.getLogger(__name__)

WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_orig_mod", "_checkpoint_wrapped_module")
"""Path components that wrappers insert into parameter names (FSDP1, torch.compile, activation checkpointing)."""


def canonical_name(name: str) -> str:
    """``name`` without the components wrappers insert: ``a._fsdp_wrapped_module.b._orig_mod.w`` -> ``a.b.w``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def canonical_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{canonical name: parameter}`` of ``model`` (outer DDP / FSDP / DeepSpeed / compile wrappers stripped first).

    Raises:
        ValueError: when the model holds FSDP1 flat parameters (``use_orig_params=False``): the model's own
            parameters are not reachable, so no recipe can be applied to them.
    """
    named: dict[str, nn.Parameter] = {}
    for name, param in unwrap_model(model).named_parameters():
        if name.rsplit(".", 1)[-1] == "_flat_param":
            raise ValueError(_FSDP1_FLAT)
        named.setdefault(canonical_name(name), param)
    return named


_FSDP1_FLAT = (
    "FSDP1 with `use_orig_params=False` flattens the parameters of every wrapped unit into one tensor, so hf_wb's "
    "per-block learning rates and partly frozen units cannot be applied (the optimizer would get one flat tensor per "
    "unit). Set `fsdp_config={'use_orig_params': True}` (accelerate config: `fsdp_use_orig_params: true`), or use "
    "FSDP2 (`fsdp_config={'version': 2}`, `fsdp_version: 2`), which always keeps the original parameters."
)


# ----- DeepSpeed config ----------------------------------------------------------------------------------------------
def _load_deepspeed_dict(config: Any, source: str) -> dict[str, Any] | None:
    if config is None or config == "" or config == "none":
        return None
    if isinstance(config, dict):
        return config
    path = Path(str(config))
    if path.is_file():
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} {path} is not valid JSON: {exc}") from exc
    else:
        try:
            values = json.loads(str(config))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} {config!r} is neither a file nor a JSON object.") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{source} {config!r} must hold a JSON object.")
    return values


def check_deepspeed_config(deepspeed: str | dict | None = None) -> None:
    """Refuse a DeepSpeed config that would override hf_wb's optimizer parameter groups.

    With an ``optimizer`` block DeepSpeed builds its own optimizer over all parameters and the Trainer never calls
    ``create_optimizer``: the layer-wise rates would be dropped without a word. A ``scheduler`` block is refused too:
    DeepSpeed's schedulers write one learning rate into every group, flattening the layer-wise rates. Both the
    ``deepspeed`` value (``TrainingArguments.deepspeed``: a path, a JSON string or a dict) and an accelerate
    DeepSpeed config (``ACCELERATE_DEEPSPEED_CONFIG_FILE``) are checked.

    Raises:
        ValueError: naming the config and the block, with the fix.
    """
    sources = [
        ("`deepspeed`", deepspeed),
        ("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")),
    ]
    for source, config in sources:
        values = _load_deepspeed_dict(config, source)
        if not values:
            continue
        for block in ("optimizer", "scheduler"):
            if block in values:
                raise ValueError(
                    f"The DeepSpeed config ({source}: {config if isinstance(config, str) else 'dict'}) has an "
                    f"`{block}` block. DeepSpeed would then build its own {block} over all parameters and silently "
                    "replace hf_wb's layer-wise parameter groups. Remove the block and set the optimizer and "
                    "schedule through TrainingArguments (--optim, --learning_rate, --lr_scheduler_type, "
                    "--warmup_steps); see configs/accelerate/deepspeed-zero2.yaml."
                )


# ----- which engine -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Engine:
    """An engine: ``name`` is ``single``, ``DDP``, ``FSDP1``, ``FSDP2`` or ``DeepSpeed ZeRO-<stage>``.

    ``use_orig_params`` is FSDP1's setting (None otherwise); ``world_size`` the number of processes (0 = unknown).
    """

    name: str
    world_size: int = 0
    use_orig_params: bool | None = None

    @property
    def sharded(self) -> bool:
        """Whether the engine shards parameters, gradients or optimizer state across ranks."""
        return self.name.startswith(("FSDP", "DeepSpeed"))


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def _zero_stage(config: dict[str, Any] | None, default: Any = 0) -> str:
    stage = ((config or {}).get("zero_optimization") or {}).get("stage", default)
    return str(stage)


def requested_engine(args: Any) -> Engine | None:
    """The sharding engine that ``args`` (``TrainingArguments``) and the accelerate launch environment ask for, or
    None for none (single process or DDP)."""
    world = int(getattr(args, "world_size", 0) or 0) if args is not None else 0
    deepspeed = getattr(args, "deepspeed", None) if args is not None else None
    plugin = getattr(args, "deepspeed_plugin", None) if args is not None else None
    if deepspeed or plugin is not None or _truthy(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        hf_config = getattr(args, "hf_deepspeed_config", None)
        stage = _zero_stage(getattr(hf_config, "config", None), getattr(plugin, "zero_stage", None) or "?")
        if stage == "?" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
            stage = os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
        return Engine(f"DeepSpeed ZeRO-{stage}", world)
    fsdp_args = getattr(args, "fsdp_plugin_args", None) if args is not None else None
    if fsdp_args is not None:
        version = int(fsdp_args.get("fsdp_version", 2))
        orig = bool(fsdp_args.get("use_orig_params", True)) if version == 1 else None
        return Engine(f"FSDP{version}", world, orig)
    if _truthy(os.environ.get("ACCELERATE_USE_FSDP", "false")):  # accelerate launch --config_file fsdp.yaml
        version = int(os.environ.get("FSDP_VERSION", "1"))
        orig = _truthy(os.environ.get("FSDP_USE_ORIG_PARAMS", "false")) if version == 1 else None
        return Engine(f"FSDP{version}", world, orig)
    return None


def check_requested_engine(args: Any, config: WBConfig) -> Engine | None:
    """Refuse, before anything is built, an engine set-up under which the recipe ``config`` cannot be applied exactly
    (see the module docstring). Returns the requested sharding engine (None for single process / DDP).

    Raises:
        ValueError: one message per problem, naming the setting and the fix.
    """
    if args is not None:
        check_deepspeed_config(getattr(args, "deepspeed", None))
        plugin = getattr(args, "deepspeed_plugin", None)
        hf_config = getattr(plugin, "hf_ds_config", None)
        if hf_config is not None and getattr(hf_config, "config", None):
            check_deepspeed_config(hf_config.config)
    else:
        check_deepspeed_config(None)
    engine = requested_engine(args)
    if engine is None:
        return None
    if engine.name == "FSDP1" and not engine.use_orig_params:
        raise ValueError(_FSDP1_FLAT)
    refused = []
    if config.unfreeze_every or config.unfreeze_every_steps:
        refused.append(
            "gradual unfreezing (`unfreeze_every` / `unfreeze_every_steps`): the engine partitions the optimizer "
            "and gradient buffers over the parameters trainable when training starts, so blocks unfrozen later "
            "would not train correctly -> set both to 0 (or freeze fewer blocks from the start with `freeze_layers`)"
        )
    if config.cache_frozen_prefix == "on":  # 'auto' falls back to no cache (WBTrainer logs why)
        refused.append(
            f"the frozen-prefix cache (`cache_frozen_prefix`={config.cache_frozen_prefix!r}): it skips the frozen "
            "blocks' forward, which the engine hooks into to gather and release their parameters -> set it to 'off' "
            "or 'auto'"
        )
    if config.optimizer in ("lamb", "kfac"):
        refused.append(
            f"`optimizer`={config.optimizer!r}: it computes per-layer quantities (LAMB's trust ratio, K-FAC's "
            "Kronecker factors) from each whole weight and gradient, which this engine shards or flattens -> leave "
            "`optimizer` unset and choose an element-wise optimizer with `--optim` (e.g. adamw_torch)"
        )
    if config.histogram_steps or config.diagnostics:
        refused.append(
            f"monitoring (`histogram_steps`={config.histogram_steps}, `diagnostics`={config.diagnostics}): "
            "the callbacks read each parameter and gradient on rank 0, which under this engine holds only a shard "
            "(or no gradient at all), so the figures would be wrong -> set `histogram_steps=0` and "
            "`diagnostics=False`"
        )
    if refused:
        raise ValueError(
            f"hf_wb cannot apply this recipe exactly under {engine.name}: "
            + "; ".join(refused)
            + ". (Checked against the configured engine, also where accelerate would run it otherwise.)"
        )
    return engine


def detect_engine(trainer: Any) -> Engine:
    """The engine that actually runs ``trainer`` (a constructed ``transformers.Trainer``), from its accelerator."""
    accelerator = getattr(trainer, "accelerator", None)
    state = getattr(accelerator, "state", None)
    world = int(getattr(accelerator, "num_processes", 0) or getattr(trainer.args, "world_size", 1) or 1)
    if dist.is_available() and dist.is_initialized():  # DeepSpeed on CPU: accelerate counts 1 process
        world = dist.get_world_size()
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(state, "deepspeed_plugin", None)
        stage = _zero_stage(getattr(plugin, "deepspeed_config", None), getattr(plugin, "zero_stage", "?"))
        return Engine(f"DeepSpeed ZeRO-{stage}", world)
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = state.fsdp_plugin
        version = int(getattr(plugin, "fsdp_version", 1))
        orig = bool(getattr(plugin, "use_orig_params", False)) if version == 1 else None
        return Engine(f"FSDP{version}", world, orig)
    return Engine("DDP" if world > 1 else "single", world)


def log_engine(trainer: Any, requested: Engine | None) -> Engine:
    """Detect the running engine, refuse FSDP1 without original parameters, log the engine once (main process) and
    warn when a requested sharding engine runs as something else. Returns the running engine."""
    engine = detect_engine(trainer)
    if engine.name == "FSDP1" and not engine.use_orig_params:
        raise ValueError(_FSDP1_FLAT)
    if not trainer.is_world_process_zero():
        return engine
    logger.info("hf_wb engine: %s, world size %d", engine.name, engine.world_size)
    if requested is not None and requested.name != engine.name:
        logger.warning(
            "The configuration asks for %s, but accelerate runs this job as %s (world size %d)%s. The recipe is "
            "applied as under %s; the model is not sharded.",
            requested.name,
            engine.name,
            engine.world_size,
            " because this machine has no GPU" if requested.name.startswith("FSDP") and not _has_gpu() else "",
            engine.name,
        )
    return engine


def skip_unused_parameter_search(trainer: Any) -> bool:
    """DDP without ``find_unused_parameters`` unless the user asks for it (Lightning's default too).

    transformers turns it on for every ``PreTrainedModel`` without activation checkpointing, so that DDP walks the
    autograd graph after every backward looking for parameters without a gradient. Under the recipe the frozen
    parameters are not registered with DDP at all (and units unfrozen later are synchronised by hf_wb), so the search
    finds nothing, costs time and warns on every rank. An explicit ``ddp_find_unused_parameters`` is kept as given;
    a model whose trainable parameters are not all used by the loss then fails at its second step with DDP's own
    error, whose fix is ``--ddp_find_unused_parameters true``.

    Returns whether the setting was changed.
    """
    handler = getattr(getattr(trainer, "accelerator", None), "ddp_handler", None)
    if trainer.args.ddp_find_unused_parameters is not None or handler is None or not handler.find_unused_parameters:
        return False
    handler.find_unused_parameters = False
    return True


def _has_gpu() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
