"""GLUE for hf_wb: task registry, data loading (local GLUE layout or the Hub), metrics, and the run_glue entry point.

The script ``scripts/run_glue.py`` and ``hf-wb glue`` both call :func:`hf_wb.glue.run.main`.
"""

from hf_wb.glue.data import GLUE_DIR_ENV, load_glue, read_glue_tsv, tokenize_glue, truncate_splits
from hf_wb.glue.metrics import METRIC_DIR, build_compute_metrics, load_glue_metric
from hf_wb.glue.tasks import GLUE_TASKS, GlueTask, TsvColumn, get_task, task_names

__all__ = [
    "GLUE_DIR_ENV",
    "GLUE_TASKS",
    "METRIC_DIR",
    "GlueTask",
    "TsvColumn",
    "build_compute_metrics",
    "get_task",
    "load_glue",
    "load_glue_metric",
    "read_glue_tsv",
    "task_names",
    "tokenize_glue",
    "truncate_splits",
]
