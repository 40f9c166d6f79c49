"""Registry of the nine GLUE tasks: file layout, columns, labels, metrics and evaluation splits.

Each task is described once, in a frozen :class:`GlueTask`, for both sources the data can come from:

* the original GLUE layout written by GLUE's ``download_glue_data.py`` (``<GLUE_DIR>/<TASK>/train.tsv``, ``dev.tsv``,
  MNLI ``dev_matched.tsv`` / ``dev_mismatched.tsv``), described by :attr:`GlueTask.tsv_columns`;
* the Hub dataset ``nyu-mll/glue``, whose column names and label order the local loader reproduces, so that the rest
  of the pipeline does not care where the rows came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GLUE_TASKS", "GlueTask", "TsvColumn", "get_task", "task_names"]


@dataclass(frozen=True)
class TsvColumn:
    """Where one output column sits in a GLUE TSV row.

    Args:
        name: Column name in the loaded ``datasets.Dataset`` (the ``nyu-mll/glue`` name, e.g. ``"sentence1"``).
        index: Field index in a row; negative counts from the end (MNLI's ``gold_label`` is always the last field
            while the number of annotator-label fields differs between train and dev).
        header: Header text expected at ``index`` in files that have a header line, ``None`` for headerless files.
    """

    name: str
    index: int
    header: str | None = None


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Args:
        name: Lower-case task name, also the ``nyu-mll/glue`` configuration name.
        folder: Folder name in the original GLUE layout (``CoLA``, ``SST-2``, ...).
        has_header: Whether the TSV files start with a header line (all but CoLA).
        num_fields: Exact field count of every row of headerless files; ``None`` when the header line gives it.
        tsv_columns: Columns read from each row (text columns and the label, in output order).
        text_columns: Input text column(s): one for single-sentence tasks, two for pair tasks.
        label_names: Class names in id order, as ``nyu-mll/glue`` names them; empty for regression (STS-B).
        tsv_label_values: Raw label strings in the TSV files, in id order (``"0"``/``"1"`` or class names).
        metrics: Metric names reported for the task, in GLUE's order.
        eval_files: Evaluation split name -> file name in the task folder.
        train_file: File name of the training split.
        hub_path: Hub dataset path used when no local folder is given.
        label_range: Inclusive range of a regression score (STS-B: 0 to 5); ``None`` for classification tasks.
    """

    name: str
    folder: str
    has_header: bool
    tsv_columns: tuple[TsvColumn, ...]
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    tsv_label_values: tuple[str, ...]
    metrics: tuple[str, ...]
    num_fields: int | None = None
    eval_files: dict[str, str] = field(default_factory=lambda: {"validation": "dev.tsv"})
    train_file: str = "train.tsv"
    hub_path: str = "nyu-mll/glue"
    label_range: tuple[float, float] | None = None

    @property
    def is_regression(self) -> bool:
        """True for STS-B, whose label is a similarity score in [0, 5]."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Size of the classifier output: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """Names of the evaluation splits (``("validation",)``, or MNLI's matched and mismatched splits)."""
        return tuple(self.eval_files)

    @property
    def split_files(self) -> dict[str, str]:
        """Every split (train first) -> TSV file name."""
        return {"train": self.train_file, **self.eval_files}

    @property
    def label2id(self) -> dict[str, int]:
        """Class name -> id, for the model config; empty for regression."""
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def id2label(self) -> dict[int, str]:
        """Id -> class name, for the model config; empty for regression."""
        return dict(enumerate(self.label_names))

    def layout(self) -> str:
        """Human-readable description of the expected TSV layout, used in error messages."""
        columns = ", ".join(
            f"field {c.index} = {c.name}" + (f" (header {c.header!r})" if c.header else "") for c in self.tsv_columns
        )
        header = "a header line" if self.has_header else f"no header line, {self.num_fields} fields per row"
        if self.is_regression:
            low, high = self.label_range or (float("-inf"), float("inf"))
            labels = f"a finite float score from {low:g} to {high:g}"
        else:
            labels = "one of " + ", ".join(repr(v) for v in self.tsv_label_values)
        return (
            f"GLUE layout for {self.name}: {self.folder}/{{{', '.join(self.split_files.values())}}}, tab-separated, "
            f"unquoted, {header}; {columns}; label is {labels}"
        )


_BINARY = ("0", "1")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola",
            folder="CoLA",
            has_header=False,
            num_fields=4,
            tsv_columns=(TsvColumn("sentence", 3), TsvColumn("label", 1)),
            text_columns=("sentence",),
            label_names=("unacceptable", "acceptable"),
            tsv_label_values=_BINARY,
            metrics=("matthews_correlation",),
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            has_header=True,
            tsv_columns=(TsvColumn("sentence", 0, "sentence"), TsvColumn("label", 1, "label")),
            text_columns=("sentence",),
            label_names=("negative", "positive"),
            tsv_label_values=_BINARY,
            metrics=("accuracy",),
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            has_header=True,
            tsv_columns=(
                TsvColumn("sentence1", 3, "#1 String"),
                TsvColumn("sentence2", 4, "#2 String"),
                TsvColumn("label", 0, "Quality"),
            ),
            text_columns=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
            tsv_label_values=_BINARY,
            metrics=("accuracy", "f1"),
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            has_header=True,
            tsv_columns=(
                TsvColumn("sentence1", 7, "sentence1"),
                TsvColumn("sentence2", 8, "sentence2"),
                TsvColumn("label", 9, "score"),
            ),
            text_columns=("sentence1", "sentence2"),
            label_names=(),
            tsv_label_values=(),
            metrics=("pearson", "spearmanr"),
            label_range=(0.0, 5.0),
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            has_header=True,
            tsv_columns=(
                TsvColumn("question1", 3, "question1"),
                TsvColumn("question2", 4, "question2"),
                TsvColumn("label", 5, "is_duplicate"),
            ),
            text_columns=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            tsv_label_values=_BINARY,
            metrics=("accuracy", "f1"),
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            has_header=True,
            tsv_columns=(
                TsvColumn("premise", 8, "sentence1"),
                TsvColumn("hypothesis", 9, "sentence2"),
                TsvColumn("label", -1, "gold_label"),
            ),
            text_columns=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
            tsv_label_values=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            eval_files={"validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            has_header=True,
            tsv_columns=(
                TsvColumn("question", 1, "question"),
                TsvColumn("sentence", 2, "sentence"),
                TsvColumn("label", 3, "label"),
            ),
            text_columns=("question", "sentence"),
            label_names=("entailment", "not_entailment"),
            tsv_label_values=("entailment", "not_entailment"),
            metrics=("accuracy",),
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            has_header=True,
            tsv_columns=(
                TsvColumn("sentence1", 1, "sentence1"),
                TsvColumn("sentence2", 2, "sentence2"),
                TsvColumn("label", 3, "label"),
            ),
            text_columns=("sentence1", "sentence2"),
            label_names=("entailment", "not_entailment"),
            tsv_label_values=("entailment", "not_entailment"),
            metrics=("accuracy",),
        ),
        GlueTask(
            name="wnli",
            folder="WNLI",
            has_header=True,
            tsv_columns=(
                TsvColumn("sentence1", 1, "sentence1"),
                TsvColumn("sentence2", 2, "sentence2"),
                TsvColumn("label", 3, "label"),
            ),
            text_columns=("sentence1", "sentence2"),
            label_names=("not_entailment", "entailment"),
            tsv_label_values=_BINARY,
            metrics=("accuracy",),
        ),
    )
}


def task_names() -> list[str]:
    """The nine GLUE task names, in the order of the GLUE paper's table."""
    return list(GLUE_TASKS)


def get_task(name: str) -> GlueTask:
    """Look a task up by name (case-insensitive; ``"sst-2"``/``"sts-b"`` spellings accepted)."""
    key = name.lower().replace("-", "") if isinstance(name, str) else name
    if key not in GLUE_TASKS:
        raise ValueError(f"`task_name` must be one of {', '.join(GLUE_TASKS)}; got {name!r}.")
    return GLUE_TASKS[key]
