"""How the task head starts: bias prior, output-layer init, top-block re-init and head dropout.

With the default Hugging Face head (weights N(0, ``initializer_range``), bias 0) a model on an imbalanced task starts
by predicting a uniform distribution and spends its first updates learning the class prior. The functions here set
the head up before training (``WBTrainer`` calls :func:`apply_head_recipe` once, never again on resume):

1. :func:`reinit_top_layers` re-initialises the top N blocks of every stack and the pooler with the model's own
   ``_init_weights`` (Zhang et al. 2021, "Revisiting Few-sample BERT Fine-tuning");
2. :func:`set_head_dropout` sets the probability of the dropout(s) applied in the task head;
3. :func:`init_head` draws the output layer's weight (Xavier, He/Kaiming or a small normal; constants are refused);
4. :func:`init_bias_prior` writes the output bias from the training labels, last, so that the first prediction
   matches the data ("init well"; the RetinaNet prior init):

   - single-label classification (softmax over ``num_labels >= 2``, also for binary tasks): ``b_c = log(pi_c)``,
     so ``softmax(b) = pi`` and, for two classes, ``b_1 - b_0 = log(p / (1 - p))``;
   - multi-label classification (one sigmoid per label, BCE): ``b_j = log(p_j / (1 - p_j))``;
   - regression (``num_labels == 1``, MSE): ``b = mean(y)`` (one mean per target column with several targets).

   A class that never occurs (or a label that is always on) would give ``log(0) = -inf``: frequencies are clipped
   to ``[eps, 1 - eps]`` with ``eps = 1e-4`` (:data:`DEFAULT_EPS`) and a warning names the classes. A fixed floor
   keeps every logit gap within ``log((1 - eps) / eps) ~ 9.2`` nats whatever the dataset size, so the first example
   of an unseen class costs at most ~9.2 nats and its gradient is not saturated; a floor like ``1 / (2N)`` would push
   unseen classes further down the larger the dataset is.

Every tensor written here is written in place under ``torch.no_grad()`` and flagged ``_is_hf_initialized`` so that
transformers' own init machinery (``initialize_weights``, which skips flagged tensors in v5) leaves it alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .layers import base_model_name, layer_map, unwrap_model

__all__ = [
    "DEFAULT_EPS",
    "HEAD_INIT_METHODS",
    "PROBLEM_TYPES",
    "apply_head_recipe",
    "check_head_init",
    "find_head_dropout",
    "find_output_layer",
    "init_bias_prior",
    "init_head",
    "label_prior",
    "labels_from_dataset",
    "reinit_top_layers",
    "set_head_dropout",
]

logger = logging.getLogger(__name__)

DEFAULT_EPS = 1e-4
"""Floor for class frequencies in :func:`init_bias_prior` (see the module docstring for the choice)."""

IGNORE_INDEX = -100
"""Label value ignored by classification losses (``CrossEntropyLoss``'s ``ignore_index``), ignored here too."""

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)

HEAD_INIT_METHODS = ("keep", "xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform", "normal")
_CONSTANT_INITS = frozenset({"zeros", "zero", "zeros_", "ones", "ones_", "one", "constant", "constant_", "eye"})

# config fields that hold the head dropout of common architectures (kept in sync so a saved model keeps it)
_HEAD_DROPOUT_CONFIG_FIELDS = ("classifier_dropout", "seq_classif_dropout", "cls_dropout")

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# --------------------------------------------------------------------------------------------------------------------
# Locating the head
# --------------------------------------------------------------------------------------------------------------------


def _base_prefix(model: nn.Module) -> str | None:
    """Qualified name of the base model inside a task model (``bert``, ``roberta``, ``transformer``...), if any."""
    return base_model_name(model) or None


