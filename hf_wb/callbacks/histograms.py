"""TensorBoard histograms of weights, biases and gradients, grouped by block and role, with per-unit scalars.

Every ``every_n_steps`` optimizer steps :class:`WeightHistogramCallback` writes

* histograms ``weights/<unit>/<role>`` (role ``attn``, ``ffn`` or ``norm`` inside blocks; ``weights/<unit>`` for the
  rest of a unit, ``weights/<unit>/norm`` for its norms), ``biases/<unit>`` and ``grads/<unit>``, where a unit is
  ``embeddings``, ``block_03``, ``head`` (``encoder/block_03`` in an encoder-decoder), see :mod:`hf_wb.stats`;
* scalars ``weight_norm/<unit>``, ``grad_norm/<unit>`` and ``update_ratio/<unit>`` (``||W_after - W_before|| /
  ||W_before||`` across that optimizer step), and ``lr/<param group name>`` for every optimizer param group.

Weights are also written once at the start of training (step 0) and after the last step.

**Drift from the start (fine-tuning).** Fine-tuning moves weights by a tiny fraction of their spread, so the
distribution of ``W`` barely changes; what training did is ``W - W0``. With ``drift=True`` (the default) the callback
keeps a copy ``W0`` of every trainable parameter at the start of training (on the CPU, in the parameter's dtype:
as much memory as the trainable parameters; frozen ones are not copied; a unit unfrozen later is copied when it
starts to train) and writes, at every logging step, histograms ``drift/<unit>`` (weights) and
``drift_biases/<unit>`` of ``W - W0``, and the scalar ``drift_ratio/<unit>`` = ``||W - W0|| / ||W0||``.

**Output bias.** For a classification or regression head (:func:`hf_wb.heads.find_output_layer`) with at most
:data:`MAX_HEAD_CLASSES` outputs it writes ``head/bias/<k>`` (the raw bias) and ``head/implied/<link>/<k>`` at every
weights step, where ``<link>`` is ``softmax`` (single-label: the class probabilities the bias alone implies),
``sigmoid`` (multi-label) or ``identity`` (regression); and once, at step 0, ``head/label_prior/<k>`` (class
frequencies / target means of the training labels, on the same scale) and ``head/bias_prior_applied`` (1 when the
hf_wb head recipe wrote the prior into the bias, else 0). The labels come from ``labels=``, else the training set.

**Which gradients.** In transformers 5.x ``Trainer._run_epoch`` clips the gradients (``max_grad_norm``, through
``accelerator.clip_grad_norm_``, which first unscales fp16 gradients) and only then calls ``on_pre_optimizer_step``,
just before ``optimizer.step()``. Gradients are read there, so they are exactly what the optimizer receives: summed
over gradient-accumulation micro-batches, all-reduced across DDP ranks, unscaled and **after clipping**.

**Cost.** Histograms and norms are computed on the parameters' own device (``torch.histc``, small tensors of a group
pooled first, fused norms) and only the bucket counts travel to the CPU, in two copies
(:class:`hf_wb.stats.ParamStats`); nothing happens on the other steps. The callback's own writer queues up to
:data:`MAX_QUEUE` events and flushes every :data:`FLUSH_SECS` seconds and at the end, so a logging step never waits
for the disk. The benchmark ``benchmarks/monitoring_overhead.py`` measures the overhead.

**Where it writes.** ``writer`` may be a ``SummaryWriter`` (used as is, never closed here), or the Trainer's
``TensorBoardCallback`` (its writer is borrowed in ``on_train_begin``, so histograms land in the same run as the
Trainer's scalars). Otherwise the callback opens its own writer at ``log_dir``, by default
``<output_dir>/runs/hf_wb`` (next to the ``<output_dir>/runs/<date>_<host>`` run of the ``TensorBoardCallback``, so
``tensorboard --logdir <output_dir>/runs`` shows both); when no ``TensorBoardCallback`` is reporting
(``"tensorboard"`` not in ``report_to``), that writer also receives the Trainer's logs (``train/loss``, ...), so the
run folder is complete for ``hf-wb report``. Only the main process (``state.is_world_process_zero``) writes.

**Sharded models.** Under FSDP, each statistic describes rank 0's local shard of each parameter.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_wb.extras import require
from hf_wb.layers import LayerMap, unwrap_model
from hf_wb.stats import ParamStats

logger = logging.getLogger(__name__)

__all__ = ["WeightHistogramCallback", "acquire_writer", "release_writer", "default_log_dir"]

DEFAULT_SUBDIR = os.path.join("runs", "hf_wb")
MAX_QUEUE = 1000
FLUSH_SECS = 30
MAX_HEAD_CLASSES = 32  # output biases with more entries are not written as lines

_lock = threading.Lock()
_writers: dict[str, list[Any]] = {}  # absolute log dir -> [SummaryWriter, reference count]


def default_log_dir(args: TrainingArguments, state: TrainerState | None = None) -> str:
    """``<output_dir>/runs/hf_wb`` (with the trial name appended during a hyper-parameter search)."""
    path = os.path.join(args.output_dir or ".", DEFAULT_SUBDIR)
    if state is not None and state.is_hyper_param_search and state.trial_name:
        path = os.path.join(path, state.trial_name)
    return path


def acquire_writer(log_dir: str):
    """A ``SummaryWriter`` for ``log_dir``, shared (reference counted) by the callbacks that write there."""
    require("tensorboard", feature="Writing TensorBoard events (weight histograms, diagnostics summaries)")
    from torch.utils.tensorboard import SummaryWriter

    key = os.path.abspath(log_dir)
    with _lock:
        if key not in _writers:
            # a queue long enough for a logging step's events: with SummaryWriter's default of 10, adding an event
            # blocks until the writer thread has caught up, which costs milliseconds per logging step
            _writers[key] = [SummaryWriter(log_dir=key, max_queue=MAX_QUEUE, flush_secs=FLUSH_SECS), 0]
        _writers[key][1] += 1
        return _writers[key][0]


def release_writer(writer) -> None:
    """Flush ``writer``; close it when the last callback holding it lets it go."""
    with _lock:
        for key, (w, count) in list(_writers.items()):
            if w is writer:
                if count <= 1:
                    del _writers[key]
                    w.close()
                else:
                    _writers[key][1] = count - 1
                    w.flush()
                return
    writer.flush()


class _WriterSlot:
    """Resolves the writer a callback writes to (injected, borrowed from a TensorBoardCallback, or its own)."""

    def __init__(self, writer: Any = None, log_dir: str | None = None) -> None:
        if writer is not None and not (hasattr(writer, "add_scalar") or hasattr(writer, "tb_writer")):
            raise TypeError(
                f"`writer` must be a torch.utils.tensorboard SummaryWriter or the Trainer's TensorBoardCallback, got "
                f"{type(writer).__name__}."
            )
        self.source = writer
        self.log_dir = log_dir
        self.writer: Any = None
        self.owned = False
        self.borrowed_from_callback = False

    def open(self, args: TrainingArguments, state: TrainerState) -> Any:
        self.close()
        source = self.source
        if source is not None and hasattr(source, "tb_writer"):
            if source.tb_writer is not None:
                self.writer, self.owned, self.borrowed_from_callback = source.tb_writer, False, True
                return self.writer
            logger.warning(
                "The TensorBoardCallback passed as `writer` has no writer yet (it must come before this callback in "
                "the Trainer's callbacks); writing to %s instead.",
                self.log_dir or default_log_dir(args, state),
            )
        elif source is not None:
            self.writer, self.owned = source, False
            return self.writer
        self.writer, self.owned = acquire_writer(self.log_dir or default_log_dir(args, state)), True
        return self.writer

    @property
    def alive(self) -> bool:
        """False once a borrowed TensorBoardCallback writer was closed by its owner."""
        if self.writer is None:
            return False
        if self.borrowed_from_callback:
            return self.source.tb_writer is self.writer
        return True

    def flush(self) -> None:
        if self.alive:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None and self.owned:
            release_writer(self.writer)
        elif self.alive:
            self.writer.flush()
        self.writer, self.owned, self.borrowed_from_callback = None, False, False


class WeightHistogramCallback(TrainerCallback):
    """Write histograms of weights, biases and gradients and per-unit norms to TensorBoard.

    Args:
        every_n_steps: write every this many optimizer steps (and once at the start and after the last step).
        writer: a ``SummaryWriter`` or the Trainer's ``TensorBoardCallback`` to borrow the writer from; by default
            the callback opens its own writer at ``log_dir``.
        log_dir: folder of the callback's own writer; default ``<output_dir>/runs/hf_wb``.
        histograms: write the histograms; with ``False`` only the scalars (norms, update ratios, lrs) are written.
        bins: number of buckets of each histogram.
        split_roles: split block weights into ``attn`` / ``ffn`` / ``norm`` histograms.
        layers_pattern: passed to :func:`hf_wb.layers.layer_map` to find the blocks.
        lmap: the run's layer map (``WBTrainer`` passes its own, so every callback sees the same units); None =
            computed from the model and ``layers_pattern`` at the start of training.
        update_sample_size: update ratios of tensors larger than this are measured on a strided sample of about this
            many entries (bounds the memory of the pre-step snapshot).
        drift: keep a CPU copy of the trainable weights at the start and write the drift ``W - W0`` (histograms) and
            ``||W - W0|| / ||W0||`` per unit.
        labels: training labels for the label prior drawn next to the output bias; default: the training set's.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        writer: Any = None,
        log_dir: str | None = None,
        histograms: bool = True,
        bins: int = 64,
        split_roles: bool = True,
        layers_pattern: str | None = None,
        update_sample_size: int = 65536,
        lmap: LayerMap | None = None,
        drift: bool = True,
        labels: Any = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"`every_n_steps` must be an int, got {type(every_n_steps).__name__}.")
        if every_n_steps < 1:
            raise ValueError(
                f"`every_n_steps`={every_n_steps} must be >= 1 (to switch histograms off, do not add the callback; "
                "`WBConfig.histogram_steps=0` does that)."
            )
        if bins < 2:
            raise ValueError(f"`bins`={bins} must be >= 2.")
        if update_sample_size < 1:
            raise ValueError(f"`update_sample_size`={update_sample_size} must be >= 1.")
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self.bins = bins
        self.split_roles = split_roles
        self.layers_pattern = layers_pattern
        self.lmap = lmap
        self.update_sample_size = update_sample_size
        self.drift = drift
        self.labels = labels
        self._slot = _WriterSlot(writer, log_dir)
        self._stats: ParamStats | None = None
        self._optimizer: Any = None
        self._pending_grad_step: int | None = None
        self._last_weights_step: int | None = None
        self._mirror_logs = False
        self._head: Any = None  # (output layer, link) when the output bias is written

    # -- helpers -------------------------------------------------------------------------------------------------
    @property
    def writer(self) -> Any:
        """The writer in use during training (``None`` before ``on_train_begin`` and after ``on_train_end``)."""
        return self._slot.writer

    def _is_log_step(self, state: TrainerState) -> bool:
        return (state.global_step + 1) % self.every_n_steps == 0

    def _write_histograms(self, hists: dict, step: int) -> None:
        w = self._slot.writer
        for tag, h in hists.items():
            if h.num == 0:
                continue
            w.add_histogram_raw(
                tag,
                min=h.min,
                max=h.max,
                num=h.num,
                sum=h.sum,
                sum_squares=h.sum_squares,
                bucket_limits=h.bucket_limits,
                bucket_counts=h.bucket_counts,
                global_step=step,
            )

    def _write_scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for unit, value in values.items():
            self._slot.writer.add_scalar(f"{prefix}/{unit}", value, step)

    def _write_weights(self, step: int) -> None:
        if self.histograms:
            hists = self._stats.weight_histograms(self.bins, self.split_roles)
            self._write_histograms(hists, step)
            norms = ParamStats.unit_norms_from(hists)  # the histograms' sums of squares: no extra pass
        else:
            norms = self._stats.weight_norms()
        self._write_scalars("weight_norm", norms, step)
        if self.drift:
            self._stats.keep_reference()  # units unfrozen since the last call start here
            drift_hists, ratios = self._stats.drift_histograms(self.bins)
            if self.histograms and step > 0:
                self._write_histograms(drift_hists, step)
            self._write_scalars("drift_ratio", ratios, step)
        self._write_head(step)
        self._last_weights_step = step

    def _find_head(self, model: Any) -> None:
        from hf_wb.heads import MULTI_LABEL, REGRESSION, find_output_layer

        self._head = None
        try:
            _, layer = find_output_layer(model)
        except (ValueError, AttributeError, TypeError):
            return
        if layer.bias is None or not 0 < layer.bias.numel() <= MAX_HEAD_CLASSES:
            return
        config = getattr(model, "config", None)
        problem = getattr(config, "problem_type", None)
        if problem == REGRESSION or layer.bias.numel() == 1:
            link = "identity"
        elif problem == MULTI_LABEL:
            link = "sigmoid"
        else:
            link = "softmax"
        self._head = (layer, link)

    def _write_head(self, step: int) -> None:
        if self._head is None:
            return
        layer, link = self._head
        bias = layer.bias.detach().float()
        implied = {"softmax": lambda b: b.softmax(0), "sigmoid": torch.sigmoid}.get(link, lambda b: b)(bias)
        values = torch.cat([bias, implied]).cpu().tolist()
        n = bias.numel()
        for k in range(n):
            self._slot.writer.add_scalar(f"head/bias/{k}", values[k], step)
            self._slot.writer.add_scalar(f"head/implied/{link}/{k}", values[n + k], step)

    def _write_label_prior(self, model: Any, dataloader: Any, step: int) -> None:
        """``head/label_prior/<k>`` and ``head/bias_prior_applied``, once: what the output bias is compared with."""
        from hf_wb.heads import label_prior, labels_from_dataset

        if self._head is None:
            return
        recipe = getattr(model, "_hf_wb_head_recipe", None) or {}
        applied = recipe.get("bias_prior") or {}
        priors = applied.get("priors")
        if priors is None:
            labels = self.labels
            if labels is None and dataloader is not None:
                labels = labels_from_dataset(getattr(dataloader, "dataset", None), max_examples=100_000)
            if labels is None:
                return
            try:
                _, priors = label_prior(model, labels)
            except (ValueError, TypeError) as exc:
                logger.info("No label prior for the report: %s", exc)
                return
        if len(priors) != self._head[0].bias.numel():
            return
        for k, value in enumerate(priors):
            self._slot.writer.add_scalar(f"head/label_prior/{k}", float(value), step)
        self._slot.writer.add_scalar("head/bias_prior_applied", 1.0 if applied.get("bias") else 0.0, step)

    def _write_lrs(self, step: int) -> None:
        if self._optimizer is None:
            return
        for i, group in enumerate(self._optimizer.param_groups):
            name = group.get("name") or f"group_{i}"
            self._slot.writer.add_scalar(f"lr/{name}", float(group["lr"]), step)

    # -- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        model = kwargs.get("model")
        if model is None:
            raise ValueError("WeightHistogramCallback needs the `model` the Trainer passes to its callbacks.")
        self._slot.open(args, state)
        self._stats = ParamStats(model, self.layers_pattern, self.update_sample_size, lmap=self.lmap)
        self._optimizer = kwargs.get("optimizer")
        self._mirror_logs = self._slot.owned and "tensorboard" not in (args.report_to or [])
        self._pending_grad_step = None
        self._find_head(unwrap_model(model))
        if state.global_step == 0:
            self._write_label_prior(unwrap_model(model), kwargs.get("train_dataloader"), 0)
        self._write_weights(state.global_step)
        self._slot.flush()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._stats is None or not state.is_world_process_zero or not self._is_log_step(state):
            return
        step = state.global_step + 1
        if self.histograms:
            hists = self._stats.grad_histograms(self.bins)
            self._write_histograms(hists, step)
            norms = ParamStats.unit_norms_from(hists)
        else:
            norms = self._stats.grad_norms()
        self._write_scalars("grad_norm", norms, step)
        self._stats.snapshot()
        self._pending_grad_step = step

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._stats is None or self._pending_grad_step is None:
            return
        step = self._pending_grad_step
        self._pending_grad_step = None
        self._write_scalars("update_ratio", self._stats.update_ratios(), step)
        self._write_weights(step)
        self._write_lrs(step)
        # no flush here: a flush waits for the writer thread; the writer flushes every FLUSH_SECS and at the end

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._stats is None or not self._slot.alive:
            return
        last = state.global_step >= state.max_steps > 0 or control.should_training_stop
        if last and self._last_weights_step != state.global_step:
            self._write_weights(state.global_step)
            self._slot.flush()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not self._mirror_logs or not state.is_world_process_zero or not logs or not self._slot.alive:
            return
        from transformers.integrations.integration_utils import rewrite_logs

        for key, value in rewrite_logs(logs).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._slot.writer.add_scalar(key, value, state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._slot.close()
        self._stats = None
        self._optimizer = None
        self._pending_grad_step = None
        self._head = None
