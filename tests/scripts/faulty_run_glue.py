"""``run_glue`` with one fault injected, for tests/test_faults_run.py (run as a real process, alone or under torchrun).

``HF_WB_FAULT`` says which:

- ``pause:K:FILE``: at the start of step K+1 print ``PAUSED K rank R pid P`` and wait (at most 120 s) until FILE
  exists; the test sends a signal to a process meanwhile, so that it arrives during step K+1 on every machine.
- ``kill9:K``: SIGKILL this process while it writes checkpoint-K: after the weights (and hf_wb's files), before the
  optimizer state and trainer_state.json -- a ``kill -9`` in the middle of a checkpoint write.

Without it this is ``scripts/run_glue.py``.
"""

import os
import signal
import sys
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from hf_wb.glue import run

kind, _, rest = os.environ.get("HF_WB_FAULT", "").partition(":")

if kind == "pause":
    pause_step, _, flag = rest.partition(":")

    class Pause(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == int(pause_step):
                print(f"PAUSED {pause_step} rank {args.process_index} pid {os.getpid()}", flush=True)
                deadline = time.monotonic() + 120
                while not Path(flag).exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

    wb_init = run.WBTrainer.__init__

    def init(self, *args, **kwargs):
        wb_init(self, *args, **kwargs)
        self.add_callback(Pause())

    run.WBTrainer.__init__ = init
elif kind == "kill9":
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if self.state.global_step == int(rest):
            os.kill(os.getpid(), signal.SIGKILL)
        save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = save
elif kind:
    raise SystemExit(f"unknown HF_WB_FAULT {kind!r}")

if __name__ == "__main__":
    sys.exit(run.main(sys.argv[1:]))
