"""The frozen-prefix cache: compute what the frozen blocks output once per example, then train only the top.

When the embeddings and the bottom ``k`` blocks of a stack are frozen and pinned to eval mode, the hidden states
that leave block ``k - 1`` never change for a given example: no weight there moves and no dropout runs. The cache
keeps each example's states (unpadded, in float32, bfloat16 or float16) once they have been computed: in memory it
records them while the first epoch runs the full model (no separate pass), on disk (memory-mapped) it runs the
prefix once over the training and evaluation examples before training. Once an example is cached the frozen blocks'
``forward`` is replaced so that:

- blocks ``0 .. k-2`` pass their input through unchanged (no compute),
- block ``k - 1`` returns the cached states of the batch's examples, right-padded to the batch's length,

while everything else (embeddings lookup, attention masks, position handling, the top blocks, pooling and the
head) is still the model's own forward. Batches carry the examples' cache rows in a column ``hf_wb_index`` that
the trainer takes out before the forward; a batch without it runs the full model.

Exactness: the top blocks see the states the frozen prefix would compute for the unpadded example. With
attention masks that exclude padding (BERT-family encoders, decoders with right padding) that is what the full
model computes too, so float32 caches reproduce training without the cache up to float rounding; bfloat16
(8 bits of mantissa) and float16 caches halve memory at a relative error of about 4e-3 and 5e-4 per value.

On disk (``cache_dir``) the cache is keyed by everything the states depend on: the frozen tensors (and their
dtypes), the model's config (``hidden_act``, ``layer_norm_eps``, the attention implementation, ...), the boundary,
the storage dtype, and the tokenised inputs of every row (hashed from the Arrow columns of a ``datasets.Dataset``,
remembered per process by the dataset's ``_fingerprint``; row by row for other datasets). A cache folder is written
under a temporary name and renamed into place, never rewritten in place (a run that has it memory-mapped keeps a
valid mapping). A file lock per key makes concurrent runs build it once; the others wait and load it. Every file's
size and xxh3-128 checksum are recorded at build and verified on load: a zeroed, bit-flipped or truncated cache is
rebuilt with a warning, never used. ``hf-wb cache list|clear DIR`` shows and removes cache folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import types
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_wb.layers import EMBEDDINGS, LayerMap, unit_name, unwrap_model

__all__ = [
    "INDEX_COLUMN",
    "CacheUnsupported",
    "PrefixCache",
    "cache_boundary",
    "clear_cache_dir",
    "data_fingerprint",
    "list_cache_dir",
    "prefix_fingerprint",
]

logger = logging.getLogger(__name__)

INDEX_COLUMN = "hf_wb_index"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NP_STORAGE = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16}  # bf16 bits stored as int16
FORMAT = "hf_wb-prefix-cache-2"  # written into meta.json; a folder with another format is rebuilt, not read
_FILES = ("states.npy", "offsets.npy")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
# config entries that name or label the model but do not change what its frozen blocks compute
_CONFIG_NAMES_ONLY = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "architectures", "id2label", "label2id"}
    | {"finetuning_task", "problem_type"}
)


class CacheUnsupported(ValueError):
    """The frozen-prefix cache cannot be exact for this model or recipe."""


class _StopForward(Exception):
    pass


@dataclass
class _Boundary:
    stack: str
    frozen_blocks: int
    block_names: tuple[str, ...]


def cache_boundary(model: nn.Module, lmap: LayerMap) -> _Boundary:
    """The stack and number of frozen bottom blocks the cache can serve, or :class:`CacheUnsupported` saying why."""
    model = unwrap_model(model)
    if len(lmap.stacks) != 1:
        raise CacheUnsupported(
            f"{type(model).__name__} has {len(lmap.stacks)} stacks of blocks (an encoder-decoder); the frozen-prefix "
            "cache supports single-stack models (BERT-family encoders, decoders)."
        )
    ((label, stack),) = lmap.stacks.items()
    named = dict(model.named_parameters())
    emb = lmap.params_of(label, EMBEDDINGS)
    if any(named[n].requires_grad for n in emb):
        raise CacheUnsupported("The embeddings train, so the frozen prefix's output changes: freeze them too.")
    k = 0
    while k < stack.num_blocks and not any(named[n].requires_grad for n in lmap.params_of(label, "block", k)):
        k += 1
    if k == 0:
        raise CacheUnsupported("No block is frozen: there is no frozen prefix to cache.")
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # the older name warns in transformers 5
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        raise CacheUnsupported("Activation checkpointing re-runs block forwards; turn it off to use the cache.")
    for name in stack.block_names[:k]:
        if any(m.training for m in model.get_submodule(name).modules()):
            raise CacheUnsupported(f"The frozen block {name} is in train mode (dropout would run): pin it to eval.")
    return _Boundary(label, k, stack.block_names)


def prefix_fingerprint(model: nn.Module, lmap: LayerMap, boundary: _Boundary, dtype: str) -> str:
    """Hash of everything the cached states depend on in the model: the frozen tensors (values and dtypes), the
    model's config (minus names and label maps), the attention implementation, the boundary, the storage dtype."""
    model = unwrap_model(model)
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, type(model).__name__, boundary.stack, boundary.frozen_blocks, dtype]).encode())
    config = getattr(model, "config", None)
    if config is not None:
        values = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NAMES_ONLY}
        values["_attn_implementation"] = getattr(config, "_attn_implementation", None)
        h.update(json.dumps(values, sort_keys=True, default=repr).encode())
    frozen_units = {unit_name(boundary.stack, EMBEDDINGS, None)} | {
        unit_name(boundary.stack, "block", i) for i in range(boundary.frozen_blocks)
    }
    named = dict(model.named_parameters())
    for name in lmap.params:
        if lmap.unit(name) in frozen_units:
            tensor = named[name].detach()
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            h.update(tensor.float().cpu().numpy().tobytes())
    for name, buf in model.named_buffers():  # position ids, token type ids
        if lmap.module_units.get(name.rsplit(".", 1)[0], (None, None, None))[1] == EMBEDDINGS:
            h.update(f"{name}:{buf.dtype}:{tuple(buf.shape)}".encode())
            h.update(buf.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


_DATASET_DIGESTS: dict[tuple[str, tuple[str, ...]], str] = {}  # (datasets fingerprint, columns) -> content digest


def data_fingerprint(sources: list[Any], columns: tuple[str, ...] = ("input_ids",)) -> str:
    """Hash of the model inputs (``columns``) of every row of ``sources``, in order.

    A ``datasets.Dataset`` is hashed from its Arrow columns in bulk (no Python loop over rows), and the result is
    remembered for the process by the dataset's ``_fingerprint`` (which ``datasets`` changes with every transform):
    the unfreeze stages and evaluation passes of a run hash each dataset once. Its fingerprint itself is not the key:
    for in-memory datasets (``Dataset.from_dict``) it is random, so two runs or two ranks would never agree. Other
    datasets (``torch.utils.data.Dataset``, a dataset with a custom transform) are hashed row by row through
    ``source[i]``: slower, and correct.
    """
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, list(columns)]).encode())
    for src in sources:
        h.update(f"source:{len(src)}|".encode())
        h.update(_source_digest(src, columns).encode())
    return h.hexdigest()[:16]


