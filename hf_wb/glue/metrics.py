"""GLUE scores through the offline `evaluate` module shipped in ``hf_wb/glue/metric/``."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hf_wb.glue.tasks import GlueTask, get_task

if TYPE_CHECKING:
    import evaluate
    from transformers import EvalPrediction

__all__ = ["METRIC_DIR", "build_compute_metrics", "load_glue_metric"]

logger = logging.getLogger(__name__)

METRIC_DIR = Path(__file__).resolve().parent / "metric"
"""Folder of the packaged `evaluate` metric module (``metric/metric.py``)."""


def load_glue_metric(task: GlueTask | str, metric_config: str | None = None) -> evaluate.EvaluationModule:
    """Load the packaged GLUE metric for ``task`` with `evaluate` (offline, in memory).

    Args:
        task: A :class:`GlueTask` or task name.
        metric_config: Metric configuration to use instead of the task name (e.g. ``"mnli_mismatched"``).

    Returns:
        An ``evaluate`` metric whose ``compute(predictions=, references=)`` returns the task's GLUE metrics and
        ``combined_score``. It keeps its buffer in memory, so several processes of a distributed run can each load
        one without sharing cache files.
    """
    import evaluate

    task = get_task(task) if isinstance(task, str) else task
    return evaluate.load(
        str(METRIC_DIR),
        config_name=metric_config or task.name,
        keep_in_memory=True,
        experiment_id=uuid.uuid4().hex,
    )


def build_compute_metrics(
    task: GlueTask | str, metric: evaluate.EvaluationModule | None = None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """Make a ``compute_metrics`` function for ``transformers.Trainer``.

    Classification logits are turned into class ids with ``argmax``; the STS-B regression output is squeezed to
    one score per example.

    Args:
        task: A :class:`GlueTask` or task name.
        metric: A metric from :func:`load_glue_metric`; loaded when omitted.
    """
    task = get_task(task) if isinstance(task, str) else task
    metric = metric if metric is not None else load_glue_metric(task)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        predictions = eval_pred.predictions
        if isinstance(predictions, tuple):  # models that also return hidden states / attentions
            predictions = predictions[0]
        predictions = np.asarray(predictions)
        if task.is_regression:
            predictions = predictions.reshape(len(predictions), -1)[:, 0]
        else:
            predictions = predictions.argmax(axis=-1)
        return metric.compute(predictions=predictions, references=np.asarray(eval_pred.label_ids))

    return compute_metrics
