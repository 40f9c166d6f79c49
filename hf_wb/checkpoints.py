"""Which checkpoints are complete, and which one a run resumes from.

A Trainer checkpoint (``checkpoint-<step>``) is written file by file; a process killed part-way (``kill -9``, an
out-of-memory kill, a node loss) leaves a folder that looks like a checkpoint but cannot be resumed. The Trainer
writes ``trainer_state.json`` after the weights, optimizer, scheduler and RNG states, and ``WBTrainer`` writes its
own files (``hf_wb_config.json``, ``hf_wb_state.json``) before any of them, so a checkpoint is complete when:

- ``trainer_state.json`` is there and parses, and its ``global_step`` is the folder's step;
- the weights are there (``model.safetensors``, ``pytorch_model.bin``, a sharded index, a PEFT adapter, or the
  engine's own layout: FSDP / DeepSpeed folders);
- for a ``WBTrainer`` run: ``hf_wb_config.json`` and ``hf_wb_state.json`` are there and parse.

Resuming with ``true`` (or automatically, in ``run_glue``) takes the newest complete checkpoint and skips newer
incomplete ones with a warning that names what is missing. A checkpoint the Trainer completed but that has no hf_wb
files, in a folder where no checkpoint has them, was written by another trainer: it is returned as it is, so that
``WBTrainer`` refuses it with its own error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_wb.config import CONFIG_NAME

__all__ = [
    "STATE_NAME",
    "TRAINER_STATE_NAME",
    "changed_training_settings",
    "checkpoint_problems",
    "clear_checkpoints",
    "finished_run",
    "last_complete_checkpoint",
    "list_checkpoints",
    "resolve_resume",
    "training_settings",
    "write_json_atomic",
]

logger = logging.getLogger(__name__)

STATE_NAME = "hf_wb_state.json"
TRAINER_STATE_NAME = "trainer_state.json"
WB_FILES = (CONFIG_NAME, STATE_NAME)
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# what holds the weights, by prefix of a file or folder name: plain / sharded / PEFT saves, FSDP and DeepSpeed layouts
_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "adapter_model", "global_step")
# the TrainingArguments that decide what a resumed run computes: recorded in hf_wb_state.json, compared on resume
TRAINING_SETTINGS = (
    "learning_rate",
    "weight_decay",
    "seed",
    "data_seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "lr_scheduler_type",
    "warmup_steps",
    "max_grad_norm",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
)
_TRUE = ("true", "last", "latest")
_FALSE = ("", "false", "none", "no")


def write_json_atomic(path: str | os.PathLike, values: object) -> None:
    """Write ``values`` as indented, sorted JSON under a temporary name, then rename it into place: a reader (or a
    resume after a kill) sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def training_settings(args: Any) -> dict[str, Any]:
    """The training arguments (:data:`TRAINING_SETTINGS`) that decide what a resumed run computes, JSON-ready."""
    values = {
        name: getattr(getattr(args, name, None), "value", getattr(args, name, None)) for name in TRAINING_SETTINGS
    }
    return json.loads(json.dumps(values, default=str))


def changed_training_settings(checkpoint: str | os.PathLike, args: Any) -> dict[str, tuple[Any, Any]]:
    """Training settings that differ between ``checkpoint``'s run (its ``hf_wb_state.json``) and ``args``:
    name -> (the checkpoint's, the current); {} when they match or the checkpoint did not record them."""
    path = Path(checkpoint) / STATE_NAME
    try:
        saved = json.loads(path.read_text(encoding="utf-8")).get("training_args") or {}
    except (OSError, ValueError):
        return {}
    now = training_settings(args)
    return {k: (saved[k], now[k]) for k in saved if k in now and saved[k] != now[k]}