def _head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of the task head, in registration order: those outside the base model (``model.bert`` ...).

    A model without a separate base model (a bare encoder, a custom ``nn.Module``) falls back to the modules that
    :func:`hf_wb.layers.layer_map` puts in the ``head`` role (after the last block).
    """
    prefix = _base_prefix(model)
    # PEFT's ModulesToSaveWrapper keeps a frozen `original_module` beside the copy that trains: skip the former
    inactive = [f"{n}.original_module" for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    if prefix is not None:
        return [
            (n, m)
            for n, m in model.named_modules()
            if n and n != prefix and not n.startswith(prefix + ".") and not any(_within(n, i) for i in inactive)
        ]
    try:
        units = layer_map(model).module_units
    except ValueError:
        return [(n, m) for n, m in model.named_modules() if n]
    return [(n, m) for n, m in model.named_modules() if n and units.get(n, ("", "", None))[1] == "head"]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _num_labels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(
            f"{type(model).__name__} has no `config.num_labels` (got {num_labels!r}), so its output layer cannot be "
            "identified. Pass a transformers model with a classification or regression head "
            "(e.g. AutoModelForSequenceClassification.from_pretrained(..., num_labels=2))."
        )
    return num_labels


def find_output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """Find the output layer of a sequence / token classification or regression head.

    The output layer is the last ``nn.Linear`` of the task head (outside the base model) that produces
    ``config.num_labels`` outputs: BERT/DeBERTa-v2/DistilBERT ``classifier``, RoBERTa/ELECTRA ``classifier.out_proj``,
    BART/T5 ``classification_head.out_proj``, GPT-2/Llama ``score`` (which has no bias).

    Returns:
        ``(qualified name, layer)``.

    Raises:
        ValueError: when the model has no such layer (e.g. ``T5ForConditionalGeneration``, a bare ``BertModel``).
    """
    model = unwrap_model(model)
    num_labels = _num_labels(model)
    found = [(n, m) for n, m in _head_modules(model) if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no output layer for `num_labels`={num_labels}: no nn.Linear with "
            f"{num_labels} outputs was found in its task head. Head utilities (bias prior, head init, head dropout) "
            "need a sequence / token classification or regression model, e.g. one loaded with "
            "AutoModelForSequenceClassification or AutoModelForTokenClassification; for other models set "
            "`bias_prior`=False and `head_init`='keep'."
        )
    return found[-1]


def _is_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) or (
        type(module).__name__.endswith("Dropout") and isinstance(getattr(module, "p", None), float)
    )


def find_head_dropout(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dropout module(s) applied in the task head, in registration order.

    These are the dropout modules outside the base model: BERT / DistilBERT / DeBERTa-v2 ``dropout`` (the model-level
    dropout applied to the pooled output before ``classifier``), DeBERTa-v2's ``pooler.dropout``, RoBERTa / ELECTRA
    ``classifier.dropout``, BART ``classification_head.dropout``. GPT-2 and Llama sequence classifiers have none (an
    empty list).
    """
    model = unwrap_model(model)
    return [(n, m) for n, m in _head_modules(model) if _is_dropout(m)]


