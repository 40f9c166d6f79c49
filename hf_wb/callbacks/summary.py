"""`RunSummaryCallback`: say what the recipe does when training starts, where any script's logging shows it.

transformers' logging setup (and the ``run_glue.py`` examples built on it) hides INFO records of other packages, and
with the default ``logging_steps=500`` a short run logs no rate at all. So, once per ``train()``, on the main process:

- the run summary (:func:`hf_wb.summary.run_summary`) is logged to the ``hf_wb.summary`` logger, which is set to
  INFO (as Lightning does for its package logger) and, when no handler is configured anywhere, gets its own stderr
  handler; silence it with ``logging.getLogger("hf_wb.summary").setLevel(logging.WARNING)`` or
  ``TrainingArguments(log_level="error")``;
- the summary is written to ``output_dir/hf_wb_summary.json``;
- the first optimizer step is logged (loss and every group's ``lr/<group>``), whatever ``logging_steps`` says.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["RunSummaryCallback", "summary_logger"]

summary_logger = logging.getLogger("hf_wb.summary")
if summary_logger.level == logging.NOTSET:
    summary_logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is emitted (as ``logging.lastResort``)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_FALLBACK = _StderrHandler()
_FALLBACK.setFormatter(logging.Formatter("%(message)s"))


def emit_summary(text: str) -> None:
    """Log ``text`` at INFO on ``hf_wb.summary``; with no handler configured anywhere, on stderr."""
    if not summary_logger.hasHandlers():
        summary_logger.addHandler(_FALLBACK)
        summary_logger.propagate = False
    elif _FALLBACK in summary_logger.handlers and len(logging.getLogger().handlers) > 0:
        summary_logger.removeHandler(_FALLBACK)  # the script configured logging since: use its handlers
        summary_logger.propagate = True
    summary_logger.info(text)


class RunSummaryCallback(TrainerCallback):
    """Log and save the run summary at the start of training, and log the first optimizer step.

    Args:
        summary_fn: returns the run summary (a JSON-able dict) once the run is set up.
        format_fn: renders it as text for the log.
    """

    def __init__(self, summary_fn: Callable[[], dict[str, Any]], format_fn: Callable[[dict[str, Any]], str]) -> None:
        self.summary_fn = summary_fn
        self.format_fn = format_fn
        self._first_step: int | None = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self._first_step = state.global_step + 1
        summary = self.summary_fn()
        if not state.is_world_process_zero:
            return
        if args.get_process_log_level() <= logging.WARNING:  # log_level "error" / "critical" silences it
            emit_summary(self.format_fn(summary))
        if args.should_save and args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            write_summary(args.output_dir, summary)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._first_step is not None and state.global_step == self._first_step:
            self._first_step = None
            if str(getattr(args.logging_strategy, "value", args.logging_strategy)) == "no":
                return None
            control.should_log = True  # the first step's loss and lr/<group>, whatever logging_steps is
            return control
        return None


def write_summary(folder: str, summary: dict[str, Any]) -> None:
    from hf_wb.summary import SUMMARY_NAME

    with open(os.path.join(folder, SUMMARY_NAME), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")
