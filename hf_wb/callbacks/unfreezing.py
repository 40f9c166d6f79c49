"""`GradualUnfreezingCallback`: move the frozen boundary down on a schedule (ULMFiT's gradual unfreezing)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["GradualUnfreezingCallback"]


class GradualUnfreezingCallback(TrainerCallback):
    """Every ``every_epochs`` epochs (or ``every_steps`` optimizer steps) ask the trainer to unfreeze one more stage:
    the highest still-frozen block of each stack, then the embeddings.

    The stage is a pure function of the training position (``epoch // every_epochs`` or ``global_step //
    every_steps``), so a resumed run reaches the same stage at the same point; the trainer saves the stage it reached
    in every checkpoint and restores it before the optimizer is rebuilt.

    Args:
        unfreeze_to: called with the target stage (number of unfreezing steps since the start); it must be idempotent.
        every_epochs: epoch interval; 0 = not on epochs.
        every_steps: optimizer-step interval; 0 = not on steps.
    """

    def __init__(self, unfreeze_to: Callable[[int], None], every_epochs: int = 0, every_steps: int = 0) -> None:
        if bool(every_epochs) == bool(every_steps):
            raise ValueError(
                f"Set exactly one of `every_epochs` ({every_epochs}) and `every_steps` ({every_steps}) to a positive "
                "interval."
            )
        self.unfreeze_to = unfreeze_to
        self.every_epochs = every_epochs
        self.every_steps = every_steps

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_epochs:
            epoch = int((state.epoch or 0.0) + 1e-6)
            self.unfreeze_to(epoch // self.every_epochs)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.every_steps:
            self.unfreeze_to(state.global_step // self.every_steps)