def set_head_dropout(model: nn.Module, p: float) -> list[str]:
    """Set the probability of every head dropout (:func:`find_head_dropout`) to ``p``.

    The config fields that hold it (``classifier_dropout``, DistilBERT's ``seq_classif_dropout``, DeBERTa's
    ``cls_dropout``) are updated too when the config has them, so a saved and reloaded model keeps ``p``.

    Returns:
        The names of the dropout modules changed (empty, with a warning, when the head applies no dropout module).
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"`head_dropout` must be a probability in [0, 1), got {p!r}; the usual range is 0.1-0.5.")
    model = unwrap_model(model)
    found = find_head_dropout(model)
    if not found:
        logger.warning(
            "`head_dropout`=%s is ignored: %s applies no dropout module in its task head.", p, type(model).__name__
        )
        return []
    for _, module in found:
        module.p = float(p)
    config = getattr(model, "config", None)
    for field_name in _HEAD_DROPOUT_CONFIG_FIELDS:
        if config is not None and hasattr(config, field_name):
            setattr(config, field_name, float(p))
    names = [n for n, _ in found]
    logger.info("Head dropout set to %s on %s", p, names)
    return names


# --------------------------------------------------------------------------------------------------------------------
# Writing tensors so that they stick
# --------------------------------------------------------------------------------------------------------------------


def _write(tensor: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> None:
    """Run an in-place init on ``tensor`` and flag it initialised.

    The flag is cleared first: inside transformers' ``guard_torch_init_functions`` the ``torch.nn.init`` functions
    skip flagged tensors, and outside it the flag is what keeps a later ``initialize_weights()`` from redrawing it.
    """
    if hasattr(tensor, "_is_hf_initialized"):
        tensor._is_hf_initialized = False
    with torch.no_grad():
        fn(tensor)
    tensor._is_hf_initialized = True


# --------------------------------------------------------------------------------------------------------------------
# Head init
# --------------------------------------------------------------------------------------------------------------------


def check_head_init(method: str, std: float = 0.01) -> str:
    """Validate a ``head_init`` name (and ``head_init_std`` for ``normal``); return the normalised name.

    Raises:
        ValueError: for a constant init (``zeros``, ``ones``, ``constant``: symmetry) or an unknown name.
    """
    name = str(method).strip().lower()
    if name in _CONSTANT_INITS:
        raise ValueError(
            f"`head_init`={method!r} is refused: a constant weight gives every unit it feeds the same value and the "
            "same gradient, so the units stay identical (the symmetry is never broken), and a zero output weight "
            "also blocks the gradient to everything below the head at the first step (dL/dh = W^T (p - y) = 0). "
            f"Use one of {list(HEAD_INIT_METHODS)}, e.g. 'normal' with `head_init_std`=0.01 or 'xavier_uniform'. "
            "To start from the class frequencies keep `bias_prior`=True: it sets the bias, not the weight."
        )
    if name not in HEAD_INIT_METHODS:
        raise ValueError(f"`head_init`={method!r} is not a known head init; choose one of {list(HEAD_INIT_METHODS)}.")
    if name == "normal" and (isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0):
        raise ValueError(f"`head_init_std` must be a positive float for head_init='normal', got {std!r}.")
    return name


def _init_fn(method: str, std: float) -> Callable[[torch.Tensor], Any]:
    if method == "xavier_uniform":
        return nn.init.xavier_uniform_
    if method == "xavier_normal":
        return nn.init.xavier_normal_
    if method == "kaiming_normal":
        return lambda t: nn.init.kaiming_normal_(t, mode="fan_in", nonlinearity="relu")
    if method == "kaiming_uniform":
        return lambda t: nn.init.kaiming_uniform_(t, mode="fan_in", nonlinearity="relu")
    return lambda t: nn.init.normal_(t, mean=0.0, std=float(std))


def init_head(model: nn.Module, method: str, std: float = 0.01) -> str | None:
    """Re-draw the output layer's weight (see :func:`find_output_layer`) and zero its bias.

    Methods (``torch.nn.init``; fan_in / fan_out are the layer's input / output sizes):

    - ``keep``: leave the layer as loaded or initialised by the model (returns ``None``);
    - ``xavier_uniform`` / ``xavier_normal``: std ``sqrt(2 / (fan_in + fan_out))`` (Glorot);
    - ``kaiming_normal`` / ``kaiming_uniform``: std ``sqrt(2 / fan_in)`` (He, ReLU gain, fan_in mode);
    - ``normal``: N(0, ``std``), ``std`` = ``head_init_std`` (default 0.01).

    Only the output layer is touched: the head's hidden layers (RoBERTa ``classifier.dense``, DistilBERT
    ``pre_classifier``, the pooler) keep the model's own init, which matches their activation (tanh, GELU); use
    :func:`reinit_top_layers` to re-initialise the pooler. The bias is zeroed (a zero bias does not create symmetry,
    the weight breaks it); :func:`init_bias_prior` then writes the prior into it.

    Returns:
        The name of the layer initialised, or ``None`` for ``keep``.
    """
    name = check_head_init(method, std)
    if name == "keep":
        return None
    layer_name, layer = find_output_layer(model)
    _write(layer.weight, _init_fn(name, std))
    if layer.bias is not None:
        _write(layer.bias, nn.init.zeros_)
    logger.info("Head %s initialised with %s%s", layer_name, name, f" (std={std})" if name == "normal" else "")
    return layer_name


# --------------------------------------------------------------------------------------------------------------------
# Top-block re-init
# --------------------------------------------------------------------------------------------------------------------


def _owner(model: nn.Module, module_name: str) -> nn.Module:
    """The innermost module with ``_init_weights`` (a ``PreTrainedModel``) that contains ``module_name``."""
    best, best_len = model, -1
    for name, module in model.named_modules():
        if hasattr(module, "_init_weights") and (not name or module_name.startswith(name + ".")):
            if len(name) > best_len:
                best, best_len = module, len(name)
    return best


def _reinit_module(owner: nn.Module, module: nn.Module) -> None:
    init_weights = getattr(owner, "_init_weights", None)
    subs = list(module.modules())
    tensors = [*module.parameters(), *(b for b in module.buffers() if b is not None)]
    # Clear every flag of the subtree first: a parent's init may write a child's tensor (GPT-2 scales `c_proj`).
    for obj in (*subs, *tensors):
        if hasattr(obj, "_is_hf_initialized"):
            obj._is_hf_initialized = False
    with torch.no_grad():
        for sub in reversed(subs):  # children before parents, as transformers' own `smart_apply`
            if init_weights is not None:
                init_weights(sub)
            elif hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    for obj in (*subs, *tensors):
        obj._is_hf_initialized = True


def reinit_top_layers(model: nn.Module, n: int, layers_pattern: str | None = None) -> list[str]:
    """Re-initialise the top ``n`` blocks of every stack and the pooler with the model's own ``_init_weights``.

    Blocks come from :func:`hf_wb.layers.layer_map` (an encoder-decoder gets the top ``n`` blocks of the encoder and
    of the decoder); poolers are the modules named ``pooler`` (BERT ``bert.pooler``, DeBERTa-v2 ``pooler``). In
    transformers v5 tensors loaded from a checkpoint are flagged ``_is_hf_initialized`` and the model's init functions
    skip flagged tensors, so calling ``_init_weights`` alone would change nothing: the flags of every submodule and
    tensor are cleared, ``_init_weights`` is applied children first, and the flags are set again.

    Returns:
        The names of the re-initialised modules (blocks, then poolers).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`reinit_top_layers` must be a non-negative int, got {n!r}.")
    if n == 0:
        return []
    model = unwrap_model(model)
    stacks = layer_map(model, layers_pattern).stacks
    targets: list[str] = []
    for stack in stacks.values():
        if n > stack.num_blocks:
            raise ValueError(
                f"`reinit_top_layers`={n} but the stack `{stack.module_name}` of {type(model).__name__} has only "
                f"{stack.num_blocks} blocks; choose at most {stack.num_blocks} (1-6 is the usual range)."
            )
        targets.extend(stack.block_names[-n:])
    targets.extend(
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "pooler" and any(True for _ in module.parameters())
    )
    for name in targets:
        _reinit_module(_owner(model, name), model.get_submodule(name))
    logger.info("Re-initialised %d modules: %s", len(targets), targets)
    return targets


