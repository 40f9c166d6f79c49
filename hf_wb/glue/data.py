"""Load GLUE data into ``datasets`` objects and tokenise it.

Two sources, one result: a local folder in the original GLUE layout (``--data_dir`` or the ``GLUE_DIR`` environment
variable), otherwise the Hub dataset ``nyu-mll/glue``. Either way the splits come back as a ``datasets.DatasetDict``
with the Hub's column names (``sentence``, ``sentence1``/``sentence2``, ``question``, ``premise``/``hypothesis``, ...),
a ``label`` column (``ClassLabel`` with the Hub's names, or a float32 score for STS-B) and an ``idx`` column.

Local TSV files are read with quoting off (fields may start with a literal ``"``) and ``utf-8-sig`` (MRPC's header
starts with a byte-order mark). Every row is checked: a missing file or a malformed row raises an error that names
the file, the 1-based line and the expected layout.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_wb.glue.tasks import GlueTask, get_task

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict, Features
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "GLUE_DIR_ENV",
    "check_labels",
    "find_task_dir",
    "glue_features",
    "load_glue",
    "read_glue_tsv",
    "resolve_glue_dir",
    "tokenize_glue",
    "truncate_splits",
]

logger = logging.getLogger(__name__)

GLUE_DIR_ENV = "GLUE_DIR"
"""Environment variable naming the local GLUE folder (the one holding ``CoLA/``, ``MRPC/``, ...)."""

_LOADER_VERSION = "1"  # bump when the parsed output of a file changes, so cached tokenisations are not reused


def resolve_glue_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local GLUE folder to use: ``data_dir`` if given, else ``$GLUE_DIR``, else ``None`` (use the Hub)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(GLUE_DIR_ENV) or None
    return Path(data_dir).expanduser() if data_dir is not None else None


def find_task_dir(task: GlueTask, data_dir: str | os.PathLike) -> Path:
    """Folder holding ``task``'s TSV files.

    ``data_dir`` may be the GLUE root (holding ``MRPC/``; the folder name is matched case-insensitively) or the task
    folder itself.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"GLUE data folder {root} does not exist. Pass `data_dir` (or set {GLUE_DIR_ENV}) to the folder that "
            f"holds the task folders ({task.folder}/, ...) written by GLUE's download_glue_data.py."
        )
    exact = root / task.folder
    if exact.is_dir():
        return exact
    for child in sorted(root.iterdir()):
        if child.is_dir() and child.name.lower() == task.folder.lower():
            return child
    if root.name.lower() == task.folder.lower() or any((root / f).is_file() for f in task.split_files.values()):
        return root
    raise FileNotFoundError(f"No {task.folder}/ folder in GLUE data folder {root}. Expected {task.layout()}.")


def glue_features(task: GlueTask) -> Features:
    """The ``datasets.Features`` of a GLUE split, as on the Hub: text columns, ``label``, ``idx``."""
    from datasets import ClassLabel, Features, Value

    label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features({**{name: Value("string") for name in task.text_columns}, "label": label, "idx": Value("int32")})


def _check_header(path: Path, task: GlueTask, header: list[str]) -> None:
    for column in task.tsv_columns:
        found = header[column.index] if -len(header) <= column.index < len(header) else None
        if found != column.header:
            raise ValueError(
                f"{path}, line 1: header field {column.index} is {found!r}, expected {column.header!r} "
                f"(header read: {header!r}). Expected {task.layout()}."
            )


def read_glue_tsv(path: str | os.PathLike, task: GlueTask | str) -> dict[str, list[Any]]:
    """Read one GLUE TSV file into columns (``{column: values}``, with ``idx`` = 0-based data row).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the header does not match, a row has the wrong number of fields, or a label is not valid;
            the message names the file, the 1-based line and the expected layout.
    """
    task = get_task(task) if isinstance(task, str) else task
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file {path} not found. Expected {task.layout()}.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not valid UTF-8 ({exc}). Expected {task.layout()}.") from exc

    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    num_fields = task.num_fields
    if task.has_header:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}, line 1: the file is empty, expected a header line. Expected {task.layout()}.")
        _check_header(path, task, header)
        num_fields = len(header)

    label_ids = {value: i for i, value in enumerate(task.tsv_label_values)}
    columns: dict[str, list[Any]] = {c.name: [] for c in task.tsv_columns}
    for row in reader:
        line = reader.line_num
        if len(row) != num_fields:
            raise ValueError(
                f"{path}, line {line}: expected {num_fields} tab-separated fields, found {len(row)}. "
                f"Expected {task.layout()}."
            )
        for column in task.tsv_columns:
            value = row[column.index]
            if column.name == "label":
                value = _parse_label(path, line, task, value, label_ids)
            columns[column.name].append(value)
    if not columns["label"]:
        raise ValueError(
            f"{path}: the file holds no examples (only {'a header line' if task.has_header else 'blank lines'}). "
            f"An empty split cannot be trained or evaluated on; check the file. Expected {task.layout()}."
        )
    columns["idx"] = list(range(len(columns["label"])))
    return {name: columns[name] for name in (*task.text_columns, "label", "idx")}


