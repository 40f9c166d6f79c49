"""GLUE metrics through the packaged `evaluate` module, against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import EvalPrediction

from hf_wb.glue import GLUE_TASKS, METRIC_DIR, build_compute_metrics, load_glue_metric


def test_metric_module_ships_in_the_package():
    # evaluate.load(<folder>) needs <folder>/<folder name>.py
    assert (METRIC_DIR / f"{METRIC_DIR.name}.py").is_file()


def test_mrpc_accuracy_and_f1():
    # TP=2 (0, 3), FP=2 (1, 2), FN=1 (4), TN=1 (5): accuracy 3/6, precision 1/2, recall 2/3, F1 = 4/7
    result = load_glue_metric("mrpc").compute(predictions=[1, 1, 1, 1, 0, 0], references=[1, 0, 0, 1, 1, 0])
    assert result == pytest.approx({"accuracy": 0.5, "f1": 4 / 7, "combined_score": (0.5 + 4 / 7) / 2})


def test_qqp_uses_the_same_metrics_as_mrpc():
    result = load_glue_metric("qqp").compute(predictions=[0, 0, 1], references=[0, 1, 1])
    # TP=1, FN=1, FP=0: precision 1, recall 1/2, F1 = 2/3
    assert result == pytest.approx({"accuracy": 2 / 3, "f1": 2 / 3, "combined_score": 2 / 3})


def test_cola_matthews_correlation():
    # TP=4, TN=2, FP=1, FN=1: (4*2 - 1*1) / sqrt(5 * 5 * 3 * 3) = 7/15
    result = load_glue_metric("cola").compute(
        predictions=[1, 1, 0, 0, 1, 0, 1, 1], references=[1, 1, 0, 0, 0, 1, 1, 1]
    )
    assert result == pytest.approx({"matthews_correlation": 7 / 15, "combined_score": 7 / 15})


def test_stsb_pearson_and_spearman():
    # x = [1, 3, 2, 4], y = [1, 2, 3, 5]: sum dx*dy = 5.5, sum dx^2 = 5, sum dy^2 = 8.75 -> r = 5.5 / sqrt(43.75);
    # ranks [1, 3, 2, 4] vs [1, 2, 3, 4]: sum d^2 = 2 -> rho = 1 - 6*2 / (4*15) = 0.8
    result = load_glue_metric("stsb").compute(predictions=[1.0, 3.0, 2.0, 4.0], references=[1.0, 2.0, 3.0, 5.0])
    pearson = 5.5 / np.sqrt(43.75)
    assert result == pytest.approx({"pearson": pearson, "spearmanr": 0.8, "combined_score": (pearson + 0.8) / 2})


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    num_labels = GLUE_TASKS[task].num_labels
    references = [0, 1, 1, 0, num_labels - 1]
    predictions = [0, 1, 0, 0, 0]
    result = load_glue_metric(task).compute(predictions=predictions, references=references)
    assert result == pytest.approx({"accuracy": 3 / 5, "combined_score": 3 / 5})


def test_mnli_mismatched_config():
    metric = load_glue_metric("mnli", metric_config="mnli_mismatched")
    assert metric.compute(predictions=[2, 1], references=[2, 2]) == pytest.approx(
        {"accuracy": 0.5, "combined_score": 0.5}
    )


def test_unknown_config():
    with pytest.raises(KeyError, match=r"`config_name` must be one of cola.*got 'squad'"):
        load_glue_metric("mrpc", metric_config="squad")


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_every_task_reports_its_metrics(task):
    spec = GLUE_TASKS[task]
    refs = [0.0, 1.0, 2.5, 4.0] if spec.is_regression else [0, 1, 1, 0]
    preds = [0.5, 1.0, 2.0, 4.5] if spec.is_regression else [0, 1, 0, 0]
    result = load_glue_metric(task).compute(predictions=preds, references=refs)
    assert list(result) == [*spec.metrics, "combined_score"]


def test_compute_metrics_takes_argmax_of_logits():
    compute = build_compute_metrics("mrpc")
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 1.0], [3.0, 0.0]])  # argmax: 0, 1, 1, 0
    result = compute(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 0, 0])))
    # TP=1, FP=1, FN=0: precision 1/2, recall 1, F1 = 2/3; accuracy 3/4
    assert result == pytest.approx({"accuracy": 0.75, "f1": 2 / 3, "combined_score": (0.75 + 2 / 3) / 2})


def test_compute_metrics_regression_squeezes_scores():
    compute = build_compute_metrics(GLUE_TASKS["stsb"])
    scores = np.array([[1.0], [3.0], [2.0], [4.0]], dtype=np.float32)
    labels = np.array([1.0, 2.0, 3.0, 5.0], dtype=np.float32)
    result = compute(EvalPrediction(predictions=(scores, np.zeros((4, 2, 3))), label_ids=labels))
    assert result["spearmanr"] == pytest.approx(0.8)
    assert result["pearson"] == pytest.approx(5.5 / np.sqrt(43.75))