# --------------------------------------------------------------------------------------------------------------------
# Bias prior
# --------------------------------------------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _labels_array(labels: Any) -> tuple[np.ndarray, bool]:
    """Labels as an array (1-D, or 2-D for one row per example); ragged sequences are flattened.

    Returns ``(array, ragged)``; ``ragged`` is True when per-token sequences of different lengths were flattened.
    """
    array, ragged = _labels_array_raw(labels)
    if array.dtype == np.bool_:  # multi-hot masks are float targets, 1-D booleans are class ids 0 / 1
        array = array.astype(np.float64 if array.ndim == 2 else np.int64)
    return array, ragged


def _labels_array_raw(labels: Any) -> tuple[np.ndarray, bool]:
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        return _to_numpy(labels), False
    if hasattr(labels, "with_format") and hasattr(labels, "column_names"):
        raise TypeError(
            "`labels` is a whole datasets.Dataset; pass its label column (dataset['label']) or use "
            "labels_from_dataset(dataset)."
        )
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise TypeError(
            f"`labels` must be a list, numpy array, tensor or dataset column, got {type(labels).__name__}."
        )
    items = list(labels)
    if not items:
        return np.zeros((0,)), False
    if isinstance(items[0], (list, tuple, np.ndarray, torch.Tensor)):
        rows = [_to_numpy(x) for x in items]
        if len({r.shape for r in rows}) == 1:
            return np.stack(rows), False
        return np.concatenate([r.reshape(-1) for r in rows]), True
    return np.asarray([x.item() if isinstance(x, torch.Tensor) else x for x in items]), False


