"""GLUE for hf_wb: task registry, data loading (local GLUE layout or the Hub), metrics, and the run_glue entry point.

The script ``scripts/run_glue.py`` and ``hf-wb glue`` both call :func:`hf_wb.glue.run.main`. Needs the ``glue`` extra
(``pip install "hf-wb[glue]"``).
"""

from hf_wb.extras import require

require("datasets", "evaluate", "sklearn", "scipy", feature="hf_wb.glue (GLUE data, metrics and runner)", load=False)

from hf_wb.glue.data import GLUE_DIR_ENV, load_glue, read_glue_tsv, tokenize_glue, truncate_splits  # noqa: E402
from hf_wb.glue.metrics import METRIC_DIR, build_compute_metrics, load_glue_metric  # noqa: E402
from hf_wb.glue.tasks import GLUE_TASKS, GlueTask, TsvColumn, get_task, task_names  # noqa: E402

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
