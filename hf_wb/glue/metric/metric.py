"""GLUE metrics as an offline `evaluate` module, shipped inside hf_wb.

Load it with ``evaluate.load(<this folder>, config_name=<task>)`` (``hf_wb.glue.metrics.load_glue_metric`` does that).
The scores are the ones GLUE defines, computed with scikit-learn and SciPy:

* ``cola``: Matthews correlation;
* ``stsb``: Pearson and Spearman correlations;
* ``mrpc`` / ``qqp``: accuracy and F1 of the positive class;
* ``sst2``, ``mnli`` (also ``mnli_matched`` / ``mnli_mismatched``), ``qnli``, ``rte``, ``wnli``, ``ax``: accuracy.

Every result also holds ``combined_score``, the mean of the task's metrics (the figure the GLUE leaderboard ranks
by for tasks with two metrics; equal to the single metric otherwise).

This file is imported by `evaluate` from its module cache, outside the hf_wb package: it must stay self-contained.
"""

import datasets
import evaluate
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = """\
GLUE (General Language Understanding Evaluation) metrics, one configuration per task, plus `combined_score`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (float scores for `stsb`).
    references: gold class ids (float scores for `stsb`).
Returns: a dict with the task's metrics among
    "accuracy", "f1" (positive class 1), "matthews_correlation", "pearson", "spearmanr", and "combined_score".
Examples:
    >>> metric = evaluate.load("hf_wb/glue/metric", config_name="mrpc")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75, 'f1': 0.6666666666666666, 'combined_score': 0.7083333333333333}
"""

# Task -> metric names, in GLUE's order. Mirrors hf_wb.glue.tasks (a test keeps the two in sync).
TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "ax": ("matthews_correlation",),
}


def _score(name, predictions, references):
    if name == "accuracy":
        return float(accuracy_score(references, predictions))
    if name == "f1":
        return float(f1_score(y_true=references, y_pred=predictions))
    if name == "matthews_correlation":
        return float(matthews_corrcoef(references, predictions))
    if name == "pearson":
        return float(pearsonr(predictions, references)[0])
    if name == "spearmanr":
        return float(spearmanr(predictions, references)[0])
    raise KeyError(name)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """GLUE metric; the configuration name is the task."""

    def _info(self):
        if self.config_name not in TASK_METRICS:
            raise KeyError(
                f"`config_name` must be one of {', '.join(TASK_METRICS)} (the GLUE task); got {self.config_name!r}."
            )
        dtype = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            codebase_urls=[],
            reference_urls=["https://gluebenchmark.com/"],
            format="numpy",
        )

    def _compute(self, predictions, references):
        result = {name: _score(name, predictions, references) for name in TASK_METRICS[self.config_name]}
        result["combined_score"] = sum(result.values()) / len(result)
        return result
