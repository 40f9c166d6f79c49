"""Diagnostics that read the weights, gradients, activations and loss during training and give plain advice.

:class:`WeightDiagnosticsCallback` checks a model every ``DiagnosticsConfig.every_n_steps`` optimizer steps, and
always at the last step (so a run shorter than the interval is still checked), and raises a :class:`Finding`
(severity, kind, layers, evidence numbers, advice) for each of these patterns:

``dead_units``
    Forward hooks on the activation modules record, over the last ``activation_window`` training steps before each
    check, which output features were ever non-zero. ReLU-family activations (``nn.ReLU``, ``nn.ReLU6``,
    ``ReLUSquaredActivation``) count exact zeros; smooth ones (GELU, SiLU/Swish, Mish, Hardswish and transformers'
    ``GELUActivation`` & co., the modules ``ACT2FN`` builds) count ``|y| <= near_zero_atol``. A layer where more
    than ``dead_unit_fraction`` of the features never fired is reported.
``bimodal_weights``
    Sarle's bimodality coefficient (:func:`hf_wb.stats.bimodality_coefficient`) of every weight matrix. A normal
    distribution gives 1/3, a uniform one 5/9; the default threshold is 0.6 rather than the textbook 5/9 because
    PyTorch's default ``nn.Linear`` init is uniform (BC = 5/9 exactly). A symmetric mixture of two Gaussians crosses
    0.6 when its modes are about 4.4 standard deviations apart. The coefficient must also have risen by
    ``bimodality_min_rise`` since the start of training, so a pretrained layer that is bimodal by design (MiniLM's
    two-row ``token_type_embeddings`` has 0.54) is not reported.
``shrinking_weights``
    A unit's weight norm fell at each of the last ``shrink_window`` checks and by more than ``shrink_fraction`` in
    all.
``nonfinite``
    NaN/Inf, or a magnitude above ``limit_fraction`` of the dtype's largest value, in the weights (checked every
    ``nonfinite_every_n_steps`` steps, then located), the gradients (at checks; skipped with fp16 loss scaling, where
    an overflowing step is skipped by design), the logged ``loss`` / ``grad_norm``, or the training targets (read at
    the start: a NaN regression score makes every later number NaN; the advice then points at the data). The finding
    names the first tensor in forward order that holds such values. With ``stop_on_nonfinite=True`` the gradients
    are checked at *every* step (one fused norm per tensor, one synchronisation, and one all-reduce of a flag when
    several processes train): at the first non-finite gradient the step's gradients are discarded (set to ``None``,
    so the optimizer step leaves the weights as they were) and training stops cleanly
    (``control.should_training_stop``) on every rank together; non-finite targets are refused before training.
``loss_divergence``
    The logged training loss, smoothed (exponential moving average with weight ``loss_smoothing`` on the past),
    stays above ``loss_divergence_factor`` times its running minimum *and* above its first smoothed value for
    ``patience`` consecutive logged losses: the run is diverging (a learning rate too high, no gradient clipping).
``update_ratio_high`` / ``update_ratio_low``
    ``||dW|| / ||W||`` of a unit across one optimizer step, far from the ~1e-3 rule of thumb for ``patience``
    consecutive checks: above ``update_ratio_high``, or below ``update_ratio_low`` while the unit's learning rate is
    at least half its scheduled peak (so warm-up and the end of a decay are not reported).
``vanishing_gradients`` / ``exploding_gradients``
    The RMS gradient of the blocks of a stack, fitted on a log scale against depth (:func:`hf_wb.stats.depth_trend`),
    changes by more than ``depth_orders`` orders of magnitude between the bottom and the top block, for ``patience``
    consecutive checks.
``bias_prior``
    At the start of training, the class distribution the output bias alone implies (``softmax(b)``; per-label
    ``sigmoid(b)`` for multi-label) is more than ``bias_prior_kl`` nats (KL divergence) from the label prior of the
    training set. The labels come from the constructor (``labels=``) or the Trainer's training dataset.

Each finding is logged as a warning once per (kind, layer), written to TensorBoard as text (``diagnostics/<kind>``)
and appended to ``<output_dir>/diagnostics.json`` (a JSON list of dicts, rewritten as findings arrive; a new run
starts a new list, a run resumed from a checkpoint keeps the findings up to its step). Everything
runs on the main process only, except the non-finite checks when ``stop_on_nonfinite`` is set (all ranks check
and agree through an all-reduce, so they stop together). ``diagnostics.json`` is written after every completed
check even when there is nothing to report: an empty list means "checked and healthy", no file means "not checked".
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_wb.callbacks.histograms import _WriterSlot
from hf_wb.layers import LayerMap, unwrap_model
from hf_wb.stats import ParamStats, depth_trend, kl_divergence, to_floats

logger = logging.getLogger(__name__)

__all__ = ["DiagnosticsConfig", "Finding", "WeightDiagnosticsCallback", "DIAGNOSTICS_FILE", "SEVERITIES", "KINDS"]

DIAGNOSTICS_FILE = "diagnostics.json"
SEVERITIES = ("info", "warning", "critical")
KINDS = (
    "dead_units",
    "bimodal_weights",
    "shrinking_weights",
    "nonfinite",
    "loss_divergence",
    "update_ratio_high",
    "update_ratio_low",
    "vanishing_gradients",
    "exploding_gradients",
    "bias_prior",
)

_RELU_FAMILY = {"ReLU", "ReLU6", "ReLUSquaredActivation"}
_SMOOTH_FAMILY = {
    "GELU",
    "SiLU",
    "Mish",
    "Hardswish",
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "GELUTanh",
    "ClippedGELUActivation",
    "AccurateGELUActivation",
    "SiLUActivation",
    "MishActivation",
    "PytorchGELUTanh",
}


@dataclass
class DiagnosticsConfig:
    """Thresholds of :class:`WeightDiagnosticsCallback`; every default is documented in its field's help.

    Args:
        every_n_steps: check every this many optimizer steps.
        activation_window: training steps before each check during which activations are recorded.
        dead_unit_fraction: report a layer when more than this fraction of its activation features never fired.
        near_zero_atol: for smooth activations (GELU, SiLU...), ``|y| <= near_zero_atol`` counts as not firing.
        bimodality_threshold: report a weight matrix whose bimodality coefficient exceeds this.
        bimodality_min_rise: ... and has risen by at least this since the start of training.
        bimodality_min_numel: skip weight matrices with fewer values than this.
        shrink_window: consecutive checks over which a unit's weight norm must fall each time.
        shrink_fraction: ... and fall by more than this fraction in all.
        limit_fraction: magnitudes above this fraction of the dtype's largest finite value count as overflowing.
        nonfinite_every_n_steps: check the weights for NaN/Inf every this many steps (0: only at checks).
        update_ratio_low: report a unit whose update-to-weight ratio stays below this.
        update_ratio_high: report a unit whose update-to-weight ratio stays above this.
        patience: consecutive checks a ratio or depth-trend condition must hold before it is reported.
        depth_orders: report when block gradient RMS changes by more than this many orders of magnitude with depth.
        min_blocks: the depth test needs at least this many blocks with gradients.
        bias_prior_kl: report when ``KL(label prior || prior implied by the output bias)`` exceeds this (nats).
        max_label_examples: read at most this many training labels for the bias-prior check.
        loss_smoothing: weight of the past in the moving average of the logged loss (0 = no smoothing).
        loss_divergence_factor: report divergence when the smoothed loss exceeds this many times its running minimum.
    """

    every_n_steps: int = field(default=100, metadata={"help": "Check every this many optimizer steps. Default 100."})
    activation_window: int = field(
        default=10,
        metadata={
            "help": "Training steps before each check during which activation outputs are recorded. Default 10."
        },
    )
    dead_unit_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Report a layer when more than this fraction of its activation features never fired over "
            "the window. Default 0.25."
        },
    )
    near_zero_atol: float = field(
        default=1e-3,
        metadata={
            "help": "For smooth activations (GELU, SiLU, Mish), |y| <= this counts as not firing (GELU(x) is "
            "within 1e-3 of 0 for x < -3.4). ReLU-family activations count exact zeros. Default 1e-3."
        },
    )
    bimodality_threshold: float = field(
        default=0.6,
        metadata={
            "help": "Report a weight matrix whose bimodality coefficient exceeds this (normal 1/3, uniform "
            "5/9, two modes -> 1). Default 0.6, above the uniform init of nn.Linear."
        },
    )
    bimodality_min_rise: float = field(
        default=0.05,
        metadata={
            "help": "... and whose coefficient rose by at least this since the start of training. Default 0.05."
        },
    )
    bimodality_min_numel: int = field(
        default=256, metadata={"help": "Skip weight matrices with fewer values than this. Default 256."}
    )
    shrink_window: int = field(
        default=4,
        metadata={
            "help": "Report a unit whose weight norm fell at each of this many consecutive checks... Default 4."
        },
    )
    shrink_fraction: float = field(
        default=0.2, metadata={"help": "... and by more than this fraction in all. Default 0.2."}
    )
    limit_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Magnitudes above this fraction of the dtype's largest finite value count as overflowing "
            "(6550 in fp16, 3.4e37 in fp32/bf16). Default 0.1."
        },
    )
    nonfinite_every_n_steps: int = field(
        default=10,
        metadata={
            "help": "Check the weights for NaN/Inf every this many steps (one fused norm per tensor, one "
            "synchronisation); 0 checks only at the regular checks. Default 10."
        },
    )
    update_ratio_low: float = field(
        default=1e-5,
        metadata={
            "help": "Report a unit whose ||dW||/||W|| per step stays below this while its LR is at least half "
            "its peak (two orders below the ~1e-3 rule of thumb). Default 1e-5."
        },
    )
    update_ratio_high: float = field(
        default=1e-1,
        metadata={
            "help": "Report a unit whose ||dW||/||W|| per step stays above this (two orders above ~1e-3). Default 0.1."
        },
    )
    patience: int = field(
        default=2,
        metadata={
            "help": "Consecutive checks an update-ratio or depth condition must hold before it is reported. Default 2."
        },
    )
    depth_orders: float = field(
        default=2.0,
        metadata={
            "help": "Report vanishing/exploding gradients when the block gradient RMS changes by more than "
            "this many orders of magnitude from the bottom block to the top one. Default 2 (a factor 100)."
        },
    )
    min_blocks: int = field(
        default=3, metadata={"help": "The depth test needs at least this many blocks with gradients. Default 3."}
    )
    bias_prior_kl: float = field(
        default=0.1,
        metadata={
            "help": "Report at step 0 when KL(label prior || distribution implied by the output bias) exceeds "
            "this many nats (a zero bias on 80/20 labels gives 0.19, on 70/30 0.08). Default 0.1."
        },
    )
    max_label_examples: int = field(
        default=100_000,
        metadata={
            "help": "Read at most this many training labels (a random sample) for the bias-prior check. "
            "Default 100000."
        },
    )

    loss_smoothing: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the past in the exponential moving average of the logged training loss (0 = no "
            "smoothing). Default 0.5."
        },
    )
    loss_divergence_factor: float = field(
        default=2.0,
        metadata={
            "help": "Report loss divergence when the smoothed loss stays above this many times its running minimum, "
            "and above its first value, for `patience` logged losses. Default 2."
        },
    )

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "activation_window", "shrink_window", "patience", "min_blocks"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"`{name}`={value} must be >= 1.")
        if self.activation_window > self.every_n_steps:
            raise ValueError(
                f"`activation_window`={self.activation_window} must be <= `every_n_steps`={self.every_n_steps}: "
                "activations are recorded during the steps just before each check."
            )
        if self.min_blocks < 2:
            raise ValueError(f"`min_blocks`={self.min_blocks} must be >= 2 (a trend needs two blocks).")
        for name in ("dead_unit_fraction", "shrink_fraction", "limit_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"`{name}`={value} must be in (0, 1).")
        if self.nonfinite_every_n_steps < 0:
            raise ValueError(
                f"`nonfinite_every_n_steps`={self.nonfinite_every_n_steps} must be >= 0 (0 = only at checks)."
            )
        if not 0.0 < self.update_ratio_low < self.update_ratio_high:
            raise ValueError(
                f"`update_ratio_low`={self.update_ratio_low} and `update_ratio_high`={self.update_ratio_high} must "
                "satisfy 0 < low < high."
            )
        for name in ("near_zero_atol", "bimodality_min_rise", "depth_orders", "bias_prior_kl"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"`{name}`={value} must be >= 0.")
        if self.bimodality_threshold <= 0:
            raise ValueError(f"`bimodality_threshold`={self.bimodality_threshold} must be > 0 (try 0.6).")
        if self.bimodality_min_numel < 4:
            raise ValueError(f"`bimodality_min_numel`={self.bimodality_min_numel} must be >= 4.")
        if self.max_label_examples < 1:
            raise ValueError(f"`max_label_examples`={self.max_label_examples} must be >= 1.")
        if not 0.0 <= self.loss_smoothing < 1.0:
            raise ValueError(f"`loss_smoothing`={self.loss_smoothing} must be in [0, 1) (0 = no smoothing).")
        if not self.loss_divergence_factor > 1.0:
            raise ValueError(
                f"`loss_divergence_factor`={self.loss_divergence_factor} must be > 1 (a loss above its own minimum "
                "is normal noise below that)."
            )


@dataclass
class Finding:
    """One diagnosis: what was seen (``kind``, ``evidence``), where (``layers``), how bad and what to do."""

    kind: str
    severity: str
    step: int
    layers: list[str]
    message: str
    advice: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity`={self.severity!r} must be one of {SEVERITIES}.")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def to_markdown(self) -> str:
        evidence = "\n".join(f"- {k}: {_fmt(v)}" for k, v in self.evidence.items())
        return (
            f"**{self.severity.upper()} {self.kind}** at step {self.step}: {self.message}\n\n"
            f"Layers: {', '.join(f'`{x}`' for x in self.layers)}\n\nEvidence:\n{evidence}\n\nAdvice: {self.advice}"
        )


_ADVICE = {
    "dead_units": "dead ReLU units: lower the learning rate, use He (Kaiming) init, or switch to LeakyReLU/GELU; "
    "check that the inputs are normalised.",
    "bimodal_weights": "a weight distribution split in two usually means units died (dead ReLU) or the learning rate "
    "is so high that Adam's sign-like steps push weights to +-c: lower the learning rate, use He init, consider "
    "LeakyReLU/GELU.",
    "shrinking_weights": "weights are shrinking steadily towards zero: the learning rate is too high or the weight "
    "decay too strong; lower `weight_decay` (0.01 is typical with AdamW) or the learning rate.",
    "nonfinite": "values overflowed: enable gradient clipping (`max_grad_norm`, e.g. 1.0), lower the learning rate, "
    "and prefer bf16 to fp16 (or keep loss scaling on).",
    "loss_divergence": "the training loss is diverging: lower the learning rate (3-10x) and enable gradient clipping "
    "(`max_grad_norm`, e.g. 1.0); a longer warm-up (`warmup_steps`) helps too.",
    "update_ratio_high": "updates are large relative to the weights (rule of thumb ~1e-3 per step): the learning rate "
    "is too high for these layers; lower it (or their layer-wise multiplier).",
    "update_ratio_low": "updates are tiny relative to the weights (rule of thumb ~1e-3 per step): the learning rate "
    "is too low for these layers, or they are effectively frozen; raise it (or their layer-wise multiplier).",
    "vanishing_gradients": "gradients shrink by orders of magnitude towards the input: use Xavier/He init, add "
    "normalisation (LayerNorm/BatchNorm) and residual connections, or a layer-wise LR that favours lower blocks.",
    "exploding_gradients": "gradients grow by orders of magnitude towards the input: use Xavier/He init, add "
    "normalisation and residual connections, and clip gradients (`max_grad_norm`).",
    "bias_prior": "the output bias does not match the label prior, so the first updates are spent learning class "
    "frequencies: initialise the bias to log(prior) (`WBConfig(bias_prior=True)`, hf_wb.heads.init_bias_prior).",
}


_ADVICE_TARGETS = (
    "the training targets themselves hold NaN/Inf, so the loss is NaN whatever the model does: fix the data (drop or "
    "repair those rows; for GLUE STS-B the score must be a number in 0..5); clipping or a lower learning rate cannot "
    "help."
)
_ADVICE_LOSS = (
    "the loss became NaN/Inf. If the weights are finite (see the evidence), the forward pass produced it: look for "
    "NaN/Inf in the inputs or targets first (a NaN regression score does this), then an overflow (fp16: use bf16). "
    "If the weights overflowed, enable gradient clipping (`max_grad_norm`, e.g. 1.0) and lower the learning rate."
)


class WeightDiagnosticsCallback(TrainerCallback):
    """Watch weights, gradients, activations and loss during training and report :class:`Finding` s with advice.

    Args:
        config: thresholds (:class:`DiagnosticsConfig`); defaults when ``None``.
        writer: a ``SummaryWriter`` or the Trainer's ``TensorBoardCallback`` for the text summaries; by default the
            callback shares (or opens) the writer at ``log_dir``.
        stop_on_nonfinite: stop training (``control.should_training_stop``) when NaN/Inf appear.
        labels: training labels for the bias-prior check; by default read from the Trainer's training dataset.
        log_dir: folder of the callback's own writer; default ``<output_dir>/runs/hf_wb`` (shared with
            :class:`~hf_wb.callbacks.WeightHistogramCallback`).
        layers_pattern: passed to :func:`hf_wb.layers.layer_map`.
        lmap: the run's layer map (``WBTrainer`` passes its own, so every callback sees the same units); None =
            computed from the model and ``layers_pattern`` at the start of training.
        nonfinite_only: run only the non-finite checks (targets, gradients, weights, logged loss); what
            ``WBConfig(diagnostics=False, stop_on_nonfinite=True)`` uses.

    Attributes:
        findings: every finding reported so far, in order.
        stopped_at: the step at which ``stop_on_nonfinite`` stopped training, else ``None``.
    """

    def __init__(
        self,
        config: DiagnosticsConfig | None = None,
        writer: Any = None,
        stop_on_nonfinite: bool = False,
        labels: Any = None,
        log_dir: str | None = None,
        layers_pattern: str | None = None,
        lmap: LayerMap | None = None,
        nonfinite_only: bool = False,
    ) -> None:
        if config is not None and not isinstance(config, DiagnosticsConfig):
            raise TypeError(f"`config` must be a DiagnosticsConfig, got {type(config).__name__}.")
        self.config = config or DiagnosticsConfig()
        self.stop_on_nonfinite = stop_on_nonfinite
        self.labels = labels
        self.layers_pattern = layers_pattern
        self.lmap = lmap
        self.nonfinite_only = nonfinite_only
        self._slot = _WriterSlot(writer, log_dir)
        self.findings: list[Finding] = []
        self._reset()

    def _reset(self) -> None:
        self._stats: ParamStats | None = None
        self._main = False
        self._optimizer: Any = None
        self._json_path: str | None = None
        self._seen: set[tuple[str, str]] = set()
        self._hooks: list[Any] = []
        self._alive: dict[str, torch.Tensor | None] = {}
        self._activations: dict[str, tuple[nn.Module, float]] = {}
        self._pending_check: int | None = None
        self._grad_rms: dict[str, float] = {}
        self._norm_history: dict[str, deque] = {}
        self._bc_initial: dict[str, float] = {}
        self._streaks: dict[tuple[str, str], int] = {}
        self._unit_groups: dict[str, list[int]] = {}
        self._stop = False
        self._fp16_scaling = False
        self._checked = False
        self._loss_ema: float | None = None
        self._loss_first: float | None = None
        self._loss_min: tuple[float, int] | None = None
        self._targets_checked: bool | None = None
        self._loss_origin: tuple[int, float] | None = None
        self.stopped_at: int | None = None

    # -- emitting -----------------------------------------------------------------------------------------------------
    def _emit(
        self,
        kind: str,
        severity: str,
        step: int,
        layers: list[str],
        message: str,
        evidence: dict,
        advice: str | None = None,
    ) -> None:
        new = [x for x in layers if (kind, x) not in self._seen]
        if not new:
            return
        self._seen.update((kind, x) for x in new)
        finding = Finding(kind, severity, step, new, message, advice or _ADVICE[kind], evidence)
        self.findings.append(finding)
        logger.warning(
            "[hf_wb diagnostics] %s (%s) at step %d in %s: %s Advice: %s",
            kind,
            severity,
            step,
            ", ".join(new),
            message,
            finding.advice,
        )
        if self._slot.alive:
            self._slot.writer.add_text(f"diagnostics/{kind}", finding.to_markdown(), step)
            self._slot.flush()
        self._save()

    def _save(self) -> None:
        """Write ``diagnostics.json`` (main process): the findings so far; ``[]`` = checked and healthy."""
        if self._json_path is None:
            return
        os.makedirs(os.path.dirname(self._json_path) or ".", exist_ok=True)
        tmp = self._json_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump([x.to_dict() for x in self.findings], f, indent=2, sort_keys=True)
        os.replace(tmp, self._json_path)

    # -- set-up ------------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._reset()
        self._main = state.is_world_process_zero
        if not self._main and not self.stop_on_nonfinite:
            return
        model = kwargs.get("model")
        if model is None:
            raise ValueError("WeightDiagnosticsCallback needs the `model` the Trainer passes to its callbacks.")
        model = unwrap_model(model)
        self._stats = ParamStats(model, self.layers_pattern, lmap=self.lmap)
        self._fp16_scaling = bool(getattr(args, "fp16", False))
        labels = self._labels(kwargs.get("train_dataloader"))
        if not self._main:
            self._check_targets(labels, state.global_step)  # with stop_on_nonfinite every rank refuses
            return
        try:
            self._slot.open(args, state)
        except ImportError as exc:  # no TensorBoard: findings still go to the log and diagnostics.json
            logger.warning("[hf_wb diagnostics] no TensorBoard text summaries: %s", exc)
        self._json_path = os.path.join(args.output_dir or ".", DIAGNOSTICS_FILE)
        self.findings = []
        if os.path.exists(self._json_path):
            if state.global_step > 0:  # resumed from a checkpoint: keep the run's findings and report each once
                self.findings = _load_findings(self._json_path, state.global_step)
                self._seen.update((f.kind, x) for f in self.findings for x in f.layers)
            else:  # a new run: old findings would mislead
                os.remove(self._json_path)
        self._optimizer = kwargs.get("optimizer")
        self._check_targets(labels, state.global_step)
        if self.nonfinite_only:
            return
        self._map_unit_groups()
        self._find_activations(model)
        for unit, norm in self._stats.weight_norms().items():
            self._norm_history[unit] = deque([norm], maxlen=self.config.shrink_window + 1)
        self._bc_initial = self._stats.bimodality(self.config.bimodality_min_numel)
        self._check_bias_prior(model, labels, state.global_step)

    def _map_unit_groups(self) -> None:
        if self._optimizer is None:
            return
        group_of = {id(p): i for i, g in enumerate(self._optimizer.param_groups) for p in g["params"]}
        params = dict(self._stats.model.named_parameters())
        for e in self._stats.entries:
            i = group_of.get(id(params[e.name]))
            if i is not None and i not in self._unit_groups.setdefault(e.unit, []):
                self._unit_groups[e.unit].append(i)

    def _find_activations(self, model: nn.Module) -> None:
        for name, module in model.named_modules():
            cls = type(module).__name__
            if cls in _RELU_FAMILY:
                self._activations[name] = (module, 0.0)
            elif cls in _SMOOTH_FAMILY:
                self._activations[name] = (module, self.config.near_zero_atol)

    # -- activation hooks ---------------------------------------------------------------------------------------------
    def _add_hooks(self) -> None:
        for name, (module, atol) in self._activations.items():
            self._hooks.append(module.register_forward_hook(self._make_hook(name, atol)))

    def _make_hook(self, name: str, atol: float):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not module.training or not isinstance(output, torch.Tensor) or output.ndim == 0:
                return
            if name in self._alive and self._alive[name] is None:  # called with several widths: not per-unit
                return
            x = output.detach()
            fired = (x.abs() > atol).reshape(-1, x.shape[-1]).any(0)
            seen = self._alive.get(name)
            if seen is None:
                self._alive[name] = fired
            elif seen.shape == fired.shape:
                seen |= fired
            else:
                self._alive[name] = None

        return hook

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- events -------------------------------------------------------------------------------------------------------
    def _steps_to_check(self, state: TrainerState) -> int:
        """Optimizer steps after the coming one until the next check: every ``every_n_steps``, and the last step."""
        regular = (-(state.global_step + 1)) % self.config.every_n_steps
        if state.max_steps and state.max_steps > 0:
            return min(regular, max(state.max_steps - state.global_step - 1, 0))
        return regular

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self._main or self._stats is None or self._hooks or not self._activations:
            return
        if self._steps_to_check(state) < self.config.activation_window:
            self._alive = {}
            self._add_hooks()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._stats is None:
            return
        step = state.global_step + 1
        grads_checked = False
        if self.stop_on_nonfinite and not self._fp16_scaling:
            bad = self._stats.first_nonfinite_step(limit_fraction=self.config.limit_fraction)
            grads_checked = True
            if not _all_ranks_agree(bad is None):
                if self._main and self._loss_origin is not None and bad is not None and bad[2] == "gradients":
                    self._report_nonfinite_loss(step, self._loss_origin[1])
                elif bad is not None and self._main:
                    note = ""
                    if bad[2] == "gradients" and getattr(args, "max_grad_norm", 0):
                        note = (
                            " Gradient clipping scales every gradient by the total norm, so one non-finite gradient "
                            "makes them all non-finite: the first tensor named may not be where it arose."
                        )
                    self._report_nonfinite(step, bad[:2], bad[2], discarded=bad[2] == "gradients", note=note)
                for p in self._stats.model.parameters():  # the optimizer step leaves the weights as they were
                    p.grad = None
                self._halt(step)
                control.should_training_stop = True
                return control
        if not self._main or self.nonfinite_only or self._steps_to_check(state) != 0:
            return
        self._pending_check = step
        self._grad_rms = self._stats.grad_rms()
        if not self._fp16_scaling and not grads_checked:
            bad = self._stats.first_nonfinite(grads=True, limit_fraction=self.config.limit_fraction)
            if bad is not None:
                self._report_nonfinite(step, bad, "gradients")
        self._stats.snapshot()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._pending_check is None:
            return
        step, self._pending_check = self._pending_check, None
        ratios = self._stats.update_ratios()
        self._remove_hooks()
        self._checked = True
        bad = self._stats.first_nonfinite(limit_fraction=self.config.limit_fraction)
        if bad is not None:
            self._report_nonfinite(step, bad, "weights")
            self._save()
            return  # the other statistics are meaningless on overflowed weights
        self._check_dead_units(step)
        self._check_bimodality(step)
        self._check_shrinking(step, self._stats.weight_norms())
        self._check_update_ratios(step, ratios)
        self._check_depth(step)
        self._save()  # also when nothing was found: [] = checked and healthy

    def _halt(self, step: int) -> None:
        self._stop = True
        if self.stopped_at is None:
            self.stopped_at = step
            logger.warning(
                "[hf_wb diagnostics] stopping training at step %d: non-finite values (see the finding above).", step
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        every = self.config.nonfinite_every_n_steps or self.config.every_n_steps
        check_now = self._stats is not None and state.global_step % every == 0
        if check_now:
            finite = self._stats.all_finite()
            if not finite:
                # the fused norms overflow first: locate the tensor (a norm can overflow on large finite values)
                bad = self._stats.first_nonfinite(limit_fraction=self.config.limit_fraction)
                finite = bad is None
                if bad is not None and self._main:
                    self._report_nonfinite(state.global_step, bad, "weights")
            ok = finite and not self._stop
            if self.stop_on_nonfinite:
                # every rank runs this on the same steps, so they agree and stop together
                ok = _all_ranks_agree(ok)
            self._stop = not ok
        # with several processes, stop only on the steps where the ranks agreed
        may_stop = check_now or not _distributed()
        if self._stop and self.stop_on_nonfinite and may_stop and not control.should_training_stop:
            self._halt(state.global_step)
            control.should_training_stop = True
            return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not logs:
            return
        loss = logs.get("loss")
        if (
            state.is_world_process_zero
            and not self.nonfinite_only
            and isinstance(loss, (int, float))
            and math.isfinite(loss)
        ):
            self._check_divergence(args, state.global_step, float(loss))
        bad = {
            k: v
            for k, v in logs.items()
            if k in ("loss", "grad_norm") and isinstance(v, (int, float)) and not math.isfinite(v)
        }
        if not bad or self.stopped_at is not None:  # already reported when training was stopped
            return
        if state.is_world_process_zero:
            where = self._stats.first_nonfinite(limit_fraction=self.config.limit_fraction) if self._stats else None
            evidence: dict[str, Any] = {k: str(v) for k, v in bad.items()}
            if self._stats is not None:
                evidence["weights"] = "finite" if where is None else f"first non-finite: {where[0]}"
            if self._targets_checked is not None:
                evidence["targets"] = "finite" if self._targets_checked else "NaN/Inf"
            self._emit(
                "nonfinite",
                "critical",
                state.global_step,
                sorted(bad),
                f"the logged {' and '.join(sorted(bad))} became {', '.join(str(v) for v in bad.values())}"
                + (f"; the first non-finite weight in forward order is `{where[0]}`." if where else "."),
                evidence,
                advice=_ADVICE_LOSS,
            )
        self._stop = True
        if self.stop_on_nonfinite and not control.should_training_stop:
            self._halt(state.global_step)
            control.should_training_stop = True
            return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._checked:
            self._save()
        self._remove_hooks()
        self._slot.close()
        self._stats = None
        self._optimizer = None

    # -- the checks ---------------------------------------------------------------------------------------------------
    def note_nonfinite_loss(self, step: int, loss: float) -> None:
        """Record that the loss of optimizer step ``step`` was non-finite (``WBTrainer.training_step`` calls this), so
        the finding names the loss, not the gradients it made non-finite."""
        if self._loss_origin is None:
            self._loss_origin = (step, loss)

    def _report_nonfinite_loss(self, step: int, loss: float) -> None:
        where = self._stats.first_nonfinite(limit_fraction=self.config.limit_fraction)
        self._stop = True
        evidence: dict[str, Any] = {"where": "loss", "loss": str(loss), "update_discarded": True}
        evidence["weights"] = "finite" if where is None else f"first non-finite: {where[0]}"
        if self._targets_checked is not None:
            evidence["targets"] = "finite" if self._targets_checked else "NaN/Inf"
        self._emit(
            "nonfinite",
            "critical",
            step,
            ["loss"],
            f"the training loss became {loss} at step {step}"
            + (
                f"; the first non-finite weight in forward order is `{where[0]}`."
                if where
                else " while every weight was finite: the forward pass produced it."
            )
            + " The step's update was discarded.",
            evidence,
            advice=_ADVICE_LOSS,
        )

    def _report_nonfinite(
        self, step: int, bad: tuple[str, str], where: str, discarded: bool = False, note: str = ""
    ) -> None:
        name, unit = bad
        self._stop = True
        self._emit(
            "nonfinite",
            "critical",
            step,
            [name],
            f"NaN/Inf or values beyond {self.config.limit_fraction:g} x the dtype's maximum in the {where}; the "
            f"first such tensor in forward order is `{name}` (unit {unit})."
            + (" The step's update was discarded: the weights are those of the step before." if discarded else "")
            + note,
            {"where": where, "unit": unit, **({"update_discarded": True} if discarded else {})},
            advice=_ADVICE["nonfinite"] + (" " + _ADVICE_TARGETS if self._targets_checked is False else ""),
        )

    def _check_divergence(self, args: TrainingArguments, step: int, loss: float) -> None:
        """``loss_divergence``: the smoothed loss above ``loss_divergence_factor`` x its running minimum and above
        its first value, for ``patience`` logged losses in a row."""
        cfg = self.config
        s = cfg.loss_smoothing
        self._loss_ema = loss if self._loss_ema is None else s * self._loss_ema + (1 - s) * loss
        ema = self._loss_ema
        if self._loss_first is None:
            self._loss_first = ema
        if self._loss_min is None or ema < self._loss_min[0]:
            self._loss_min = (ema, step)
        low, low_step = self._loss_min
        hit = ema > cfg.loss_divergence_factor * low and ema > self._loss_first
        if self._streak(("loss_divergence", "loss"), hit) < cfg.patience:
            return
        clip = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        lr = getattr(args, "learning_rate", None)
        if clip > 0:
            advice = (
                f"the training loss is diverging with gradient clipping already on (`max_grad_norm`={clip:g}): lower "
                f"the learning rate (now {lr:g}) 3-10x, or lengthen the warm-up (`warmup_steps`)."
            )
        else:
            advice = (
                f"the training loss is diverging and gradient clipping is off (`max_grad_norm`={clip:g}): enable it "
                f"(`max_grad_norm`=1.0) and lower the learning rate (now {lr:g}) 3-10x."
            )
        self._emit(
            "loss_divergence",
            "warning",
            step,
            ["loss"],
            f"the smoothed training loss rose to {ema:.4g}, {ema / low:.3g}x its minimum {low:.4g} (step {low_step}) "
            f"and above its first value {self._loss_first:.4g}, for {cfg.patience} logged losses in a row.",
            {
                "smoothed_loss": float(f"{ema:.6g}"),
                "minimum": float(f"{low:.6g}"),
                "minimum_step": low_step,
                "first": float(f"{self._loss_first:.6g}"),
                "learning_rate": lr,
                "max_grad_norm": clip,
            },
            advice=advice,
        )

    def _check_dead_units(self, step: int) -> None:
        layers, evidence = [], {}
        recorded = {n: f for n, f in self._alive.items() if f is not None and f.numel() > 0}
        fractions = to_floats([1.0 - f.float().mean() for f in recorded.values()])  # one synchronisation
        for (name, fired), dead in zip(recorded.items(), fractions, strict=True):
            if dead > self.config.dead_unit_fraction:
                layers.append(name)
                atol = self._activations[name][1]
                kind = "exactly zero" if atol == 0 else f"|y| <= {atol:g}"
                evidence[name] = {"dead_fraction": round(dead, 4), "features": fired.numel(), "criterion": kind}
        self._alive = {}
        if layers:
            worst = max(v["dead_fraction"] for v in evidence.values())
            self._emit(
                "dead_units",
                "warning",
                step,
                layers,
                f"up to {worst:.0%} of the activation features never fired over the last "
                f"{self.config.activation_window} steps (threshold {self.config.dead_unit_fraction:.0%}).",
                evidence,
            )

    def _check_bimodality(self, step: int) -> None:
        cfg = self.config
        values = self._stats.bimodality(cfg.bimodality_min_numel)
        hits = {
            n: bc
            for n, bc in values.items()
            if bc > cfg.bimodality_threshold and bc - self._bc_initial.get(n, 0.0) >= cfg.bimodality_min_rise
        }
        if hits:
            self._emit(
                "bimodal_weights",
                "warning",
                step,
                list(hits),
                f"weight distributions became bimodal (bimodality coefficient > {cfg.bimodality_threshold:g}).",
                {
                    n: {"bimodality": round(bc, 4), "at_start": round(self._bc_initial.get(n, math.nan), 4)}
                    for n, bc in hits.items()
                },
            )

    def _check_shrinking(self, step: int, norms: dict[str, float]) -> None:
        cfg = self.config
        trainable = self._stats.trainable_units()
        layers, evidence = [], {}
        for unit, norm in norms.items():
            history = self._norm_history.setdefault(unit, deque(maxlen=cfg.shrink_window + 1))
            history.append(norm)
            if unit not in trainable or len(history) < cfg.shrink_window + 1:
                continue
            h = list(history)
            falling = all(b < a for a, b in zip(h, h[1:], strict=False))
            if falling and h[0] > 0 and h[-1] < (1.0 - cfg.shrink_fraction) * h[0]:
                layers.append(unit)
                evidence[unit] = {"norms": [round(x, 6) for x in h], "fell_by": round(1 - h[-1] / h[0], 4)}
        if layers:
            self._emit(
                "shrinking_weights",
                "warning",
                step,
                layers,
                f"weight norms fell at each of the last {cfg.shrink_window} checks, by more than "
                f"{cfg.shrink_fraction:.0%} in all.",
                evidence,
            )

    def _lr_at_peak(self, unit: str) -> bool:
        groups = self._unit_groups.get(unit)
        if self._optimizer is None or not groups:
            return True
        for i in groups:
            g = self._optimizer.param_groups[i]
            peak = g.get("initial_lr", g["lr"])
            if peak > 0 and g["lr"] >= 0.5 * peak:
                return True
        return False

    def _streak(self, key: tuple[str, str], hit: bool) -> int:
        self._streaks[key] = self._streaks.get(key, 0) + 1 if hit else 0
        return self._streaks[key]

    def _check_update_ratios(self, step: int, ratios: dict[str, float]) -> None:
        cfg = self.config
        high, low = {}, {}
        for unit, r in ratios.items():
            if self._streak(("high", unit), r > cfg.update_ratio_high) >= cfg.patience:
                high[unit] = r
            lowish = r < cfg.update_ratio_low and self._lr_at_peak(unit)
            if self._streak(("low", unit), lowish) >= cfg.patience:
                low[unit] = r
        for kind, hits, bound in (
            ("update_ratio_high", high, f"above {cfg.update_ratio_high:g}"),
            ("update_ratio_low", low, f"below {cfg.update_ratio_low:g}"),
        ):
            if hits:
                self._emit(
                    kind,
                    "warning",
                    step,
                    list(hits),
                    f"the update-to-weight ratio ||dW||/||W|| stayed {bound} for {cfg.patience} checks "
                    "(rule of thumb ~1e-3).",
                    {u: {"update_ratio": float(f"{r:.4g}"), "lr": self._unit_lr(u)} for u, r in hits.items()},
                )

    def _unit_lr(self, unit: str) -> float | None:
        groups = self._unit_groups.get(unit)
        if self._optimizer is None or not groups:
            return None
        return max(float(self._optimizer.param_groups[i]["lr"]) for i in groups)

    def _check_depth(self, step: int) -> None:
        cfg = self.config
        for stack, units in self._stats.block_units().items():
            rms = [(u, self._grad_rms[u]) for u in units if u in self._grad_rms and self._grad_rms[u] > 0]
            hit_v = hit_e = False
            trend = 0.0
            if len(rms) >= cfg.min_blocks:
                trend = depth_trend([v for _, v in rms])
                hit_v, hit_e = trend > cfg.depth_orders, trend < -cfg.depth_orders
            for kind, hit in (("vanishing_gradients", hit_v), ("exploding_gradients", hit_e)):
                if self._streak((kind, stack), hit) >= cfg.patience:
                    direction = "smaller" if kind == "vanishing_gradients" else "larger"
                    self._emit(
                        kind,
                        "warning",
                        step,
                        [rms[0][0], rms[-1][0]],
                        f"the gradient RMS of the bottom block is {abs(trend):.1f} orders of magnitude {direction} "
                        f"than the top block's ({len(rms)} blocks{', stack ' + stack if stack else ''}).",
                        {
                            "grad_rms_bottom_to_top": {u: float(f"{v:.4g}") for u, v in rms},
                            "orders_of_magnitude": round(trend, 3),
                        },
                    )

    def _labels(self, dataloader: Any) -> Any:
        if self.labels is not None:
            return self.labels
        if dataloader is None:
            return None
        from hf_wb.heads import labels_from_dataset

        return labels_from_dataset(getattr(dataloader, "dataset", None), self.config.max_label_examples)

    def _check_targets(self, labels: Any, step: int) -> None:
        """NaN/Inf training targets make the loss NaN whatever the model does: report them with data advice (and
        refuse to train when ``stop_on_nonfinite``)."""
        if labels is None:
            return
        try:
            y = torch.as_tensor(_to_array(labels))
        except (TypeError, ValueError, RuntimeError):
            return
        if not y.is_floating_point():
            self._targets_checked = True
            return
        if y.numel() == 0 or y.ndim == 0:
            return
        bad = ~torch.isfinite(y.reshape(y.shape[0], -1) if y.ndim > 1 else y)
        if bad.ndim > 1:
            bad = bad.any(1)
        rows = torch.nonzero(bad).reshape(-1).tolist()
        self._targets_checked = not rows
        if not rows:
            return
        message = (
            f"{len(rows)} of {y.shape[0]} training targets read are NaN/Inf (first at example {rows[0]}"
            f"{', then ' + ', '.join(map(str, rows[1:4])) if len(rows) > 1 else ''}): every loss that includes them "
            "is NaN."
        )
        if self._main:
            self._emit(
                "nonfinite", "critical", step, ["labels"], message, {"where": "targets", "rows": rows[:20]},
                advice=_ADVICE_TARGETS,
            )  # fmt: skip
        if self.stop_on_nonfinite:
            raise ValueError(f"Training targets are not finite: {message} Fix: {_ADVICE_TARGETS}")

    def _check_bias_prior(self, model: nn.Module, labels: Any, step: int) -> None:
        from hf_wb.heads import find_output_layer

        config = getattr(model, "config", None)
        problem = getattr(config, "problem_type", None)
        num_labels = getattr(config, "num_labels", None)
        if not isinstance(num_labels, int) or num_labels < 2 or problem == "regression":
            return
        try:
            name, layer = find_output_layer(model)
        except ValueError as exc:
            logger.debug("Bias-prior check skipped: %s", exc)
            return
        if layer.bias is None:
            return
        if labels is None:
            logger.info("Bias-prior check skipped: no training labels (pass `labels=` to WeightDiagnosticsCallback).")
            return
        y = torch.as_tensor(_to_array(labels))
        bias = layer.bias.detach().float().cpu()
        multi = problem == "multi_label_classification" or (
            y.ndim == 2 and y.shape[-1] == num_labels and y.is_floating_point()
        )
        if multi:
            y = y.reshape(-1, num_labels).float()
            prior = y.mean(0).clamp(1e-6, 1 - 1e-6)
            implied = torch.sigmoid(bias)
            kl = (
                sum(
                    kl_divergence([p, 1 - p], [q, 1 - q])
                    for p, q in zip(prior.tolist(), implied.tolist(), strict=True)
                )
                / num_labels
            )
        else:
            y = y.reshape(-1).long()
            y = y[(y >= 0) & (y < num_labels)]
            if y.numel() == 0:
                return
            prior = torch.bincount(y, minlength=num_labels).double() / y.numel()
            implied = torch.softmax(bias.double(), 0)
            kl = kl_divergence(prior.tolist(), implied.tolist())
        if kl > self.config.bias_prior_kl:
            self._emit(
                "bias_prior",
                "info",
                step,
                [name],
                f"the output bias implies class probabilities {_fmt(implied.tolist())} but the training labels have "
                f"{_fmt(prior.tolist())} (KL {kl:.3f} nats > {self.config.bias_prior_kl:g}).",
                {
                    "label_prior": [round(float(v), 4) for v in prior.tolist()],
                    "bias_implied": [round(float(v), 4) for v in implied.tolist()],
                    "kl_nats": round(kl, 4),
                    "labels_read": int(y.shape[0]),
                },
            )


def _load_findings(path: str, step: int) -> list[Finding]:
    """Findings saved by an earlier part of a resumed run, up to ``step`` (later ones belong to a lost future)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return [Finding(**item) for item in saved if item.get("step", 0) <= step]
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("Could not read the earlier findings in %s (%s); starting a new list.", path, exc)
        return []


def _to_array(labels: Any) -> Any:
    if isinstance(labels, torch.Tensor):
        return labels.detach().cpu()
    try:
        import numpy as np

        return np.asarray(labels)
    except (ValueError, TypeError):  # ragged per-token labels: pool them
        return [v for row in labels for v in row]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks_agree(ok: bool) -> bool:
    """True only if ``ok`` on every rank (all-reduce MIN) when torch.distributed is running."""
    import torch.distributed as dist

    if not _distributed():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (torch.Tensor,)):
        return _jsonable(value.tolist())
    return value


def config_help() -> dict[str, str]:
    """Help text of every :class:`DiagnosticsConfig` field (for documentation and CLIs)."""
    return {f.name: f.metadata.get("help", "") for f in fields(DiagnosticsConfig)}
