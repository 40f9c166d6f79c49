"""`KFAC`: Kronecker-factored natural-gradient preconditioning (Martens and Grosse, 2015) for the trainable Linear
layers, on top of SGD with momentum and decoupled weight decay.

For a Linear layer with input ``a`` (a column of ones appended when it has a bias) and output gradient ``g``, K-FAC
approximates the layer's Fisher block by ``A ⊗ G`` with ``A = E[a aᵀ]`` and ``G = E[g gᵀ]``, and preconditions the
layer's gradient ``∇`` (weight and bias as one matrix) by ``G⁻¹ ∇ A⁻¹``, computed in the factors' eigenbases with a
damping term added to the eigenvalue products. Then, as in Ba et al. (2017) and the widely used implementation of
Wang (KFAC-Pytorch), the preconditioned update is scaled down so that its squared norm under the Fisher stays below
``kl_clip``.

Why our own implementation: the maintained libraries on the package index compute curvature, but none is an
optimizer that fits the Trainer's loop. ASDL's (``asdfghjkl``) K-FAC runs the model's forward and backward itself
(``GradientMaker.forward_and_backward``), which replaces the Trainer's ``training_step``, its gradient accumulation
and DDP's gradient hooks; ``curvlinops-for-pytorch`` and ``nngeometry`` give curvature matrices or linear operators,
not an optimizer step. This class is a plain ``torch.optim.Optimizer`` over the recipe's param groups: each group
keeps its own ``lr`` (the recipe's per-block rate, which the Trainer's schedulers scale) and ``weight_decay`` (0 on
biases and norms), so the recipe applies unchanged.

What the Trainer needs, and how it is met:
- schedules: the per-group ``lr`` is read at every step;
- gradient accumulation: statistics of all micro-batches of a step are combined into one estimate equal to that of
  the whole batch (the Trainer divides each micro-batch's mean loss by the number of micro-batches);
- checkpoints and resume: the factors, their eigendecompositions and the step count are part of ``state_dict()``;
- DDP: the new statistics of each factor update are averaged over the ranks before they enter the running averages,
  so every rank preconditions with the same factors (DDP itself averages the gradients);
- parameters outside Linear layers (norms, embeddings) and Linear layers without statistics get plain SGD with
  momentum; frozen layers are not touched (their hooks return at once).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["KFAC", "KFAC_DEFAULTS"]

logger = logging.getLogger(__name__)

# Documented defaults (README "K-FAC"); every one can be set through TrainingArguments.optim_args.
KFAC_DEFAULTS: dict[str, float] = {
    "momentum": 0.9,
    "damping": 0.03,
    "factor_decay": 0.95,
    "factor_update_steps": 1,
    "inverse_update_steps": 10,
    "kl_clip": 1e-3,
}


@dataclass
class _Stats:
    """Sums of the statistics a Linear layer saw since the last factor update."""

    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    num_a: int = 0
    num_g: int = 0


@dataclass
class _Eigen:
    qa: torch.Tensor
    da: torch.Tensor
    qg: torch.Tensor
    dg: torch.Tensor


@dataclass
class _Layer:
    module: nn.Linear
    stats: _Stats = field(default_factory=_Stats)


_EIGEN_KEYS = ("kfac_QA", "kfac_dA", "kfac_QG", "kfac_dG")


class KFAC(torch.optim.Optimizer):
    """K-FAC-preconditioned SGD with momentum and decoupled weight decay.

    Args:
        params: parameters or param groups (e.g. :func:`hf_wb.build_param_groups`); each group keeps its ``lr`` and
            ``weight_decay``.
        model: the model whose ``nn.Linear`` layers are preconditioned (those whose weight is in ``params``).
        lr: default learning rate of groups without one.
        momentum: SGD momentum (0.9).
        weight_decay: default decoupled weight decay of groups without one (``p -= lr * wd * p``).
        damping: Tikhonov damping added to the products of the factors' eigenvalues (0.03).
        factor_decay: running-average decay of the factors ``A`` and ``G`` (0.95).
        factor_update_steps: collect statistics and update the factors every N optimizer steps (1).
        inverse_update_steps: recompute the eigendecompositions every N optimizer steps (10).
        kl_clip: bound on ``lr² · Σ vᵀ g`` over the preconditioned layers; larger updates are scaled down (1e-3);
            0 = no clipping.
    """

    def __init__(
        self,
        params: Iterable[Any],
        model: nn.Module,
        lr: float = 1e-2,
        momentum: float = KFAC_DEFAULTS["momentum"],
        weight_decay: float = 0.0,
        damping: float = KFAC_DEFAULTS["damping"],
        factor_decay: float = KFAC_DEFAULTS["factor_decay"],
        factor_update_steps: int = int(KFAC_DEFAULTS["factor_update_steps"]),
        inverse_update_steps: int = int(KFAC_DEFAULTS["inverse_update_steps"]),
        kl_clip: float = KFAC_DEFAULTS["kl_clip"],
    ) -> None:
        checks = {
            "lr": (lr, lr >= 0),
            "momentum": (momentum, 0 <= momentum < 1),
            "weight_decay": (weight_decay, weight_decay >= 0),
            "damping": (damping, damping > 0),
            "factor_decay": (factor_decay, 0 <= factor_decay < 1),
            "factor_update_steps": (factor_update_steps, int(factor_update_steps) == factor_update_steps >= 1),
            "inverse_update_steps": (inverse_update_steps, int(inverse_update_steps) == inverse_update_steps >= 1),
            "kl_clip": (kl_clip, kl_clip >= 0),
        }
        for name, (value, ok) in checks.items():
            if not ok or not math.isfinite(value):
                raise ValueError(
                    f"KFAC `{name}` must be finite and in its range (lr, weight_decay, kl_clip >= 0; damping > 0; "
                    f"momentum and factor_decay in [0, 1); update intervals integers >= 1), got {value!r}."
                )
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.damping = float(damping)
        self.factor_decay = float(factor_decay)
        self.factor_update_steps = int(factor_update_steps)
        self.inverse_update_steps = int(inverse_update_steps)
        self.kl_clip = float(kl_clip)
        self.steps = 0
        self._layers: dict[nn.Parameter, _Layer] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._layers[module.weight] = _Layer(module)
                self._handles.append(module.register_forward_hook(self._forward_hook))
        self._refresh_managed()

    # ----- which layers ---------------------------------------------------------------------------------------------
    def _refresh_managed(self) -> None:
        self._managed = {p for g in self.param_groups for p in g["params"]}

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # gradual unfreezing adds groups mid-run
        super().add_param_group(param_group)
        if hasattr(self, "_layers"):
            self._refresh_managed()

    def _preconditioned(self, layer: _Layer) -> bool:
        return layer.module.weight in self._managed and layer.module.weight.requires_grad

    @property
    def collecting(self) -> bool:
        """Whether the forward and backward passes of this step are recorded (every ``factor_update_steps``)."""
        return self.steps % self.factor_update_steps == 0

    # ----- statistics -----------------------------------------------------------------------------------------------
    def _forward_hook(self, module: nn.Linear, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if not (module.training and torch.is_grad_enabled() and self.collecting):
            return
        layer = self._layers.get(module.weight)
        if layer is None or not self._preconditioned(layer) or not output.requires_grad:
            return
        x = inputs[0].detach()
        batch = x.shape[0] if x.dim() > 1 else 1
        a = x.reshape(-1, x.shape[-1]).float()
        if module.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        stats = layer.stats
        cov = a.T @ (a / a.shape[0])
        stats.a = cov if stats.a is None else stats.a + cov
        stats.num_a += 1
        output.register_hook(partial(self._grad_hook, layer, batch))

    @staticmethod
    def _grad_hook(layer: _Layer, batch: int, grad: torch.Tensor) -> None:
        # The loss is a mean over the batch: scale back to per-example gradients (Kronecker factor of the Fisher).
        g = grad.detach().reshape(-1, grad.shape[-1]).float() * batch
        cov = g.T @ (g / g.shape[0])
        stats = layer.stats
        stats.g = cov if stats.g is None else stats.g + cov
        stats.num_g += 1

    def _update_factors(self) -> None:
        fresh = []
        for weight, layer in self._layers.items():
            stats = layer.stats
            if stats.num_a and stats.num_g and self._preconditioned(layer):
                # Mean over the micro-batches for A; G of a micro-batch of a k-way accumulated step is 1/k² of its
                # own batch's (the loss was divided by k), so k * sum = the mean of the micro-batch estimates.
                fresh.append((weight, stats.a / stats.num_a, stats.g * stats.num_g))
            layer.stats = _Stats()
        _all_reduce_mean([t for _, a, g in fresh for t in (a, g)])
        for weight, a, g in fresh:
            state = self.state[weight]
            if "kfac_A" not in state:
                state["kfac_A"], state["kfac_G"] = a, g
            else:
                state["kfac_A"].mul_(self.factor_decay).add_(a, alpha=1 - self.factor_decay)
                state["kfac_G"].mul_(self.factor_decay).add_(g, alpha=1 - self.factor_decay)

    def _update_eigen(self) -> None:
        for weight, layer in self._layers.items():
            state = self.state.get(weight, {})
            for key in _EIGEN_KEYS:
                state.pop(key, None)
            if "kfac_A" not in state or not self._preconditioned(layer):
                continue
            try:
                da, qa = torch.linalg.eigh(state["kfac_A"])
                dg, qg = torch.linalg.eigh(state["kfac_G"])
            except torch.linalg.LinAlgError:  # non-finite or degenerate statistics: this layer falls back to SGD
                _warn_once(
                    f"K-FAC: the curvature factors of a {tuple(weight.shape)} Linear layer could not be decomposed "
                    "(non-finite or degenerate statistics); it takes plain SGD steps until they can. Lower the "
                    "learning rate or raise `damping`."
                )
                continue
            # Kept in the optimizer state, so that a resumed run preconditions with the same eigenbases.
            state.update(zip(_EIGEN_KEYS, (qa, da.clamp_(min=0.0), qg, dg.clamp_(min=0.0)), strict=True))

    # ----- the step -------------------------------------------------------------------------------------------------
    def _lr_of(self) -> dict[nn.Parameter, float]:
        return {p: group["lr"] for group in self.param_groups for p in group["params"]}

    def _precondition(self) -> None:
        lrs = self._lr_of()
        updates, vg = [], 0.0
        for weight, layer in self._layers.items():
            state = self.state.get(weight, {})
            if _EIGEN_KEYS[0] not in state or weight.grad is None or not self._preconditioned(layer):
                continue
            eig = _Eigen(*(state[k] for k in _EIGEN_KEYS))
            bias = layer.module.bias
            with_bias = bias is not None and bias.grad is not None and bias in self._managed
            grad = weight.grad.float()
            if bias is not None:  # the factor A has the bias column whether or not the bias trains
                column = bias.grad.float() if with_bias else torch.zeros_like(grad[:, :1].squeeze(1))
                grad = torch.cat([grad, column.unsqueeze(1)], dim=1)
            v = eig.qg.T @ grad @ eig.qa
            v = v / (eig.dg.unsqueeze(1) * eig.da.unsqueeze(0) + self.damping)
            v = eig.qg @ v @ eig.qa.T
            vg += float((v * grad).sum()) * lrs[weight] ** 2
            updates.append((weight, bias if with_bias else None, v))
        nu = min(1.0, math.sqrt(self.kl_clip / vg)) if self.kl_clip and vg > 0 else 1.0
        for weight, bias, v in updates:
            weight.grad.copy_(v[:, : weight.shape[1]].mul(nu))
            if bias is not None:
                bias.grad.copy_(v[:, -1].mul(nu))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.collecting:
            self._update_factors()
        if self.steps % self.inverse_update_steps == 0:
            self._update_eigen()
        self._precondition()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if wd:
                    p.mul_(1 - lr * wd)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = p.grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(p.grad)
                p.add_(buf, alpha=-lr)
        self.steps += 1
        return loss

    # ----- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["kfac"] = {"steps": self.steps}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kfac", {})
        super().load_state_dict(state_dict)
        self.steps = int(extra.get("steps", 0))

    def remove_hooks(self) -> None:
        """Detach the statistics hooks from the model (the optimizer stops preconditioning new statistics)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


_WARNED: set[str] = set()


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    if not tensors or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
