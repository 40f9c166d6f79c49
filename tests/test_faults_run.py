"""Fault matrix, runs: preemption signals, kills during a checkpoint write, checkpoint ordering, resume.

Each test is a row of README "Reliability". The signals are real: sent with ``os.kill`` to this process (in-process
runs) or to another process (``tests/scripts/faulty_run_glue.py``, alone and under 2-process torchrun).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, cpu_args, tiny_model
from safetensors.torch import load_file
from test_run_glue import mrpc_argv, tiny_model_dir  # noqa: F401  (a fixture)
from test_trainer import QUIET, make_dataset
from transformers import Trainer, TrainerCallback

from hf_wb import PreemptionCallback, TrainingPreempted, WBConfig, WBTrainer
from hf_wb.callbacks.preemption import EXIT_PREEMPTED, parse_signals
from hf_wb.checkpoints import checkpoint_problems, last_complete_checkpoint, list_checkpoints, resolve_resume
from hf_wb.config import CONFIG_NAME
from hf_wb.glue.run import main
from hf_wb.trainer import STATE_NAME

CONFIG = WBConfig(top_layers=2, **QUIET)
FAULTY = REPO / "tests" / "scripts" / "faulty_run_glue.py"


def run_args(out, **kw):
    values = dict(
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=100,  # no regular save before the end: a checkpoint in between comes from the signal
    )
    return cpu_args(out, **{**values, **kw})


def trainer(out, callbacks=(), seed=0, **kw):
    return WBTrainer(
        model=tiny_model("bert", 4, seed=seed, hidden_dropout_prob=0.3),
        args=run_args(out, **kw),
        train_dataset=make_dataset(96),
        wb_config=CONFIG,
        callbacks=list(callbacks),
    )


class Send(TrainerCallback):
    """Send ``signals`` to this process at ``hook`` when ``global_step == step``."""

    def __init__(self, hook, step, *signals):
        self.hook, self.step, self.signals = hook, step, signals
        setattr(self, hook, self._send)

    def _send(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for sig in self.signals:
                os.kill(os.getpid(), sig)
            self.step = None


class FirstStep(TrainerCallback):
    """Records the step a (resumed) run starts from."""

    first = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first is None:
            self.first = state.global_step


def assert_same_params(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


# ----- preemption -------------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tmp_path, caplog):
    """SIGTERM in the first micro-batch of step 3 (gradient accumulation 2): step 3 finishes, checkpoint-3 is
    complete, train() raises TrainingPreempted, the handler is restored, and resuming ends with the parameters of an
    uninterrupted run."""
    full = trainer(tmp_path / "full")
    full.train()
    before = signal.getsignal(signal.SIGTERM)
    run = trainer(tmp_path / "out", [Send("on_substep_end", 2, signal.SIGTERM)])
    with caplog.at_level(logging.WARNING, logger="hf_wb"), pytest.raises(TrainingPreempted) as info:
        run.train()
    assert info.value.signal_name == "SIGTERM" and info.value.global_step == 3 == run.state.global_step
    assert info.value.checkpoint == str(tmp_path / "out" / "checkpoint-3")
    assert checkpoint_problems(info.value.checkpoint) == []
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3"]
    assert "SIGTERM received: step 3 is finished; saving a checkpoint and stopping" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before

    first = FirstStep()
    resumed = trainer(tmp_path / "out", [first], seed=1)
    resumed.train(resume_from_checkpoint=True)
    assert first.first == 3
    assert_same_params(full.model, resumed.model)


def test_configured_signal_only_and_a_second_signal_is_not_caught(tmp_path):
    """preemption_signals="SIGUSR1": SIGUSR1 stops cleanly, SIGTERM's handler is left alone; a second SIGUSR1 goes to
    the handler that was there before (a second Ctrl-C interrupts at once)."""
    seen, checked = [], {}

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            checked["sigterm"] = signal.getsignal(signal.SIGTERM)

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        run = WBTrainer(
            model=tiny_model("bert", 4),
            args=run_args(tmp_path / "out"),
            train_dataset=make_dataset(96),
            wb_config=CONFIG,
            callbacks=[Check(), Send("on_step_end", 1, signal.SIGUSR1, signal.SIGUSR1)],
            preemption_signals="SIGUSR1",
        )
        sigterm = signal.getsignal(signal.SIGTERM)
        with pytest.raises(TrainingPreempted, match="Training stopped on SIGUSR1 after step 1"):
            run.train()
        assert checked["sigterm"] is sigterm
        assert seen == [signal.SIGUSR1]  # the second one
        assert checkpoint_problems(tmp_path / "out" / "checkpoint-1") == []
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_preemption_signals_off_and_checked(tmp_path):
    assert parse_signals("none") == () and parse_signals(None) == ()
    assert parse_signals("TERM, SIGUSR1,2") == (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    with pytest.raises(ValueError, match=r"`preemption_signals`: unknown signal 'SIGFOO'"):
        parse_signals("SIGTERM,SIGFOO")
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        parse_signals("SIGKILL")
    off = WBTrainer(model=tiny_model("bert"), args=run_args(tmp_path), wb_config=CONFIG, preemption_signals="none")
    assert off.wb_preemption is None or not off.wb_preemption.signals
    assert not any(isinstance(c, PreemptionCallback) for c in off.callback_handler.callbacks)


def test_signal_after_the_last_step_saves_that_step(tmp_path):
    """A signal while train() finishes (after the last optimizer step, no checkpoint planned): the last step is saved
    and TrainingPreempted is raised, so a rerun has nothing left to train."""
    run = trainer(tmp_path / "out", [Send("on_train_end", 6, signal.SIGTERM)], save_strategy="no")
    with pytest.raises(TrainingPreempted) as info:
        run.train()
    assert info.value.global_step == 6
    assert checkpoint_problems(tmp_path / "out" / "checkpoint-6") == []


def test_plain_trainer_with_the_callback(tmp_path):
    callback = PreemptionCallback("SIGTERM")
    run = Trainer(
        model=tiny_model("bert", 4),
        args=run_args(tmp_path / "out"),
        train_dataset=make_dataset(96),
        callbacks=[Send("on_step_end", 2, signal.SIGTERM), callback],
    )
    run.train()
    assert callback.preempted == signal.SIGTERM and callback.stopped_at == 2 == run.state.global_step
    assert checkpoint_problems(tmp_path / "out" / "checkpoint-2", require_wb_files=False) == []
    assert signal.getsignal(signal.SIGTERM) is not callback._handle


# ----- checkpoint ordering and the Hub push -------------------------------------------------------------------------


def test_checkpoint_complete_before_trainer_state_rotation_and_push(tmp_path, monkeypatch):
    """hf_wb's files are in the checkpoint when trainer_state.json is written, when the Trainer pushes it to the Hub
    (hub_strategy=checkpoint: `last-checkpoint`) and when it deletes older ones (save_total_limit=1); the model pushed
    from output_dir carries hf_wb_config.json. The Hub is replaced by a recorder of what each upload held."""
    import huggingface_hub
    import transformers.trainer as trainer_module
    from transformers import TrainerState

    uploads, at_state, at_rotation = [], [], []

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kwargs):
        uploads.append((path_in_repo, sorted(os.listdir(folder_path))))
        done = concurrent.futures.Future()
        done.set_result(None)
        return done if kwargs.get("run_as_future") else None

    repo = types.SimpleNamespace(repo_id="u/m")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    save_to_json = TrainerState.save_to_json

    def record_state(self, json_path):
        at_state.append(sorted(os.listdir(os.path.dirname(json_path))))
        save_to_json(self, json_path)

    rotate = trainer_module.rotate_checkpoints

    def record_rotation(output_dir, **kwargs):
        newest = list_checkpoints(output_dir)[0]
        at_rotation.append((newest.name, checkpoint_problems(newest)))
        return rotate(output_dir=output_dir, **kwargs)

    monkeypatch.setattr(TrainerState, "save_to_json", record_state)
    monkeypatch.setattr(trainer_module, "rotate_checkpoints", record_rotation)
    run = trainer(
        tmp_path / "out",
        max_steps=4,
        save_steps=2,
        save_total_limit=1,
        push_to_hub=True,
        hub_model_id="u/m",
        hub_strategy="checkpoint",
    )
    run.train()
    run.save_model()  # the final push of output_dir

    assert at_state and all({CONFIG_NAME, STATE_NAME} <= set(files) for files in at_state)
    assert at_rotation == [("checkpoint-2", []), ("checkpoint-4", [])]
    pushed = [files for where, files in uploads if where == "last-checkpoint"]
    assert len(pushed) == 2
    for files in pushed:
        assert {CONFIG_NAME, STATE_NAME, "trainer_state.json", "model.safetensors", "optimizer.pt"} <= set(files)
    models = [files for where, files in uploads if where is None]
    assert models and all(CONFIG_NAME in files for files in models)
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-4"]


# ----- kill -9 during a checkpoint write: incomplete checkpoints ---------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished run with checkpoint-2 and checkpoint-4 (no rotation), to damage copies of."""
    out = tmp_path_factory.mktemp("two") / "out"
    trainer(out, max_steps=4, save_steps=2).train()
    return out