def _source_digest(src: Any, columns: tuple[str, ...]) -> str:
    fingerprint = _arrow_fingerprint(src)
    if fingerprint is None:
        return _rows_digest(src, columns)
    memo = (fingerprint, columns)
    if memo not in _DATASET_DIGESTS:
        if len(_DATASET_DIGESTS) > 256:
            _DATASET_DIGESTS.clear()
        _DATASET_DIGESTS[memo] = _arrow_digest(src, columns)
    return _DATASET_DIGESTS[memo]


def _arrow_fingerprint(src: Any) -> str | None:
    """The ``_fingerprint`` of a ``datasets.Dataset`` whose rows are its Arrow data (no custom transform), or None."""
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return None
    if not isinstance(src, Dataset) or getattr(src, "_format_type", None) == "custom":
        return None
    return getattr(src, "_fingerprint", None)


def _arrow_digest(src: Any, columns: tuple[str, ...]) -> str:
    import xxhash

    present = [c for c in columns if c in src.column_names]
    table = src.with_format("arrow", columns=present)[:] if len(src) else None
    h = xxhash.xxh3_128()
    h.update(b"arrow")
    for name in present:
        h.update(f"|column:{name}|".encode())
        if table is not None:
            for chunk in table.column(name).chunks:
                _hash_arrow_array(h, chunk)
    return "a" + h.hexdigest()