def _parse_label(path: Path, line: int, task: GlueTask, value: str, label_ids: dict[str, int]) -> int | float:
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise ValueError(
                f"{path}, line {line}: label {value!r} is not a number. Expected {task.layout()}."
            ) from None
        problem = _score_problem(task, score)
        if problem:
            raise ValueError(f"{path}, line {line}: label {value!r} {problem}. Expected {task.layout()}.")
        return score
    if value not in label_ids:
        raise ValueError(f"{path}, line {line}: label {value!r} is not valid. Expected {task.layout()}.")
    return label_ids[value]


def _score_problem(task: GlueTask, score: float) -> str | None:
    """Why a regression score is refused (not finite, outside the task's range), or None."""
    if not math.isfinite(score):
        return "is not a finite number (a NaN or infinite target makes the loss NaN or infinite)"
    if task.label_range is not None and not task.label_range[0] <= score <= task.label_range[1]:
        return f"is outside {task.name}'s score range {task.label_range[0]:g}..{task.label_range[1]:g}"
    return None


def check_labels(dataset: Dataset, task: GlueTask, source: str) -> None:
    """Refuse a split with no rows, or with a label that is not finite / in range / in the task's label set.

    The local TSV reader checks each row as it reads it (naming the line); this checks splits from elsewhere (the
    Hub), naming ``source`` and the 0-based row.
    """
    import numpy as np

    if len(dataset) == 0:
        raise ValueError(f"{source} holds no examples: an empty split cannot be trained or evaluated on.")
    labels = np.asarray(dataset.with_format("numpy")["label"], dtype=np.float64)
    if task.is_regression:
        for row in np.flatnonzero(~np.isfinite(labels) | _outside(labels, task.label_range)):
            raise ValueError(
                f"{source}, row {row}: label {float(labels[row])!r} {_score_problem(task, float(labels[row]))}."
            )
    else:
        for row in np.flatnonzero(~np.isin(labels, np.arange(task.num_labels))):
            raise ValueError(
                f"{source}, row {row}: label {float(labels[row])!r} is not one of {task.name}'s label ids "
                f"0..{task.num_labels - 1} ({', '.join(task.label_names)})."
            )


def _outside(labels: Any, label_range: tuple[float, float] | None) -> Any:
    if label_range is None:
        return labels != labels  # all False
    return (labels < label_range[0]) | (labels > label_range[1])


def _load_local_split(task: GlueTask, task_dir: Path, split: str) -> Dataset:
    from datasets import Dataset

    path = task_dir / task.split_files[split]
    columns = read_glue_tsv(path, task)
    dataset = Dataset.from_dict(columns, features=glue_features(task), split=split)
    # A fingerprint derived from the file's bytes (instead of a random one) lets `map` reuse cached tokenisations.
    digest = hashlib.sha256(f"hf_wb-glue-{_LOADER_VERSION}-{task.name}-{split}".encode())
    digest.update(path.read_bytes())
    logger.info("Read %d rows of %s %s from %s", len(dataset), task.name, split, path)
    return Dataset(dataset.data, info=dataset.info, split=dataset.split, fingerprint=digest.hexdigest()[:32])


def _load_hub_splits(task: GlueTask, splits: Sequence[str], cache_dir: str | None) -> DatasetDict:
    import datasets

    try:
        loaded = {
            split: datasets.load_dataset(task.hub_path, task.name, split=split, cache_dir=cache_dir)
            for split in splits
        }
        for split, dataset in loaded.items():
            check_labels(dataset, task, f"Hub dataset {task.hub_path} ({task.name}, split {split!r})")
    except (ConnectionError, OSError) as exc:
        raise OSError(
            f"Could not load GLUE task {task.name!r} from the Hub dataset {task.hub_path!r} ({exc}). To use local "
            f"files, pass `data_dir` or set {GLUE_DIR_ENV} to a folder in the original GLUE layout "
            f"(holding {task.folder}/{task.train_file}, ...)."
        ) from exc
    return datasets.DatasetDict(loaded)