DAMAGE = {
    "no trainer_state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "torn trainer_state": (
        lambda c: (c / "trainer_state.json").write_text((c / "trainer_state.json").read_text()[:50]),
        "trainer_state.json is unreadable (JSONDecodeError",
    ),
    "no hf_wb_state": (lambda c: (c / STATE_NAME).unlink(), f"{STATE_NAME} is missing"),
    "no hf_wb_config": (lambda c: (c / CONFIG_NAME).unlink(), f"{CONFIG_NAME} is missing"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "the model weights"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_incomplete_checkpoint_is_skipped_or_refused(two_checkpoints, tmp_path, caplog, damage):
    """checkpoint-4 torn as a kill -9 during its write leaves it: `true` takes checkpoint-2 with a warning naming what
    is missing; the path itself is refused with the same words and the complete checkpoint next to it."""
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    breaks, missing = DAMAGE[damage]
    breaks(out / "checkpoint-4")
    with pytest.raises(ValueError, match=r"Cannot resume from .*checkpoint-4: the checkpoint is incomplete") as info:
        resolve_resume(str(out / "checkpoint-4"), out)
    assert missing in str(info.value) and f"next to it is {out / 'checkpoint-2'}" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="hf_wb"):
        assert resolve_resume("true", out) == str(out / "checkpoint-2")
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-4'}: " in caplog.text and missing in caplog.text