def finished_run(checkpoint: str | os.PathLike) -> int | None:
    """The step of ``checkpoint`` when it is the last step of its run (``global_step >= max_steps`` in its
    trainer_state.json), else None."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    step, max_steps = state.get("global_step"), state.get("max_steps")
    return step if isinstance(step, int) and isinstance(max_steps, int) and 0 < max_steps <= step else None


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` folders in ``folder``, newest (highest step) first; [] if ``folder`` is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda x: x[0], reverse=True)]


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path.name} is unreadable ({type(exc).__name__}: {exc})"
    return None


def checkpoint_problems(checkpoint: str | os.PathLike, require_wb_files: bool = True) -> list[str]:
    """What keeps ``checkpoint`` from being complete (see the module docstring); [] when it is complete."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return [f"{checkpoint} is not a folder"]
    problems = []
    state_problem = _json_problem(checkpoint / TRAINER_STATE_NAME)
    if state_problem:
        problems.append(state_problem)
    else:
        match = _CHECKPOINT_RE.match(checkpoint.name)
        step = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8")).get("global_step")
        if match and step != int(match.group(1)):
            problems.append(f"{TRAINER_STATE_NAME} says step {step}, not {match.group(1)}")
    names = os.listdir(checkpoint)
    if not any(name.startswith(_WEIGHT_PREFIXES) for name in names):
        problems.append("the model weights (model.safetensors or pytorch_model.bin) are missing")
    if require_wb_files:
        problems.extend(p for p in (_json_problem(checkpoint / name) for name in WB_FILES) if p)
    return problems


def _has_wb_files(checkpoint: Path) -> bool:
    return any((checkpoint / name).exists() for name in WB_FILES)


def last_complete_checkpoint(folder: str | os.PathLike, require_wb_files: bool = True) -> str | None:
    """The newest complete checkpoint in ``folder`` (None if there is none); newer incomplete ones are skipped with a
    warning naming what they miss.

    With ``require_wb_files``, a checkpoint the Trainer completed but without hf_wb files counts as incomplete when
    another checkpoint in ``folder`` has hf_wb files (a ``WBTrainer`` run killed mid-save); when none has them the
    folder was written by another trainer, and its newest Trainer-complete checkpoint is returned for the caller to
    refuse.
    """
    checkpoints = list_checkpoints(folder)
    wb_run = require_wb_files and any(_has_wb_files(c) for c in checkpoints)
    for checkpoint in checkpoints:
        problems = checkpoint_problems(checkpoint, require_wb_files=wb_run)
        if not problems:
            return str(checkpoint)
        logger.warning("Skipping the incomplete checkpoint %s: %s.", checkpoint, "; ".join(problems))
    return None


def resolve_resume(
    resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike, require_wb_files: bool = True
) -> str | None:
    """The checkpoint to resume from: None for no resume (``None``, ``False``, ``"false"``), the newest complete one
    in ``output_dir`` for ``True`` / ``"true"`` / ``"last"``, or the given path after checking it is complete.

    Raises:
        ValueError: ``true`` with no complete checkpoint in ``output_dir``; a path that is not a complete checkpoint
            (the message names what is missing and the newest complete checkpoint next to it, if any).
    """
    value = resume_from_checkpoint
    if value is None or value is False:
        return None
    if isinstance(value, str) and not os.path.isdir(value):
        if value.strip().lower() in _FALSE:
            return None
        if value.strip().lower() in _TRUE:
            value = True
    if value is True:
        found = last_complete_checkpoint(output_dir, require_wb_files)
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint=true: no complete checkpoint in output_dir {str(output_dir)!r} "
                f"(checkpoints there: {[p.name for p in list_checkpoints(output_dir)] or 'none'}). Start without "
                "resume_from_checkpoint, or give the path of a complete checkpoint."
            )
        return found
    path = Path(str(value))
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint={str(value)!r}: no such folder.")
    wb_run = require_wb_files and (_has_wb_files(path) or any(_has_wb_files(c) for c in list_checkpoints(path.parent)))
    problems = checkpoint_problems(path, require_wb_files=wb_run)
    if problems:
        newest = last_complete_checkpoint(path.parent, require_wb_files)
        hint = f" The newest complete checkpoint next to it is {newest}." if newest else ""
        raise ValueError(
            f"Cannot resume from {path}: the checkpoint is incomplete ({'; '.join(problems)}); the run that wrote "
            f"it was probably killed while saving.{hint} Pass resume_from_checkpoint=true to take the newest "
            "complete checkpoint in output_dir."
        )
    return str(path)


def clear_checkpoints(folder: str | os.PathLike) -> list[str]:
    """Delete the ``checkpoint-<step>`` folders in ``folder`` (a run that starts over must not later resume from a
    previous run's checkpoints); returns what was deleted."""
    removed = []
    for checkpoint in list_checkpoints(folder):
        logger.warning("Starting over: deleting the previous run's checkpoint %s", checkpoint)
        shutil.rmtree(checkpoint)
        removed.append(str(checkpoint))
    return removed