def _is_integer(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.integer)


def _resolve_problem_type(model: nn.Module, num_labels: int, array: np.ndarray, problem_type: str | None) -> str:
    """Problem type as transformers infers it: explicit value, then ``config.problem_type``, then labels."""
    config_type = getattr(getattr(model, "config", None), "problem_type", None)
    if problem_type is not None:
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"`problem_type`={problem_type!r} is not one of {list(PROBLEM_TYPES)}.")
        if config_type is not None and config_type != problem_type:
            raise ValueError(
                f"`problem_type`={problem_type!r} disagrees with the model's `config.problem_type`={config_type!r}; "
                "the loss follows the config, so the prior must too. Pass problem_type=None or fix the config."
            )
        return problem_type
    if config_type is not None:
        return config_type
    if num_labels == 1:
        return REGRESSION
    if _is_integer(array):
        return SINGLE_LABEL
    if array.ndim == 2 and array.shape[1] == num_labels:
        return MULTI_LABEL
    logger.warning(
        "Float labels of shape %s with `num_labels`=%d: treating them as single-label class ids. transformers' loss "
        "infers multi-label classification from float labels, so cast them to int (or set `config.problem_type`).",
        array.shape,
        num_labels,
    )
    return SINGLE_LABEL


def _single_label_prior(y: np.ndarray, num_labels: int, eps: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    y = y.reshape(-1)
    if not _is_integer(y):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("Single-label classification labels must be integer class ids (or -100 to ignore).")
        y = y.astype(np.int64)
    y = y[y != IGNORE_INDEX]
    if y.size == 0:
        raise ValueError("No labels left after dropping -100: the bias prior needs at least one labelled example.")
    bad = y[(y < 0) | (y >= num_labels)]
    if bad.size:
        raise ValueError(
            f"Labels must be class ids in [0, {num_labels}) for `num_labels`={num_labels}; "
            f"found {sorted({int(b) for b in bad})[:5]}."
        )
    counts = np.bincount(y, minlength=num_labels).astype(np.float64)
    priors = counts / counts.sum()
    clipped = [int(c) for c in np.flatnonzero(priors < eps)]
    if clipped:
        priors = np.maximum(priors, eps)
        priors = priors / priors.sum()
    return priors, np.log(priors), clipped


def _multi_label_prior(y: np.ndarray, num_labels: int, eps: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    if y.ndim != 2 or y.shape[1] != num_labels:
        raise ValueError(
            f"Multi-label classification needs one multi-hot row of {num_labels} values per example; got labels of "
            f"shape {tuple(y.shape)}."
        )
    y = y.astype(np.float64)
    mask = y != IGNORE_INDEX
    if np.any((y[mask] < 0) | (y[mask] > 1)) or not np.all(np.isfinite(y[mask])):
        raise ValueError("Multi-label targets must lie in [0, 1] (multi-hot, or soft labels), or be -100 to ignore.")
    valid = mask.sum(axis=0)
    if np.any(valid == 0):
        raise ValueError(f"Labels {np.flatnonzero(valid == 0).tolist()} have no example (all -100): no prior.")
    p = np.where(mask, y, 0.0).sum(axis=0) / valid
    clipped = [int(j) for j in np.flatnonzero((p < eps) | (p > 1 - eps))]
    p = np.clip(p, eps, 1 - eps)
    return p, np.log(p / (1 - p)), clipped


def _regression_prior(y: np.ndarray, num_labels: int) -> np.ndarray:
    y = y.astype(np.float64)
    if num_labels == 1:
        y = y.reshape(-1, 1)
    elif y.ndim != 2 or y.shape[1] != num_labels:
        raise ValueError(f"Regression with `num_labels`={num_labels} needs targets of shape (N, {num_labels}).")
    if y.shape[0] == 0:
        raise ValueError("No regression targets: the bias prior needs at least one example.")
    if not np.all(np.isfinite(y)):
        raise ValueError("Regression targets contain NaN or inf; clean them before computing the bias prior.")
    return y.mean(axis=0)


def _add_bias(model: nn.Module, name: str, layer: nn.Linear) -> nn.Linear:
    """Replace a bias-free ``nn.Linear`` by one with a (zero) bias that keeps the same weight parameter."""
    new = nn.Linear(layer.in_features, layer.out_features, bias=True, device=layer.weight.device)
    new.weight = layer.weight
    new.bias = nn.Parameter(
        torch.zeros(layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device),
        requires_grad=layer.weight.requires_grad,
    )
    new.train(layer.training)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


def label_prior(model: nn.Module, labels: Any, eps: float = DEFAULT_EPS) -> tuple[str, list[float]]:
    """``(problem_type, prior)`` of ``labels`` for ``model``'s head, as :func:`init_bias_prior` computes it, without
    writing anything: class frequencies (single-label), per-label frequencies (multi-label) or target means
    (regression)."""
    model = unwrap_model(model)
    num_labels = _num_labels(model)
    array, _ = _labels_array(labels)
    kind = _resolve_problem_type(model, num_labels, array, None)
    if kind == SINGLE_LABEL:
        priors = _single_label_prior(array, num_labels, eps)[0]
    elif kind == MULTI_LABEL:
        priors = _multi_label_prior(array, num_labels, eps)[0]
    else:
        priors = _regression_prior(array, num_labels)
    return kind, [float(x) for x in priors]


def init_bias_prior(
    model: nn.Module,
    labels: Any,
    problem_type: str | None = None,
    eps: float = DEFAULT_EPS,
    add_bias: bool = False,
) -> dict[str, Any]:
    """Compute the label prior from the training labels and write it into the output bias.

    - single-label classification (softmax, ``num_labels >= 2``, HF's default, binary tasks included):
      ``b_c = log(pi_c)``, so ``softmax(b) = pi`` and ``b_1 - b_0 = log(p / (1 - p))`` for two classes;
    - multi-label (``problem_type="multi_label_classification"``, multi-hot rows, BCE): ``b_j = log(p_j/(1-p_j))``;
    - regression (``num_labels == 1`` or ``problem_type="regression"``): ``b = mean(y)`` (per column).

    The problem type is resolved as transformers does in the model's forward: ``problem_type``, then
    ``model.config.problem_type``, then ``num_labels == 1`` -> regression, integer labels -> single-label, float rows
    of ``num_labels`` values -> multi-label. Classification labels equal to -100 are ignored (the losses'
    ``ignore_index``); per-token labels (token classification, ragged or padded) are pooled over all tokens.
    Regression targets are used as they are (MSE has no ignore index). Frequencies are clipped to ``[eps, 1 - eps]``
    with a warning when a class never occurs or a label is always on, so every bias is finite.

    Heads without a bias (GPT-2 / Llama ``score``): by default the prior cannot be set; a warning says so and the
    result has ``bias=None``. With ``add_bias=True`` the layer is replaced by an ``nn.Linear`` with a bias that keeps
    the same weight parameter, and the prior is written into it. Call it before the optimizer is created, and note
    that ``from_pretrained`` of such a class builds ``score`` without a bias, so a reloaded model drops it (it will
    report ``score.bias`` as unexpected): evaluate in the same process or load the state dict yourself.

    Args:
        model: a classification / regression model (see :func:`find_output_layer`).
        labels: training labels: list, numpy array, tensor, ``datasets`` column; nested for multi-label / per-token.
        problem_type: one of :data:`PROBLEM_TYPES`, or ``None`` to infer it.
        eps: floor for class frequencies, default :data:`DEFAULT_EPS` = 1e-4.
        add_bias: give a bias-free output layer a bias (see above).

    Returns:
        ``{"problem_type", "layer", "num_examples", "priors", "bias", "clipped", "eps"}``: ``priors`` are the class
        frequencies (label frequencies, or target means for regression) after clipping, ``bias`` what was written
        (``None`` when it could not be), ``clipped`` the indices of clipped classes.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"`eps` must lie in (0, 0.5), got {eps!r}; the default is {DEFAULT_EPS}.")
    model = unwrap_model(model)
    layer_name, layer = find_output_layer(model)
    num_labels = _num_labels(model)
    array, ragged = _labels_array(labels)
    kind = _resolve_problem_type(model, num_labels, array, problem_type)
    if ragged and kind != SINGLE_LABEL:
        raise ValueError(
            f"Labels are sequences of different lengths, which only fits single-label classes; got {kind}."
        )

    clipped: list[int] = []
    if kind == SINGLE_LABEL:
        if num_labels < 2:
            raise ValueError("Single-label classification needs `num_labels` >= 2; with 1 label use regression.")
        priors, bias, clipped = _single_label_prior(array, num_labels, eps)
        num_examples = int(np.sum(array.reshape(-1) != IGNORE_INDEX))
    elif kind == MULTI_LABEL:
        priors, bias, clipped = _multi_label_prior(array, num_labels, eps)
        num_examples = int(array.shape[0])
    else:
        priors = _regression_prior(array, num_labels)
        bias = priors
        num_examples = int(array.shape[0]) if array.ndim else 1
    if clipped:
        logger.warning(
            "Bias prior: %s %s never occur%s in the %d training labels (or always do); their frequency is clipped "
            "to [%g, %g] so the bias stays finite.",
            "classes" if len(clipped) > 1 else "class",
            clipped,
            "" if len(clipped) > 1 else "s",
            num_examples,
            eps,
            1 - eps,
        )

    result: dict[str, Any] = {
        "problem_type": kind,
        "layer": layer_name,
        "num_examples": num_examples,
        "priors": [float(x) for x in priors],
        "bias": [float(x) for x in bias],
        "clipped": clipped,
        "eps": eps,
    }
    if layer.bias is None:
        if not add_bias:
            logger.warning(
                "The output layer `%s` of %s has no bias, so the label prior cannot be set (computed priors: %s). "
                "Pass add_bias=True to init_bias_prior to give it one, or set `bias_prior`=False.",
                layer_name,
                type(model).__name__,
                [round(x, 4) for x in result["priors"]],
            )
            result["bias"] = None
            return result
        layer = _add_bias(model, layer_name, layer)
        result["added_bias"] = True
    if layer.bias.shape != (num_labels,):
        raise ValueError(f"`{layer_name}.bias` has shape {tuple(layer.bias.shape)}, expected ({num_labels},).")
    value = torch.as_tensor(np.asarray(bias, dtype=np.float64), dtype=layer.bias.dtype, device=layer.bias.device)
    _write(layer.bias, lambda t: t.copy_(value))
    logger.info(
        "Bias prior (%s) on %s from %d labels: priors=%s bias=%s",
        kind,
        layer_name,
        num_examples,
        [round(x, 4) for x in result["priors"]],
        [round(x, 4) for x in result["bias"]],
    )
    return result


# --------------------------------------------------------------------------------------------------------------------
# Labels of a training set, and the recipe
# --------------------------------------------------------------------------------------------------------------------

LABEL_COLUMNS = ("labels", "label")


def labels_from_dataset(dataset: Any, max_examples: int | None = None, seed: int = 0) -> list | None:
    """The training labels of ``dataset`` (column ``labels``, else ``label``), or ``None`` when they cannot be read.

    - ``datasets.Dataset``: the column, read whole (respecting ``select`` / ``shuffle`` indices);
    - a map-style torch ``Dataset`` (``__len__`` + ``__getitem__``) of dicts: every item is read; with
      ``max_examples`` and a longer dataset, a uniform random sample of ``max_examples`` items (fixed ``seed``);
    - an iterable dataset (``datasets.IterableDataset``, ``torch.utils.data.IterableDataset``), items without a
      label key, or anything else: ``None`` (pass the labels to :func:`init_bias_prior` yourself).
    """
    if dataset is None:
        return None
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and hasattr(dataset, "with_format"):
        column = next((c for c in LABEL_COLUMNS if c in column_names), None)
        if column is None or not hasattr(dataset, "__len__"):
            return None
        values = dataset.with_format(None)[column]
        return list(values[:]) if type(values).__name__ == "Column" else list(values)
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")) or isinstance(
        dataset, torch.utils.data.IterableDataset
    ):
        return None
    try:
        size = len(dataset)
    except TypeError:
        return None
    if size == 0:
        return None
    first = dataset[0]
    if not isinstance(first, Mapping):
        return None
    key = next((k for k in LABEL_COLUMNS if k in first), None)
    if key is None:
        return None
    indices: Sequence[int] = range(size)
    if max_examples is not None and size > max_examples:
        generator = torch.Generator().manual_seed(seed)
        indices = sorted(torch.randperm(size, generator=generator)[:max_examples].tolist())
        logger.info("Reading the labels of %d of %d training examples for the bias prior.", max_examples, size)
    labels = []
    for i in indices:
        value = dataset[i][key]
        labels.append(value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value)
    return labels


_APPLIED_ATTR = "_hf_wb_head_recipe"


def apply_head_recipe(model: nn.Module, config: Any, labels: Any = None, force: bool = False) -> dict[str, Any]:
    """Apply the head part of a recipe once, before training (not on resume).

    Order: :func:`reinit_top_layers` -> :func:`set_head_dropout` -> :func:`init_head` -> :func:`init_bias_prior`
    (last, so nothing overwrites the prior). Reads ``config.reinit_top_layers`` (0), ``config.head_dropout`` (None),
    ``config.head_init`` ("keep"), ``config.head_init_std`` (0.01), ``config.bias_prior`` (True) and
    ``config.layers_pattern`` (None), with those defaults when a field is missing. Every setting is validated before
    anything is changed. With ``bias_prior`` and no ``labels`` the prior is skipped with a warning (once); for a model
    without a classification / regression head (a language model) it is skipped with an info message.

    The summary is stored on the model; a second call on the same model (a second trainer built around an already
    prepared or trained model) changes nothing and returns the stored summary, unless ``force=True``: re-running
    :func:`reinit_top_layers` would otherwise wipe trained blocks.

    Returns:
        A summary for logging: ``{"reinit": [...], "head_dropout": {...}, "head_init": {...}, "bias_prior": {...}}``
        (keys only for the steps that ran; ``bias_prior`` is ``None`` when it was skipped).
    """
    model = unwrap_model(model)
    applied = getattr(model, _APPLIED_ATTR, None)
    if applied is not None and not force:
        logger.info("The head recipe was already applied to this model; skipped (pass force=True to apply it again).")
        return applied
    reinit = getattr(config, "reinit_top_layers", 0) or 0
    head_dropout = getattr(config, "head_dropout", None)
    head_init = getattr(config, "head_init", "keep") or "keep"
    std = getattr(config, "head_init_std", 0.01)
    bias_prior = bool(getattr(config, "bias_prior", True))
    layers_pattern = getattr(config, "layers_pattern", None)

    head_init = check_head_init(head_init, std)
    if isinstance(reinit, bool) or not isinstance(reinit, int) or reinit < 0:
        raise ValueError(f"`reinit_top_layers` must be a non-negative int, got {reinit!r}.")
    if head_dropout is not None and (
        isinstance(head_dropout, bool) or not isinstance(head_dropout, (int, float)) or not 0 <= head_dropout < 1
    ):
        raise ValueError(f"`head_dropout` must be None or a probability in [0, 1), got {head_dropout!r}.")

    summary: dict[str, Any] = {}
    if reinit:
        summary["reinit"] = reinit_top_layers(model, reinit, layers_pattern)
    if head_dropout is not None:
        summary["head_dropout"] = {"p": float(head_dropout), "modules": set_head_dropout(model, head_dropout)}
    if head_init != "keep":
        layer = init_head(model, head_init, std)
        summary["head_init"] = {"method": head_init, "layer": layer, **({"std": std} if head_init == "normal" else {})}
    if bias_prior:
        try:
            find_output_layer(model)
        except ValueError as exc:
            logger.info("Bias prior skipped: %s", exc)
            summary["bias_prior"] = None
        else:
            if labels is None:
                _warn_once(
                    "bias_prior_no_labels",
                    "`bias_prior`=True but no training labels were found (column `labels` or `label` of "
                    "train_dataset): the output bias keeps its init. Pass labels to init_bias_prior, or set "
                    "`bias_prior`=False to silence this.",
                )
                summary["bias_prior"] = None
            else:
                summary["bias_prior"] = init_bias_prior(model, labels)
    # a plain attribute (not a submodule or buffer): it is not saved with the weights
    object.__setattr__(model, _APPLIED_ATTR, summary)
    return summary