def test_resume_true_trains_on_from_the_last_complete_checkpoint(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    first = FirstStep()
    resumed = trainer(out, [first], max_steps=4, save_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert first.first == 2 and resumed.state.global_step == 4
    assert checkpoint_problems(out / "checkpoint-4") == []  # written again, complete


def test_no_complete_checkpoint_and_a_foreign_one(two_checkpoints, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    for c in list_checkpoints(out):
        (c / "trainer_state.json").unlink()
    assert last_complete_checkpoint(out) is None
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=true: no complete checkpoint in output_dir"):
        resolve_resume(True, out)
    # a plain Trainer's complete checkpoint, given by path: still refused as not written by WBTrainer
    plain = tmp_path / "plain"
    Trainer(model=tiny_model("bert", 4), args=run_args(plain, max_steps=2, save_steps=2),
            train_dataset=make_dataset(96)).train()  # fmt: skip
    with pytest.raises(ValueError, match="was not written by WBTrainer"):
        trainer(plain, max_steps=2).train(resume_from_checkpoint=str(plain / "checkpoint-2"))


# ----- run_glue: resume true / auto / start over, exit codes (real processes) --------------------------------------


def _mark(checkpoint: Path, marker: str) -> None:
    """Tag a checkpoint's trainer_state so that a run resumed from it carries the tag into its own state."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state["log_history"].insert(0, {"step": 0, "marker": marker})
    path.write_text(json.dumps(state))


def _markers(out: Path) -> list[str]:
    return [h["marker"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "marker" in h]


def glue_argv(model_dir, glue_dir, out, *extra):
    return mrpc_argv(model_dir, glue_dir, out, "--save_strategy", "steps", "--save_steps", "2", "--do_eval", "false",
                     *extra)  # fmt: skip


def test_run_glue_resume_true_auto_and_start_over(tiny_model_dir, glue_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(glue_argv(tiny_model_dir, glue_dir, out, "--max_steps", "2")) == 0
    _mark(out / "checkpoint-2", "a")
    # the bug: "The checkpoint True has no hf_wb_config.json"
    assert main(glue_argv(tiny_model_dir, glue_dir, out, "--max_steps", "4", "--resume_from_checkpoint", "True")) == 0
    assert _markers(out) == ["a"]
    # a finished run's last checkpoint is not resumed (transformers 5.24 would train a step past the end)
    with pytest.raises(ValueError, match=r"checkpoint-4: it is the last step \(4\) of a finished run"):
        main(glue_argv(tiny_model_dir, glue_dir, out, "--max_steps", "4"))
    # by itself only with the settings the checkpoint was trained with (here: those of checkpoint-4's run)
    with pytest.raises(ValueError, match=r"a checkpoint of a run with other training settings \(`learning_rate`: "
                       r"2e-05 -> 0.001\); resuming it by itself would mix two runs"):  # fmt: skip
        main(glue_argv(tiny_model_dir, glue_dir, out, "--max_steps", "4", "--learning_rate", "1e-3"))
    with pytest.raises(ValueError, match="`overwrite_output_dir` starts over and `resume_from_checkpoint`"):
        main(glue_argv(tiny_model_dir, glue_dir, out, "--overwrite_output_dir", "--resume_from_checkpoint", "true"))
    _mark(out / "checkpoint-4", "c")
    assert main(glue_argv(tiny_model_dir, glue_dir, out, "--max_steps", "2", "--overwrite_output_dir")) == 0
    assert _markers(out) == [] and [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


@pytest.fixture
def one_thread():
    """In-process runs with the thread count of the subprocesses (OMP_NUM_THREADS=1), so that results match bit for
    bit (a different thread count changes the order of float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


def _run_until_paused(cmd, env, cwd, processes=1):
    """Start ``cmd`` and read its output until ``processes`` lines ``PAUSED ... pid P``; returns (proc, pids, log)."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids, log = {}, []
    while len(pids) < processes:
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=60)
            pytest.fail("the run ended before pausing:\n" + "".join(log)[-4000:])
        log.append(line)
        # searched, not matched at the start: the other rank's progress bars (written with \r, no newline) can share
        # the line the PAUSED message lands on
        for rank, pid in re.findall(r"PAUSED \d+ rank (\d+) pid (\d+)", line):
            pids[int(rank)] = int(pid)
    return proc, pids, log


def _final_params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_run_glue_sigterm_and_kill9_then_the_same_command_resumes(tiny_model_dir, glue_dir, tmp_path, one_thread):  # noqa: F811
    """Real processes, configs/glue/mrpc.yaml (save_total_limit 1), 6 steps, a save every 2:

    - SIGTERM sent from outside during step 3: the run saves checkpoint-3 (the last finished step; checkpoint-2 is
      rotated away) and exits with 75; the same command again resumes from it;
    - SIGKILL while checkpoint-4 is being written (weights written, optimizer state and trainer_state.json not): the
      same command skips the torn checkpoint-4 with a warning and resumes from checkpoint-2;

    and both end with exactly the parameters of an uninterrupted run."""
    argv = lambda out: glue_argv(tiny_model_dir, glue_dir, out, "--max_steps", "6")  # noqa: E731
    assert main(argv(tmp_path / "reference")) == 0
    reference = _final_params(tmp_path / "reference")

    out, flag = tmp_path / "term", tmp_path / "go"
    env = {**_env(), "HF_WB_FAULT": f"pause:2:{flag}"}
    proc, pids, log = _run_until_paused([sys.executable, str(FAULTY), *argv(out)], env, tmp_path)
    os.kill(pids[0], signal.SIGTERM)
    flag.touch()
    log.append(proc.communicate(timeout=300)[0])
    log = "".join(log)
    assert proc.returncode == EXIT_PREEMPTED, log[-4000:]
    assert "SIGTERM received: step 3 is finished; saving a checkpoint and stopping" in log
    assert f"Exit code {EXIT_PREEMPTED}" in log
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert checkpoint_problems(out / "checkpoint-3") == []
    assert not (out / "model.safetensors").exists()  # no final model from a preempted run
    assert main(argv(out)) == 0
    _assert_same(_final_params(out), reference)

    out = tmp_path / "kill9"
    proc = subprocess.run([sys.executable, str(FAULTY), *argv(out)], env={**_env(), "HF_WB_FAULT": "kill9:4"},
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-4000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-2"]
    assert "trainer_state.json is missing" in checkpoint_problems(out / "checkpoint-4")
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert main(argv(out)) == 0
    _assert_same(_final_params(out), reference)


@pytest.mark.slow
def test_ddp_sigterm_to_one_rank_stops_both(tiny_model_dir, glue_dir, tmp_path):  # noqa: F811
    """2-process torchrun (gloo on CPU): SIGTERM reaches rank 1 only, during step 3. Both ranks agree, stop after step
    3 and exit with 75, checkpoint-3 is complete, and the same command resumes and ends with the parameters of an
    uninterrupted 2-process run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(FAULTY)]

    def argv(out):
        values = glue_argv(tiny_model_dir, glue_dir, out, "--max_steps", "6")
        values.remove("--use_cpu")  # run_glue itself notices 2 processes without a GPU
        return values

    ref = subprocess.run([*torchrun, *argv(tmp_path / "reference")], env=_env(), cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert ref.returncode == 0, (ref.stdout + ref.stderr)[-4000:]

    out, flag = tmp_path / "out", tmp_path / "go"
    proc, pids, log = _run_until_paused(
        [*torchrun, *argv(out)], {**_env(), "HF_WB_FAULT": f"pause:2:{flag}"}, tmp_path, processes=2
    )
    os.kill(pids[1], signal.SIGTERM)
    flag.touch()
    log.append(proc.communicate(timeout=300)[0])
    log = "".join(log)
    assert proc.returncode != 0, log[-4000:]
    assert log.count("SIGTERM received: step 3 is finished") == 2, log[-4000:]
    assert log.count(f"Exit code {EXIT_PREEMPTED}") == 2
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert checkpoint_problems(out / "checkpoint-3") == []

    again = subprocess.run([*torchrun, *argv(out)], env=_env(), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    _assert_same(_final_params(out), _final_params(tmp_path / "reference"))