def load_glue(
    task: GlueTask | str,
    data_dir: str | os.PathLike | None = None,
    splits: Iterable[str] | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load GLUE splits for ``task`` as a ``datasets.DatasetDict``.

    Args:
        task: A :class:`GlueTask` or task name.
        data_dir: Local GLUE folder (original layout); defaults to ``$GLUE_DIR``; when neither is set the splits are
            loaded from the Hub dataset ``nyu-mll/glue``.
        splits: Splits to load (``"train"`` and/or the task's eval splits); default: all of them.
        cache_dir: ``datasets`` cache folder for Hub downloads.
    """
    from datasets import DatasetDict

    task = get_task(task) if isinstance(task, str) else task
    splits = list(splits) if splits is not None else list(task.split_files)
    for split in splits:
        if split not in task.split_files:
            raise ValueError(
                f"`splits` entry {split!r} is not a split of {task.name}; choose from {', '.join(task.split_files)}."
            )
    root = resolve_glue_dir(data_dir)
    if root is None:
        logger.info("No local GLUE folder (data_dir / %s); loading %s from the Hub", GLUE_DIR_ENV, task.hub_path)
        return _load_hub_splits(task, splits, cache_dir)
    task_dir = find_task_dir(task, root)
    return DatasetDict({split: _load_local_split(task, task_dir, split) for split in splits})


def truncate_splits(
    raw: DatasetDict, max_train_samples: int | None = None, max_eval_samples: int | None = None
) -> DatasetDict:
    """Keep the first ``max_train_samples`` rows of ``train`` and ``max_eval_samples`` of every other split."""
    from datasets import DatasetDict

    out = {}
    for split, dataset in raw.items():
        limit = max_train_samples if split == "train" else max_eval_samples
        out[split] = dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
    return DatasetDict(out)


def _tokenize_batch(
    batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, text_columns: tuple[str, ...], max_length: int
) -> dict[str, Any]:
    texts = [batch[name] for name in text_columns]
    return tokenizer(*texts, truncation=True, max_length=max_length)


def tokenize_glue(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    task: GlueTask | str,
    max_seq_length: int = 128,
    cache_dir: str | os.PathLike | None = None,
    load_from_cache_file: bool = True,
) -> DatasetDict:
    """Tokenise every split with ``Dataset.map(batched=True)``, without padding (pad per batch with
    ``DataCollatorWithPadding``).

    The text columns are removed; ``label`` and ``idx`` stay. The result is cached: Hub datasets in the ``datasets``
    cache, local files (which live in memory) under ``cache_dir`` (default: ``<HF_DATASETS_CACHE>/hf_wb_glue``),
    keyed by the file contents, the tokenizer and ``max_seq_length``.

    Args:
        raw: Splits from :func:`load_glue`.
        tokenizer: The model's tokenizer.
        task: A :class:`GlueTask` or task name.
        max_seq_length: Longest tokenised input; longer ones are truncated. Capped at the tokenizer's
            ``model_max_length`` (with a warning).
        cache_dir: Where to cache tokenised local splits.
        load_from_cache_file: Reuse a cached result when there is one.
    """
    import datasets
    from datasets import DatasetDict
    from datasets.fingerprint import Hasher

    task = get_task(task) if isinstance(task, str) else task
    if max_seq_length <= 0:
        raise ValueError(f"`max_seq_length` must be positive; got {max_seq_length}.")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and max_seq_length > model_max:
        logger.warning(
            "`max_seq_length` %d is longer than the tokenizer's model_max_length %d; using %d.",
            max_seq_length,
            model_max,
            model_max,
        )
        max_seq_length = model_max
    cache_root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE) / "hf_wb_glue"

    out = {}
    for split, dataset in raw.items():
        fn_kwargs = {"tokenizer": tokenizer, "text_columns": task.text_columns, "max_length": max_seq_length}
        cache_file_name = None
        if not dataset.cache_files:  # in memory: name the cache file ourselves
            key = Hasher.hash([dataset._fingerprint, _tokenize_batch, fn_kwargs])
            cache_root.mkdir(parents=True, exist_ok=True)
            cache_file_name = str(cache_root / f"{task.name}-{split}-{key}.arrow")
        out[split] = dataset.map(
            _tokenize_batch,
            batched=True,
            fn_kwargs=fn_kwargs,
            remove_columns=list(task.text_columns),
            load_from_cache_file=load_from_cache_file,
            cache_file_name=cache_file_name,
            desc=f"Tokenizing {task.name} {split}",
        )
    return DatasetDict(out)
