"""Stop cleanly on SIGTERM / SIGINT / SIGUSR1: finish the optimizer step, save a checkpoint, stop.

A cluster scheduler, a spot-instance reclaim or ``scancel`` sends SIGTERM (SLURM's ``--signal`` sends SIGUSR1) and
kills the process a grace period later. By default that SIGTERM ends a Python process at once and every step since
the last save is lost. With this callback the signal only sets a flag; at the end of the optimizer step in progress
(``on_step_end``, after every micro-batch of gradient accumulation) the callback asks the Trainer to save a checkpoint
and stop, without evaluating. Under DDP the flag is agreed across ranks with one tiny ``all_reduce`` per step, so a
signal that reaches one rank only stops all of them at the same step. A second signal restores the previous handler
and re-raises it (a second Ctrl-C interrupts at once).

``WBTrainer`` installs it (``preemption_signals``) and raises :class:`TrainingPreempted` from ``train()`` after the
checkpoint is saved; ``run_glue`` exits with :data:`EXIT_PREEMPTED`. With a plain ``Trainer``, add the callback and
check ``callback.preempted`` after ``train()``.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["DEFAULT_SIGNALS", "EXIT_PREEMPTED", "PreemptionCallback", "TrainingPreempted", "parse_signals"]

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
EXIT_PREEMPTED = 75
"""Exit code of ``run_glue`` after a preemption checkpoint: ``EX_TEMPFAIL`` of sysexits.h, "try again later" (run the
same command again to resume)."""


class TrainingPreempted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint at ``global_step``; run again to resume from it.

    Attributes:
        signal_name: e.g. ``"SIGTERM"``.
        global_step: the last optimizer step finished (and saved).
        checkpoint: the checkpoint folder written for it (None if saving is disabled on this process).
    """

    def __init__(self, signal_name: str, global_step: int, checkpoint: str | None) -> None:
        self.signal_name, self.global_step, self.checkpoint = signal_name, global_step, checkpoint
        where = f"checkpoint {checkpoint}" if checkpoint else "a checkpoint"
        super().__init__(
            f"Training stopped on {signal_name} after step {global_step}; saved {where}. Run the same command again "
            "to resume from it (resume_from_checkpoint=true)."
        )


def parse_signals(signals: str | Iterable[str | int] | None) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` / ``["TERM", 10]`` / ``"none"`` -> signal enums; ValueError naming an unknown one."""
    if signals is None:
        return ()
    if isinstance(signals, str):
        if signals.strip().lower() in ("", "none", "off", "false"):
            return ()
        signals = [s for s in signals.replace(" ", ",").split(",") if s]
    parsed = []
    for s in signals:
        try:
            if isinstance(s, int) or str(s).isdigit():
                sig = signal.Signals(int(s))
            else:
                name = str(s).strip().upper()
                sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"`preemption_signals`: unknown signal {s!r}; use names such as SIGTERM,SIGINT,SIGUSR1, or 'none'."
            ) from exc
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"`preemption_signals`: {sig.name} cannot be caught; use SIGTERM, SIGINT or SIGUSR1.")
        if sig not in parsed:
            parsed.append(sig)
    return tuple(parsed)


class PreemptionCallback(TrainerCallback):
    """Turn a termination signal into "finish this step, save a checkpoint, stop" (see the module docstring).

    Args:
        signals: which signals to catch (names, numbers, or a comma-separated string); default SIGTERM, SIGINT,
            SIGUSR1.
    """

    def __init__(self, signals: str | Iterable[str | int] | None = DEFAULT_SIGNALS) -> None:
        self.signals = parse_signals(signals)
        self.received: signal.Signals | None = None  # set by the handler (this process)
        self.preempted: signal.Signals | None = None  # set when the run agreed to stop (all processes)
        self.stopped_at: int | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._installed_by_hook = False

    # ----- signal handling ----------------------------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> None:
        """Catch the signals (main thread only; elsewhere Python cannot, and this logs why and does nothing)."""
        if self.installed or not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: %s cannot be caught, no preemption checkpoint.",
                           ", ".join(s.name for s in self.signals))  # fmt: skip
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:  # second signal: give up on the clean stop
            previous = self._previous.get(sig, signal.SIG_DFL)
            self.uninstall()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.raise_signal(signum)
            return
        self.received = sig

    # ----- agreement across processes -------------------------------------------------------------------------------
    def agree(self, device: torch.device | str | None = None) -> signal.Signals | None:
        """The signal any process received (None if none did); a collective call under torch.distributed."""
        import torch.distributed as dist

        local = int(self.received) if self.received is not None else 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                device = "cpu"
            flag = torch.tensor([local], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        return signal.Signals(local) if local else None

    # ----- Trainer hooks --------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if not self.installed:
            self.install()
            self._installed_by_hook = self.installed

    def on_step_end(self, args, state, control, **kwargs):
        if self.preempted is not None:
            return control
        agreed = self.agree(args.device)
        if agreed is None:
            return None
        self.preempted, self.stopped_at = agreed, state.global_step
        logger.warning(
            "%s received: step %d is finished; saving a checkpoint and stopping (no evaluation). Run the same "
            "command again to resume.",
            agreed.name,
            state.global_step,
        )
        control.should_save = True
        control.should_evaluate = False
        control.should_training_stop = True
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.preempted is None:
            return None
        # already saved at this step: no second save, no evaluation; keep the Trainer from deleting the checkpoint
        # just written (save_total_limit=1 with load_best_model_at_end deletes every checkpoint but the best one)
        # or loading the best model, in a run that is about to exit
        control.should_save = False
        control.should_evaluate = False
        state.best_model_checkpoint = None
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._installed_by_hook:
            self.uninstall()
            self._installed_by_hook = False