def _hash_arrow_array(h: Any, array: Any) -> None:
    import pyarrow as pa

    h.update(f"<{array.type}:{len(array)}:{array.null_count}>".encode())
    if array.null_count:
        h.update(np.asarray(array.is_null().to_numpy(zero_copy_only=False)).tobytes())
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
        h.update((offsets - offsets[0]).tobytes())
        _hash_arrow_array(h, array.flatten())
    elif pa.types.is_fixed_size_list(array.type):
        _hash_arrow_array(h, array.flatten())
    else:
        values = array.to_numpy(zero_copy_only=False)
        h.update(np.ascontiguousarray(values).tobytes() if values.dtype != object else repr(values.tolist()).encode())


def _rows_digest(src: Any, columns: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for i in range(len(src)):
        row = src[i]
        for c in columns:
            if c in row:
                value = np.asarray(row[c].cpu() if isinstance(row[c], torch.Tensor) else row[c])
                h.update(f"{c}:{value.dtype.str}:{value.shape}|".encode())
                h.update(np.ascontiguousarray(value).tobytes())
        h.update(b"\n")
    return "r" + h.hexdigest()


class PrefixCache:
    """Per-example hidden states at the frozen boundary of one stack, and the forward patches that use them.

    Args:
        model: the model (unwrapped).
        lmap: its layer map.
        dtype: storage dtype, "float32" | "bfloat16" | "float16".
        cache_dir: folder for memory-mapped storage; None keeps the states in memory.
    """

    def __init__(self, model: nn.Module, lmap: LayerMap, dtype: str = "float32", cache_dir: str | None = None):
        if dtype not in _DTYPES:
            raise ValueError(f"`cache_dtype` must be one of {tuple(_DTYPES)}, got {dtype!r}.")
        self.model = unwrap_model(model)
        self.lmap = lmap
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.mixed_precision: str | None = None  # the autocast mode the states are computed under (part of the key)
        self.boundary = cache_boundary(self.model, lmap)
        self.key: str | None = None
        self.storage: torch.Tensor | None = None
        self.offsets: np.ndarray | None = None
        self.num_examples = 0
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._installed: list[nn.Module] = []
        self._tuple_len = 0
        self._rows: list[torch.Tensor | None] | None = None  # lazy mode: filled as the first epoch runs
        self.stats = {"built": 0, "build_seconds": 0.0, "served_batches": 0, "loaded": 0, "verify_seconds": 0.0}

    # ----- building --------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        if self._rows is not None:
            return sum(r.numel() * r.element_size() for r in self._rows if r is not None)
        return 0 if self.storage is None else self.storage.numel() * self.storage.element_size()

    def build(
        self,
        sources: list[Any],
        collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
        batch_size: int = 64,
        device: torch.device | str = "cpu",
        progress: bool = True,
        lazy: bool = False,
    ) -> list[int]:
        """Run the frozen prefix over every example of ``sources`` (datasets of tokenised rows) and store the states.

        Rows get global cache indices in order: source 0's rows first, then source 1's... Returns each source's
        offset (the index of its first row). Reuses a memory-mapped cache in ``cache_dir`` with the same key once
        its checksums match; builds it under a file lock otherwise (concurrent runs build it once: the others wait,
        then load it), writing it under a temporary name renamed into place.

        With ``lazy=True`` (in memory only) nothing is computed now: the first time a batch's rows pass through the
        model, the full forward runs and the boundary's states are recorded; later batches of recorded rows are
        served from the cache. The first epoch then costs what it costs without the cache, and there is no
        separate build pass.
        """
        columns = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
        starts, total = [], 0
        for src in sources:
            starts.append(total)
            total += len(src)
        # states computed under mixed precision differ from float32 ones: the compute precision is part of the key
        compute = self.dtype if self.mixed_precision in (None, "no") else f"{self.dtype}/{self.mixed_precision}"
        model_key = prefix_fingerprint(self.model, self.lmap, self.boundary, compute)
        data_key = data_fingerprint(sources, columns)
        key = f"{model_key}-{data_key}"
        if key == self.key:
            return starts
        if self.key is not None:
            logger.info("hf_wb prefix cache: weights, boundary or data changed; rebuilding")
        if self.cache_dir:
            self._build_on_disk(key, total, sources, collate, batch_size, device, progress)
            return starts
        if lazy and not self.cache_dir:
            probe = [{k: v for k, v in row.items() if k in _MODEL_INPUTS} for row in _head(sources[0], batch_size)]
            if probe:  # the collator must pad on the right (checked now, not in the middle of training)
                batch = collate(probe)
                _check_right_padding(batch.get("attention_mask", torch.ones_like(batch["input_ids"])))
            self.storage, self.offsets, self._rows = None, None, [None] * total
            self.num_examples, self.key = total, key
            self.stats["built"] += 1
            return starts
        self._rows = None
        started = time.perf_counter()
        self._compute(sources, collate, batch_size, device, total, progress)
        self.stats["built"] += 1
        self.stats["build_seconds"] += time.perf_counter() - started
        self.key = key
        return starts

    def _build_on_disk(self, key, total, sources, collate, batch_size, device, progress) -> None:
        from filelock import FileLock

        if self._load(key, total, warn=False):
            return
        os.makedirs(self.cache_dir, exist_ok=True)
        with FileLock(os.path.join(self.cache_dir, f"{key}.lock")):
            if self._load(key, total, warn=True):  # another process built it while this one waited
                return
            self._rows = None
            started = time.perf_counter()
            self._compute(sources, collate, batch_size, device, total, progress)
            self.stats["built"] += 1
            self.stats["build_seconds"] += time.perf_counter() - started
            self._save(key)
        if not self._load(key, total, warn=True):  # serve from the memory map from now on
            raise RuntimeError(f"hf_wb prefix cache: the cache just written to {self._paths(key)[0]} does not verify.")
        self.stats["loaded"] -= 1  # that load was of this process's own build

    def _compute(self, sources, collate, batch_size, device, total, progress) -> None:
        from tqdm.auto import tqdm

        hidden = getattr(self.model.config, "hidden_size", None) or getattr(self.model.config, "d_model", None)
        lengths: list[int] = []
        chunks: list[torch.Tensor] = []
        boundary_block = self.model.get_submodule(self.boundary.block_names[self.boundary.frozen_blocks - 1])
        captured: dict[str, Any] = {}

        def grab(module: nn.Module, args: Any, output: Any) -> None:
            captured["out"] = output
            raise _StopForward

        handle = boundary_block.register_forward_hook(grab)
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=total, desc="hf_wb: caching the frozen prefix", unit="ex", disable=not progress)
        rows = [{k: v for k, v in r.items() if k in _MODEL_INPUTS} for src in sources for r in _rows(src)]
        # Batches of similar length (longest first, so a memory problem shows at once): little padding, so this
        # pass costs less than the frozen blocks' share of one training epoch. Rows are stored in their own order.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
        states_of: list[torch.Tensor | None] = [None] * len(rows)
        try:
            with torch.no_grad():
                for i in range(0, len(order), batch_size):
                    part = order[i : i + batch_size]
                    collated = collate([rows[j] for j in part])
                    batch = {k: v.to(device) for k, v in collated.items() if k in _MODEL_INPUTS}
                    mask = batch.get("attention_mask")
                    if mask is None:
                        mask = torch.ones_like(batch["input_ids"])
                    _check_right_padding(mask)
                    try:
                        self.model(**batch)
                    except _StopForward:
                        pass
                    out = captured.pop("out")
                    self._tuple_len = len(out) if isinstance(out, tuple) else 0
                    states = out[0] if isinstance(out, tuple) else out
                    for j, row_states, row_mask in zip(part, states, mask, strict=True):
                        states_of[j] = row_states[: int(row_mask.sum())].to("cpu", _DTYPES[self.dtype])
                    bar.update(len(part))
            lengths = [s.shape[0] for s in states_of]
            chunks = list(states_of)
        finally:
            handle.remove()
            bar.close()
            self.model.train(was_training)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.storage = torch.cat(chunks) if chunks else torch.zeros(0, hidden or 0, dtype=_DTYPES[self.dtype])
        self.num_examples = len(lengths)
        logger.info(
            "hf_wb prefix cache: %d examples, %d tokens, %.1f MiB (%s)",
            self.num_examples,
            int(self.offsets[-1]),
            self.nbytes / 2**20,
            self.dtype,
        )

    def _paths(self, key: str) -> tuple[str, str, str]:
        folder = os.path.join(self.cache_dir, key)
        return folder, os.path.join(folder, "states.npy"), os.path.join(folder, "meta.json")

    def _save(self, key: str) -> None:
        """Write the cache into a temporary folder, then rename it into place (never rewriting a file in place)."""
        folder = self._paths(key)[0]
        tmp = os.path.join(self.cache_dir, f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            array = self.storage.view(torch.int16) if self.dtype == "bfloat16" else self.storage
            files = {}
            for name, value in (("states.npy", array.numpy()), ("offsets.npy", self.offsets)):
                path = os.path.join(tmp, name)
                with open(path, "wb") as f:
                    np.save(f, value)
                    f.flush()
                    os.fsync(f.fileno())
                files[name] = {"bytes": os.path.getsize(path), "xxh3_128": _file_digest(path)[0]}
            meta = {
                "format": FORMAT,
                "key": key,
                "dtype": self.dtype,
                "examples": self.num_examples,
                "tokens": int(self.offsets[-1]),
                "hidden_size": int(self.storage.shape[-1]) if self.storage.dim() == 2 else 0,
                "tuple_len": self._tuple_len,
                "model": type(self.model).__name__,
                "name_or_path": str(getattr(getattr(self.model, "config", None), "_name_or_path", "")),
                "frozen_blocks": self.boundary.frozen_blocks,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": files,
            }
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if os.path.lexists(folder):  # a corrupt or foreign folder under this key: move it aside, never overwrite
                old = os.path.join(self.cache_dir, f"{_OLD_PREFIX}{key}-{uuid.uuid4().hex[:8]}")
                os.rename(folder, old)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:  # a run that has its files memory-mapped keeps them (the inodes live until unmapped)
            shutil.rmtree(old, ignore_errors=True)

    def _load(self, key: str, total: int, warn: bool = True) -> bool:
        """Memory-map the cache of ``key`` if it is there and verifies; False (with a warning if ``warn``) if not."""
        folder, states_path, meta_path = self._paths(key)
        if not os.path.isdir(folder):
            return False
        started = time.perf_counter()
        try:
            storage, offsets, info = _open_verified(folder, key, total, self.dtype)
        except _Corrupt as exc:
            if warn:
                logger.warning("hf_wb prefix cache: %s is not usable (%s); rebuilding it.", folder, exc)
            return False
        self.stats["verify_seconds"] += time.perf_counter() - started
        self.storage = storage.view(torch.bfloat16) if self.dtype == "bfloat16" else storage
        self.offsets = offsets
        self.num_examples = total
        self._tuple_len = int(info.get("tuple_len", 0))
        self._rows = None
        self.key = key
        self.stats["loaded"] += 1
        logger.info("hf_wb prefix cache: reusing %s (checksums verified)", folder)
        return True

    # ----- serving ---------------------------------------------------------------------------------------------
    def ready(self, indices: torch.Tensor) -> bool:
        """Whether every row of the batch is in the cache (always, once built; in lazy mode, once recorded)."""
        if self._rows is None:
            return self.storage is not None
        return all(self._rows[i] is not None for i in indices.tolist())

    def record(self, indices: torch.Tensor, attention_mask: torch.Tensor, output: Any) -> None:
        """Lazy mode: keep the boundary block's output for the batch's rows (unpadded, in the storage dtype)."""
        self._tuple_len = len(output) if isinstance(output, tuple) else 0
        states = output[0] if isinstance(output, tuple) else output
        for row, i in enumerate(indices.tolist()):
            n = int(attention_mask[row].sum())
            self._rows[i] = states[row, :n].detach().to("cpu", _DTYPES[self.dtype]).clone()

    def _row(self, i: int) -> torch.Tensor:
        if self._rows is not None:
            return self._rows[i]
        return self.storage[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def gather(self, indices: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """States for a batch: rows ``indices``, right-padded (zeros) to the mask's length."""
        batch, length = attention_mask.shape
        self.stats["served_batches"] += 1
        rows = [self._row(i) for i in indices.tolist()]
        out = torch.zeros(batch, length, rows[0].shape[-1], dtype=dtype)
        for row, (i, states) in enumerate(zip(indices.tolist(), rows, strict=True)):
            n = states.shape[0]
            if n != int(attention_mask[row].sum()):
                raise RuntimeError(
                    f"hf_wb prefix cache: example {i} has {int(attention_mask[row].sum())} tokens in this batch but "
                    f"{n} in the cache: the data changed after the cache was built."
                )
            out[row, :n] = states.to(dtype)
        return out.to(attention_mask.device)

    @contextlib.contextmanager
    def batch(self, indices: torch.Tensor | None, attention_mask: torch.Tensor | None) -> Iterator[None]:
        """Serve ``indices`` from the cache for the forward passes inside the block (None: run the full model)."""
        previous = self._batch
        if indices is not None and attention_mask is None:
            raise RuntimeError("hf_wb prefix cache needs the batch's attention_mask.")
        self._batch = None if indices is None else (indices, attention_mask)
        try:
            yield
        finally:
            self._batch = previous

    def install(self) -> None:
        """Patch the frozen blocks' forward: pass-through below the boundary, cached states at the boundary."""
        if self._installed:
            return
        names = self.boundary.block_names[: self.boundary.frozen_blocks]
        for position, name in enumerate(names):
            block = self.model.get_submodule(name)
            original = block.forward
            is_boundary = position == len(names) - 1

            def forward(self_block, *args, _orig=original, _last=is_boundary, **kwargs):
                if self._batch is None:
                    return _orig(*args, **kwargs)
                indices, mask = self._batch
                if not self.ready(indices):  # lazy mode, rows not seen yet: compute, and record at the boundary
                    output = _orig(*args, **kwargs)
                    if _last:
                        self.record(indices, mask, output)
                    return output
                hidden = args[0] if args else kwargs.get("hidden_states")
                if _last:
                    hidden = self.gather(indices, mask, hidden.dtype)
                return (hidden,) + (None,) * (self._tuple_len - 1) if self._tuple_len else hidden

            object.__setattr__(block, "forward", types.MethodType(forward, block))
            self._installed.append(block)

    def uninstall(self) -> None:
        for block in self._installed:
            block.__dict__.pop("forward", None)
        self._installed = []

    @property
    def installed(self) -> bool:
        return bool(self._installed)

    # ----- reuse across runs (hyperparameter search) -------------------------------------------------------------
    def rebind(self, model: nn.Module, lmap: LayerMap) -> None:
        """Serve a new instance of the same model (a search trial's fresh ``model_init()``) from this cache.

        The stored states stay; the next :meth:`build` recomputes the key from the new model's frozen weights and the
        data, keeps them when the key is unchanged and rebuilds otherwise, so a changed prefix is never served.
        """
        self.uninstall()
        self.model = unwrap_model(model)
        self.lmap = lmap
        self.boundary = cache_boundary(self.model, lmap)


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _head(source: Any, n: int) -> list[dict[str, Any]]:
    return [source[i] for i in range(min(n, len(source)))]


def _rows(source: Any) -> Iterator[dict[str, Any]]:
    for i in range(len(source)):
        yield source[i]


def _check_right_padding(mask: torch.Tensor) -> None:
    # right padding: every row is ones then zeros, i.e. the mask never rises again after a zero
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise CacheUnsupported(
            "The frozen-prefix cache needs right padding (tokenizer.padding_side='right'): with left padding the "
            "positions of an example's tokens depend on the batch it lands in."
        )


# ----- files on disk -------------------------------------------------------------------------------------------
class _Corrupt(Exception):
    """A cache folder that must not be used: why."""


def _file_digest(path: str, f: Any = None) -> tuple[str, int]:
    """xxh3-128 of a file's bytes and its size (read in 16 MiB chunks; ``f``: an open binary file to read instead)."""
    import xxhash

    h = xxhash.xxh3_128()
    size = 0
    buffer = bytearray(16 * 2**20)
    view = memoryview(buffer)
    with contextlib.ExitStack() as stack:
        if f is None:
            f = stack.enter_context(open(path, "rb"))
        f.seek(0)
        while n := f.readinto(buffer):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


def _read_meta(folder: str) -> dict[str, Any]:
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise _Corrupt("meta.json is missing") from None
    except (OSError, ValueError) as exc:
        raise _Corrupt(f"meta.json is unreadable: {exc}") from None
    if not isinstance(info, dict):
        raise _Corrupt("meta.json does not hold an object")
    return info


def _open_verified(folder: str, key: str, total: int, dtype: str) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """Check a cache folder's meta data, sizes and checksums, and memory-map its states; :class:`_Corrupt` if not."""
    info = _read_meta(folder)
    if info.get("format") != FORMAT:
        raise _Corrupt(f"written in format {info.get('format')!r}, this hf_wb reads {FORMAT!r}")
    expected = {"key": key, "examples": total, "dtype": dtype}
    for name, value in expected.items():
        if info.get(name) != value:
            raise _Corrupt(f"meta.json records {name}={info.get(name)!r}, expected {value!r}")
    files = info.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES):
        raise _Corrupt("meta.json records no checksums")
    # offsets: small, read whole
    path = os.path.join(folder, "offsets.npy")
    try:
        with open(path, "rb") as f:
            digest, size = _file_digest(path, f)
            _check_file("offsets.npy", files["offsets.npy"], digest, size)
            f.seek(0)
            offsets = np.load(f)
    except OSError as exc:
        raise _Corrupt(f"offsets.npy is unreadable: {exc}") from None
    if offsets.shape != (total + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise _Corrupt("offsets.npy does not describe the examples")
    # states: verified, then memory-mapped from the same open file (a file renamed over it later is not seen)
    path = os.path.join(folder, "states.npy")
    try:
        with open(path, "rb") as f:
            digest, size = _file_digest(path, f)
            _check_file("states.npy", files["states.npy"], digest, size)
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise _Corrupt(f"states.npy has .npy format version {version}")
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, np_dtype = read_header(f)
            if np_dtype != np.dtype(_NP_STORAGE[dtype]) or fortran or len(shape) != 2 or shape[0] != offsets[-1]:
                raise _Corrupt(f"states.npy holds {np_dtype} {shape}, not the {dtype} states the offsets describe")
            array = np.memmap(f, dtype=np_dtype, mode="r", shape=shape, offset=f.tell()) if shape[0] else None
    except OSError as exc:
        raise _Corrupt(f"states.npy is unreadable: {exc}") from None
    except ValueError as exc:  # a header numpy cannot parse
        raise _Corrupt(f"states.npy is not a .npy file: {exc}") from None
    if array is None:  # no tokens at all: nothing to map
        return torch.from_numpy(np.zeros(shape, np_dtype)), offsets, info
    import warnings

    with warnings.catch_warnings():  # read-only by design: the cache is never written through this view
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(np.asarray(array))  # shares the memory map
    return tensor, offsets, info


def _check_file(name: str, recorded: Any, digest: str, size: int) -> None:
    if not isinstance(recorded, dict):
        raise _Corrupt(f"meta.json records no checksum for {name}")
    if recorded.get("bytes") != size:
        raise _Corrupt(f"{name} has {size} bytes, {recorded.get('bytes')} were written (truncated or overwritten)")
    if recorded.get("xxh3_128") != digest:
        raise _Corrupt(f"{name} does not match its checksum (the bytes changed on disk since it was written)")


def _is_cache_name(name: str) -> bool:
    parts = name.split("-")
    return len(parts) == 2 and all(len(p) == 16 and all(c in "0123456789abcdef" for c in p) for p in parts)


def list_cache_dir(cache_dir: str | os.PathLike, verify: bool = False) -> list[dict[str, Any]]:
    """The prefix caches in ``cache_dir``: one dict per folder (``key``, ``status``, ``bytes``, and the meta data:
    ``model``, ``examples``, ``tokens``, ``dtype``, ``frozen_blocks``, ``created``).

    ``status`` is ``ok`` (meta data and file sizes match; with ``verify=True`` the checksums too), ``corrupt: why``
    (the next run rebuilds it), or ``incomplete`` (a temporary folder a killed build left behind).
    """
    cache_dir = str(cache_dir)
    out = []
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"{cache_dir} is not a folder.")
    for name in sorted(os.listdir(cache_dir)):
        folder = os.path.join(cache_dir, name)
        if not os.path.isdir(folder):
            continue
        size = sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
        if name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            out.append({"key": name, "status": "incomplete", "bytes": size, "path": folder})
            continue
        if not _is_cache_name(name):
            continue
        entry: dict[str, Any] = {"key": name, "bytes": size, "path": folder}
        try:
            info = _read_meta(folder)
            entry.update(
                {k: info.get(k) for k in ("model", "examples", "tokens", "dtype", "frozen_blocks", "created")}
            )
            entry["name_or_path"] = info.get("name_or_path")
            if verify:
                _open_verified(folder, name, int(info.get("examples", -1)), str(info.get("dtype")))
            else:
                files = info.get("files") or {}
                if info.get("format") != FORMAT or set(files) != set(_FILES):
                    raise _Corrupt("not written by this hf_wb version")
                for file, recorded in files.items():
                    path = os.path.join(folder, file)
                    if not os.path.isfile(path) or os.path.getsize(path) != recorded.get("bytes"):
                        raise _Corrupt(f"{file} is missing or has the wrong size")
            entry["status"] = "ok"
        except _Corrupt as exc:
            entry["status"] = f"corrupt: {exc}"
        out.append(entry)
    return out


def clear_cache_dir(cache_dir: str | os.PathLike, keys: Iterable[str] | None = None) -> list[str]:
    """Remove prefix cache folders from ``cache_dir`` (all of them, or those whose key is in ``keys``); returns the
    removed paths. Only folders hf_wb writes are touched (``<16 hex>-<16 hex>``, temporary ``.tmp-`` / ``.old-``
    folders and their ``.lock`` files); a cache that a process is building (its lock is held) is skipped with a
    warning. A run that has a removed cache memory-mapped keeps reading it (the files live until it unmaps them).
    """
    from filelock import FileLock, Timeout

    wanted = set(keys) if keys is not None else None
    removed = []
    for entry in list_cache_dir(cache_dir):
        name = entry["key"]
        base = name if _is_cache_name(name) else None
        if wanted is not None and name not in wanted:
            continue
        lock_path = os.path.join(str(cache_dir), f"{base}.lock") if base else None
        if base:
            lock = FileLock(lock_path)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                logger.warning("hf_wb prefix cache: %s is being built by another process; not removed.", name)
                continue
            try:
                shutil.rmtree(entry["path"])
            finally:
                lock.release()
            with contextlib.suppress(OSError):
                os.remove(lock_path)
        else:
            shutil.rmtree(entry["path"], ignore_errors=True)
        removed.append(entry["path"])
    if wanted is not None:
        missing = wanted - {os.path.basename(p) for p in removed}
        if missing:
            logger.warning("hf_wb prefix cache: no cache %s in %s", sorted(missing), cache_dir)
    return removed
