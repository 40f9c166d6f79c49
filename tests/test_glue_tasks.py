"""The GLUE task registry: layouts, labels, metrics and splits, checked against the GLUE / nyu-mll/glue definitions."""

from __future__ import annotations

import importlib.util

import pytest

from hf_wb.glue import GLUE_TASKS, METRIC_DIR, get_task, task_names

# task -> (folder, text columns, label names (nyu-mll/glue order), metrics, eval splits)
EXPECTED = {
    "cola": ("CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), ("validation",)),
    "sst2": ("SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), ("validation",)),
    "mrpc": (
        "MRPC",
        ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"),
        ("accuracy", "f1"),
        ("validation",),
    ),
    "stsb": ("STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearmanr"), ("validation",)),
    "qqp": ("QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"), ("validation",)),
    "mnli": (
        "MNLI",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("accuracy",),
        ("validation_matched", "validation_mismatched"),
    ),
    "qnli": ("QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",), ("validation",)),
    "rte": ("RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",), ("validation",)),
    "wnli": ("WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), ("validation",)),
}


def test_all_nine_tasks_in_glue_order():
    assert task_names() == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_definition(name):
    folder, text_columns, label_names, metrics, eval_splits = EXPECTED[name]
    task = GLUE_TASKS[name]
    assert task.name == name
    assert task.folder == folder
    assert task.text_columns == text_columns
    assert task.label_names == label_names
    assert task.metrics == metrics
    assert task.eval_splits == eval_splits
    assert task.num_labels == (len(label_names) if label_names else 1)
    assert task.is_regression == (name == "stsb")
    assert task.has_header == (name != "cola")
    assert [c.name for c in task.tsv_columns] == [*text_columns, "label"]
    assert task.label2id == {n: i for i, n in enumerate(label_names)}
    assert task.id2label == dict(enumerate(label_names))


def test_tsv_layouts():
    # Field indices and header names of the files written by GLUE's download_glue_data.py.
    layout = {name: [(c.index, c.header) for c in task.tsv_columns] for name, task in GLUE_TASKS.items()}
    assert layout["cola"] == [(3, None), (1, None)]
    assert GLUE_TASKS["cola"].num_fields == 4
    assert layout["mrpc"] == [(3, "#1 String"), (4, "#2 String"), (0, "Quality")]
    assert layout["stsb"] == [(7, "sentence1"), (8, "sentence2"), (9, "score")]
    assert layout["qqp"] == [(3, "question1"), (4, "question2"), (5, "is_duplicate")]
    assert layout["mnli"] == [(8, "sentence1"), (9, "sentence2"), (-1, "gold_label")]
    assert layout["qnli"] == [(1, "question"), (2, "sentence"), (3, "label")]


def test_label_values_in_files():
    assert GLUE_TASKS["mnli"].tsv_label_values == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["qnli"].tsv_label_values == ("entailment", "not_entailment")
    assert GLUE_TASKS["rte"].tsv_label_values == ("entailment", "not_entailment")
    for name in ("cola", "sst2", "mrpc", "qqp", "wnli"):
        assert GLUE_TASKS[name].tsv_label_values == ("0", "1")
    assert GLUE_TASKS["stsb"].tsv_label_values == ()


def test_split_files():
    assert GLUE_TASKS["mnli"].split_files == {
        "train": "train.tsv",
        "validation_matched": "dev_matched.tsv",
        "validation_mismatched": "dev_mismatched.tsv",
    }
    assert GLUE_TASKS["rte"].split_files == {"train": "train.tsv", "validation": "dev.tsv"}


@pytest.mark.parametrize("spelling", ["MRPC", "mrpc", "Sst-2", "STS-B"])
def test_get_task_spellings(spelling):
    assert get_task(spelling).name == spelling.lower().replace("-", "")


def test_get_task_unknown():
    with pytest.raises(ValueError, match=r"`task_name` must be one of cola, sst2.*got 'squad'"):
        get_task("squad")


def test_layout_text_names_files_and_labels():
    text = GLUE_TASKS["mnli"].layout()
    assert "MNLI/{train.tsv, dev_matched.tsv, dev_mismatched.tsv}" in text
    assert "'entailment', 'neutral', 'contradiction'" in text
    assert "no header line, 4 fields per row" in GLUE_TASKS["cola"].layout()


def test_registry_matches_packaged_metric_module():
    spec = importlib.util.spec_from_file_location("hf_wb_glue_metric", METRIC_DIR / "metric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, task in GLUE_TASKS.items():
        assert module.TASK_METRICS[name] == task.metrics
