"""`WBConfig`: the portable, Hub-shareable fine-tuning recipe."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import PushToHubMixin

logger = logging.getLogger(__name__)

CONFIG_NAME = "hf_wb_config.json"
HEAD_INITS = ("keep", "xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform", "normal")
CACHE_MODES = ("off", "on", "auto")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZERS = ("lamb", "kfac")

# Fields that decide the optimizer's param groups and which tensors train: a resumed run must match them.
RECIPE_FIELDS = (
    "top_layers",
    "top_lr_multiplier",
    "head_lr_multiplier",
    "layer_lr_decay",
    "freeze_layers",
    "freeze_embeddings",
    "layers_pattern",
    "optimizer",
    "unfreeze_every",
    "unfreeze_every_steps",
)


@dataclass
class WBConfig(PushToHubMixin):
    """The hf_wb fine-tuning recipe.

    Layer-wise learning rates:
        top_layers: number of top blocks of each stack that train at `top_lr_multiplier` x the base LR.
        top_lr_multiplier: LR multiplier of the top blocks (the recipe's 5-10x).
        head_lr_multiplier: LR multiplier of the head (final norm, pooler, classifier); None means `top_lr_multiplier`.
        layer_lr_decay: blocks below the top get `lr * layer_lr_decay ** d`, d = distance below the lowest top block;
            embeddings get the rate of block 0 decayed once more. 1.0 = plain LR below the top.
    Freezing:
        freeze_layers: number of bottom blocks of each stack to freeze; -1 = every block below the top `top_layers`.
        freeze_embeddings: freeze the embeddings; None = frozen whenever any block is frozen.
        layers_pattern: regex for the name of the nn.ModuleList holding the blocks; None = discovered automatically.
    Optimizer:
        optimizer: None = the Trainer's `--optim`; "lamb" = LAMB (pytorch-optimizer) for large batches; "kfac" =
            K-FAC-preconditioned SGD with momentum (hf_wb.KFAC; its settings go in TrainingArguments.optim_args).
    Heads:
        bias_prior: set the output bias to the training-label prior before training.
        head_init: init of the output layer's weight (keep | xavier_uniform | xavier_normal | kaiming_normal |
            kaiming_uniform | normal).
        head_init_std: standard deviation for `head_init="normal"`.
        reinit_top_layers: re-initialise the top N blocks of each stack (and the pooler) before training.
        head_dropout: dropout probability of the head; None = the model's own.
    Monitoring:
        histogram_steps: write weight/bias/gradient histograms every N optimizer steps; 0 = off.
        diagnostics: watch weights and gradients and report problems with advice.
        diagnostics_steps: run the diagnostics checks every N optimizer steps (and always at the last step);
            0 = every `histogram_steps` (100 when histograms are off).
        stop_on_nonfinite: stop at the first NaN/Inf gradient or weight (checked every step while on), discard that
            step's update, and never save non-finite weights.
    Frozen prefix:
        cache_frozen_prefix: "off" | "on" | "auto": compute the frozen blocks' output once and train only the top.
        cache_dtype: storage dtype of that cache (float32 | bfloat16 | float16).
        cache_dir: folder for a memory-mapped on-disk cache; None = in memory.
        unfreeze_every: gradual unfreezing: every N epochs the highest frozen block of each stack becomes trainable
            (then the embeddings); 0 = never.
        unfreeze_every_steps: the same on a step interval; 0 = never.
    """

    top_layers: int = field(
        default=3, metadata={"help": "Number of top blocks of each stack that train at `top_lr_multiplier` x the LR."}
    )
    top_lr_multiplier: float = field(
        default=5.0, metadata={"help": "LR multiplier of the top blocks (the recipe's 5-10x)."}
    )
    head_lr_multiplier: float | None = field(
        default=None, metadata={"help": "LR multiplier of the head; None means `top_lr_multiplier`."}
    )
    layer_lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "Blocks below the top get lr * layer_lr_decay ** d (d = distance below the lowest top block); "
            "embeddings get block 0's rate decayed once more. In (0, 1]; 1.0 = plain LR."
        },
    )
    freeze_layers: int = field(
        default=-1,
        metadata={"help": "Bottom blocks of each stack to freeze; -1 = every block below the top `top_layers`."},
    )
    freeze_embeddings: bool | None = field(
        default=None, metadata={"help": "Freeze the embeddings; None = frozen whenever any block is frozen."}
    )
    layers_pattern: str | None = field(
        default=None,
        metadata={"help": "Regex for the name of the nn.ModuleList holding the blocks; None = automatic discovery."},
    )
    optimizer: str | None = field(
        default=None,
        metadata={
            "help": "None = the Trainer's `--optim`; 'lamb' = LAMB for large batches; 'kfac' = K-FAC-preconditioned "
            "SGD (settings in TrainingArguments.optim_args, e.g. 'damping=1e-3,inverse_update_steps=10')."
        },
    )
    bias_prior: bool = field(
        default=True, metadata={"help": "Set the output bias to the training-label prior before training."}
    )
    head_init: str = field(
        default="keep",
        metadata={"help": f"Init of the output layer's weight: {' | '.join(HEAD_INITS)}. Zero init is refused."},
    )
    head_init_std: float = field(default=0.01, metadata={"help": "Standard deviation for `head_init='normal'`."})
    reinit_top_layers: int = field(
        default=0, metadata={"help": "Re-initialise the top N blocks of each stack (and the pooler) before training."}
    )
    head_dropout: float | None = field(
        default=None, metadata={"help": "Dropout probability of the head; None = the model's own."}
    )
    histogram_steps: int = field(
        default=100, metadata={"help": "Write weight/bias/gradient histograms every N optimizer steps; 0 = off."}
    )
    diagnostics: bool = field(
        default=True, metadata={"help": "Watch weights and gradients and report problems with advice."}
    )
    diagnostics_steps: int = field(
        default=0,
        metadata={
            "help": "Run the diagnostics checks every N optimizer steps (and always at the last step); 0 = every "
            "`histogram_steps` (100 when histograms are off)."
        },
    )
    stop_on_nonfinite: bool = field(
        default=True,
        metadata={
            "help": "Stop at the first NaN/Inf gradient or weight (checked every step), discard that step's update, "
            "and never save non-finite weights."
        },
    )
    cache_frozen_prefix: str = field(
        default="off",
        metadata={"help": "off | on | auto: compute the frozen blocks' output once and train only the blocks above."},
    )
    cache_dtype: str = field(
        default="float32", metadata={"help": "Storage dtype of the frozen-prefix cache: float32 | bfloat16 | float16."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Folder for a memory-mapped on-disk prefix cache; None = in memory."}
    )
    unfreeze_every: int = field(
        default=0,
        metadata={
            "help": "Gradual unfreezing: every N epochs the highest frozen block of each stack trains; 0 = never."
        },
    )
    unfreeze_every_steps: int = field(
        default=0, metadata={"help": "Gradual unfreezing on a step interval; 0 = never."}
    )

    def __post_init__(self) -> None:
        # normalise: every value to its field's type (strings from JSON / YAML / the command line included)
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce_field(f.name, getattr(self, f.name)))
        if isinstance(self.optimizer, str):
            self.optimizer = self.optimizer.strip().lower() or None
        self.head_init = self.head_init.strip().lower()
        self.cache_frozen_prefix = _CACHE_MODE_ALIASES.get(
            self.cache_frozen_prefix.strip().lower(), self.cache_frozen_prefix.strip().lower()
        )
        self.cache_dtype = self.cache_dtype.strip().lower()
        if self.layers_pattern == "":
            self.layers_pattern = None
        # one rule, one error
        if self.top_layers < 1:
            raise ValueError(f"`top_layers` must be >= 1, got {self.top_layers}: at least one block must be the top.")
        if self.top_lr_multiplier <= 0:
            raise ValueError(
                f"`top_lr_multiplier` must be > 0, got {self.top_lr_multiplier}. Use 1.0 for the plain LR; "
                "to stop blocks from training, freeze them."
            )
        if self.head_lr_multiplier is not None and self.head_lr_multiplier <= 0:
            raise ValueError(
                f"`head_lr_multiplier` must be > 0 or None, got {self.head_lr_multiplier}. "
                "None uses `top_lr_multiplier`."
            )
        if not 0 < self.layer_lr_decay <= 1:
            raise ValueError(
                f"`layer_lr_decay` must be in (0, 1], got {self.layer_lr_decay}. 1.0 keeps the plain LR below "
                "the top; 0.8 to 0.95 is the usual layer-wise decay."
            )
        if self.freeze_layers < -1:
            raise ValueError(
                f"`freeze_layers` must be -1 (every block below the top) or >= 0, got {self.freeze_layers}."
            )
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"`optimizer` must be None (the Trainer's `--optim`) or one of {OPTIMIZERS}, got {self.optimizer!r}. "
                "Every Trainer optimizer is available through TrainingArguments(optim=...)."
            )
        if self.head_init in ("zeros", "zero", "constant", "ones"):
            raise ValueError(
                f"`head_init`={self.head_init!r} is refused: a constant init makes every output unit identical, they "
                "receive identical gradients and stay identical (the symmetry is never broken). Use one of "
                f"{HEAD_INITS}."
            )
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"`head_init` must be one of {HEAD_INITS}, got {self.head_init!r}.")
        if self.head_init_std <= 0:
            raise ValueError(f"`head_init_std` must be > 0, got {self.head_init_std}.")
        if self.reinit_top_layers < 0:
            raise ValueError(f"`reinit_top_layers` must be >= 0, got {self.reinit_top_layers}.")
        if self.freeze_layers == -1 and self.reinit_top_layers > self.top_layers:
            raise ValueError(
                f"`reinit_top_layers`={self.reinit_top_layers} re-initialises blocks below the top "
                f"`top_layers`={self.top_layers}, which `freeze_layers`=-1 freezes: they would stay random. Set "
                "`reinit_top_layers` <= `top_layers`, or `freeze_layers`=0."
            )
        if self.head_dropout is not None and not 0 <= self.head_dropout < 1:
            raise ValueError(f"`head_dropout` must be in [0, 1) or None, got {self.head_dropout}.")
        if self.histogram_steps < 0:
            raise ValueError(f"`histogram_steps` must be >= 0 (0 = off), got {self.histogram_steps}.")
        if self.diagnostics_steps < 0:
            raise ValueError(
                f"`diagnostics_steps` must be >= 0 (0 = every `histogram_steps`), got {self.diagnostics_steps}."
            )
        if self.cache_frozen_prefix not in CACHE_MODES:
            raise ValueError(
                f"`cache_frozen_prefix` must be one of {CACHE_MODES} (true/false/yes/no also read as on/off), got "
                f"{self.cache_frozen_prefix!r}."
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"`cache_dtype` must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}.")
        if self.unfreeze_every < 0:
            raise ValueError(f"`unfreeze_every` must be >= 0 epochs (0 = never), got {self.unfreeze_every}.")
        if self.unfreeze_every_steps < 0:
            raise ValueError(f"`unfreeze_every_steps` must be >= 0 (0 = never), got {self.unfreeze_every_steps}.")
        if self.unfreeze_every and self.unfreeze_every_steps:
            raise ValueError(
                f"Set only one of `unfreeze_every` (epochs, got {self.unfreeze_every}) and `unfreeze_every_steps` "
                f"(steps, got {self.unfreeze_every_steps})."
            )

    # ----- derived values -----------------------------------------------------------------------------------------
    @property
    def head_multiplier(self) -> float:
        return self.top_lr_multiplier if self.head_lr_multiplier is None else self.head_lr_multiplier

    def num_frozen_blocks(self, num_blocks: int) -> int:
        """How many bottom blocks of a stack of `num_blocks` this recipe freezes."""
        if self.freeze_layers == -1:
            return max(num_blocks - self.top_layers, 0)
        return self.freeze_layers

    @property
    def diagnostics_interval(self) -> int:
        """Steps between diagnostics checks: `diagnostics_steps`, else `histogram_steps`, else 100."""
        return self.diagnostics_steps or self.histogram_steps or 100

    def embeddings_frozen(self, any_block_frozen: bool) -> bool:
        return any_block_frozen if self.freeze_embeddings is None else self.freeze_embeddings

    @classmethod
    def baseline(cls, **overrides: Any) -> WBConfig:
        """Plain fine-tuning for comparisons: every LR multiplier 1, nothing frozen, no head changes."""
        values: dict[str, Any] = dict(
            top_lr_multiplier=1.0,
            head_lr_multiplier=1.0,
            layer_lr_decay=1.0,
            freeze_layers=0,
            freeze_embeddings=False,
            bias_prior=False,
            head_init="keep",
            reinit_top_layers=0,
        )
        values.update(overrides)
        return cls(**values)

    def recipe_dict(self) -> dict[str, Any]:
        """The fields that decide param groups and frozen tensors (compared on resume)."""
        return {name: getattr(self, name) for name in RECIPE_FIELDS}

    def diff(self, other: WBConfig, fields: tuple[str, ...] = RECIPE_FIELDS) -> dict[str, tuple[Any, Any]]:
        """Fields that differ: name -> (self's value, other's value)."""
        return {n: (getattr(self, n), getattr(other, n)) for n in fields if getattr(self, n) != getattr(other, n)}

    # ----- serialisation ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        from hf_wb import __version__

        return json.dumps({**self.to_dict(), "hf_wb_version": __version__}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WBConfig:
        values = dict(values)
        values.pop("hf_wb_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning(
                "Ignoring WBConfig keys %s: they come from a newer hf_wb version than this one. Upgrade hf_wb to "
                "use them.",
                unknown,
            )
        return cls(**{k: v for k, v in values.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> str:
        """Write `hf_wb_config.json` (sorted, indented, with the hf_wb version) into `save_directory`.

        With `push_to_hub=True` the recipe is then uploaded through `PushToHubMixin.push_to_hub` (`repo_id`
        defaults to the folder's name; other keyword arguments go to `push_to_hub`).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` must be a folder, got the file {save_directory}.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        Path(path).write_text(self.to_json_string(), encoding="utf-8")
        logger.info("hf_wb recipe saved to %s", path)
        if push_to_hub:
            kwargs.pop("max_shard_size", None)
            repo_id = kwargs.pop("repo_id", Path(save_directory).resolve().name)
            self.push_to_hub(repo_id, **kwargs)
        return path

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        """Upload ``hf_wb_config.json`` to the Hub repo ``repo_id`` (`PushToHubMixin.push_to_hub`); Hub failures
        (offline, no token, no such repo) raise :class:`hf_wb.hub.HubError` with one line saying the fix."""
        from hf_wb.hub import hub_error

        try:
            return super().push_to_hub(repo_id, *args, **kwargs)
        except Exception as exc:
            error = hub_error(
                exc,
                f"push the recipe to {repo_id!r}",
                "The recipe is a plain file: save it locally with `WBConfig.save_pretrained(folder)` (a run's "
                f"output folder already holds {CONFIG_NAME}) and push it later",
            )
            if error is None:
                raise
            raise error from exc

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> WBConfig:
        """Load a recipe from a JSON file, a local folder holding `hf_wb_config.json`, or a Hub repo id.

        Only JSON is read: nothing downloaded is executed or unpickled.
        """
        path = Path(path_or_repo_id)
        if path.is_file():
            return cls._from_json_file(path)
        if path.is_dir():
            file = path / CONFIG_NAME
            if not file.is_file():
                raise FileNotFoundError(f"The folder {path} holds no {CONFIG_NAME}.")
            return cls._from_json_file(file)
        from huggingface_hub import hf_hub_download

        from hf_wb.hub import hub_error, hub_offline, offline_error

        action = f"load the hf_wb recipe {str(path_or_repo_id)!r} (not a local file or folder, so a Hub repo id)"
        fix = f"Pass the path of a local folder holding {CONFIG_NAME} or of the JSON file itself"
        if hub_offline():
            raise offline_error(action, fix)
        try:
            file = hf_hub_download(str(path_or_repo_id), CONFIG_NAME, **hub_kwargs)
        except Exception as exc:
            error = hub_error(exc, action, fix)
            if error is None:
                raise
            raise error from exc
        return cls._from_json_file(Path(file))

    @classmethod
    def _from_json_file(cls, path: Path) -> WBConfig:
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of WBConfig fields, got {type(values).__name__}.")
        return cls.from_dict(values)


# ----- value conversion (one set of rules for WBConfig(...), from_pretrained, YAML / JSON files and the CLI) --------
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")
# YAML 1.1 reads `on` / `off` / `yes` / `no` as booleans, and JSON writers may too: they mean the cache's on / off.
_CACHE_MODE_ALIASES = {**dict.fromkeys(_TRUE, "on"), **dict.fromkeys(_FALSE, "off")}


@functools.cache
def _field_types() -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, accepts None), from the annotations (``int``, ``float | None``, ...)."""
    out = {}
    for name, hint in typing.get_type_hints(WBConfig).items():
        if name not in {f.name for f in dataclasses.fields(WBConfig)}:
            continue
        args = (
            typing.get_args(hint)
            if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            else ()
        )
        base = next((a for a in args if a is not type(None)), hint)
        out[name] = (base, type(None) in args)
    return out


def coerce_field(name: str, value: Any) -> Any:
    """``value`` converted to the type of the WBConfig field ``name``, or a ValueError / TypeError naming the field.

    The rules, the same wherever a recipe comes from (``WBConfig(...)``, ``from_pretrained``, a YAML or JSON file,
    the command line):

    - int fields: ints; integral floats (``2.0`` -> 2); strings holding one (``"3"``, ``"2.0"``). ``2.5``, booleans
      and other strings are refused.
    - float fields: ints, floats and numeric strings (``"1e-3"``); NaN and +-inf are refused.
    - bool fields: booleans, 0 / 1, and the strings true/false, yes/no, on/off, 1/0 (any case): the string
      ``"false"`` is False, never truthy. Anything else is refused.
    - str fields: strings; ``cache_frozen_prefix`` also takes booleans (YAML reads ``on`` / ``off`` as True / False).
    - fields that accept None: None, and the strings ``"none"`` / ``"null"`` for non-string fields.
    """
    types_ = _field_types()
    if name not in types_:
        return value
    base, optional = types_[name]
    if value is None:
        if optional:
            return None
        raise TypeError(f"`{name}` must be a {base.__name__}, got None.")
    text = value.strip() if isinstance(value, str) else None
    if optional and base is not str and text is not None and (text == "" or text.lower() in _NONE):
        return None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and int(value) in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(
            f"`{name}` must be a boolean (true/false, yes/no, on/off, 1/0), got {value!r} ({type(value).__name__})."
        )
    if base is int:
        number: Any = value
        if text is not None:
            try:
                number = (
                    float(text)
                    if any(c in text for c in ".eE") or text.lower() in ("nan", "inf", "-inf")
                    else int(text)
                )
            except ValueError:
                raise ValueError(f"`{name}` must be an integer, got the string {value!r}.") from None
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
        if isinstance(number, numbers.Integral):
            return int(number)
        if not math.isfinite(number) or not float(number).is_integer():
            raise ValueError(f"`{name}` must be an integer, got {value!r}.")
        return int(number)
    if base is float:
        number = value
        if text is not None:
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"`{name}` must be a number, got the string {value!r}.") from None
        if isinstance(number, bool) or not isinstance(number, numbers.Real):
            raise TypeError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
        number = float(number)
        if not math.isfinite(number):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}: NaN and infinity are refused.")
        return number
    if base is str:
        if isinstance(value, str):
            return value
        if name == "cache_frozen_prefix" and isinstance(value, bool):
            return "on" if value else "off"
        raise TypeError(f"`{name}` must be a string, got {value!r} ({type(value).__name__}).")
    return value
