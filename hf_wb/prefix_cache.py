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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_wb.layers import EMBEDDINGS, LayerMap, unit_name, unwrap_model

__all__ = ["INDEX_COLUMN", "PrefixCache", "CacheUnsupported", "cache_boundary", "prefix_fingerprint"]

logger = logging.getLogger(__name__)

INDEX_COLUMN = "hf_wb_index"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NP_STORAGE = {"float32": np.float32, "bfloat16": np.int16, "float16": np.float16}  # bf16 bits stored as int16


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
    if getattr(model, "is_gradient_checkpointing", False) or getattr(model, "is_activation_checkpointing", False):
        raise CacheUnsupported("Activation checkpointing re-runs block forwards; turn it off to use the cache.")
    for name in stack.block_names[:k]:
        if any(m.training for m in model.get_submodule(name).modules()):
            raise CacheUnsupported(f"The frozen block {name} is in train mode (dropout would run): pin it to eval.")
    return _Boundary(label, k, stack.block_names)


def prefix_fingerprint(model: nn.Module, lmap: LayerMap, boundary: _Boundary, dtype: str) -> str:
    """Hash of everything the cached states depend on in the model: the frozen tensors, the boundary, the dtype."""
    model = unwrap_model(model)
    h = hashlib.sha256()
    h.update(json.dumps([type(model).__name__, boundary.stack, boundary.frozen_blocks, dtype]).encode())
    frozen_units = {unit_name(boundary.stack, EMBEDDINGS, None)} | {
        unit_name(boundary.stack, "block", i) for i in range(boundary.frozen_blocks)
    }
    named = dict(model.named_parameters())
    for name in lmap.params:
        if lmap.unit(name) in frozen_units:
            h.update(name.encode())
            h.update(named[name].detach().float().cpu().numpy().tobytes())
    for name, buf in model.named_buffers():  # position ids, token type ids
        if lmap.module_units.get(name.rsplit(".", 1)[0], (None, None, None))[1] == EMBEDDINGS:
            h.update(name.encode())
            h.update(buf.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def data_fingerprint(rows: Iterable[dict[str, Any]], columns: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for row in rows:
        for c in columns:
            if c in row:
                h.update(np.asarray(row[c]).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


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
        self.boundary = cache_boundary(self.model, lmap)
        self.key: str | None = None
        self.storage: torch.Tensor | None = None
        self.offsets: np.ndarray | None = None
        self.num_examples = 0
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._installed: list[nn.Module] = []
        self._tuple_len = 0
        self._rows: list[torch.Tensor | None] | None = None  # lazy mode: filled as the first epoch runs
        self.stats = {"built": 0, "build_seconds": 0.0, "served_batches": 0}

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
        offset (the index of its first row). Reuses a memory-mapped cache in ``cache_dir`` with the same key.

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
        model_key = prefix_fingerprint(self.model, self.lmap, self.boundary, self.dtype)
        data_key = data_fingerprint((row for src in sources for row in _rows(src)), columns)
        key = f"{model_key}-{data_key}"
        if key == self.key:
            return starts
        if self.cache_dir and self._load(key, total):
            logger.info("hf_wb prefix cache: reusing %s", os.path.join(self.cache_dir, key))
            return starts
        if self.key is not None:
            logger.info("hf_wb prefix cache: weights, boundary or data changed; rebuilding")
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
        if self.cache_dir:
            self._save(key)
        return starts

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
        bar = tqdm(total=total, desc="hf_wb: caching the frozen prefix", disable=not progress)
        try:
            with torch.no_grad():
                for src in sources:
                    rows = list(_rows(src))
                    for i in range(0, len(rows), batch_size):
                        feats = [{k: v for k, v in r.items() if k in _MODEL_INPUTS} for r in rows[i : i + batch_size]]
                        batch = {k: v.to(device) for k, v in collate(feats).items() if k in _MODEL_INPUTS}
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
                        for row_states, row_mask in zip(states, mask, strict=True):
                            n = int(row_mask.sum())
                            lengths.append(n)
                            chunks.append(row_states[:n].to("cpu", _DTYPES[self.dtype]))
                        bar.update(len(feats))
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
        folder, states, meta = self._paths(key)
        os.makedirs(folder, exist_ok=True)
        array = self.storage.view(torch.int16) if self.dtype == "bfloat16" else self.storage
        np.save(states, array.numpy())
        np.save(os.path.join(folder, "offsets.npy"), self.offsets)
        with open(meta, "w", encoding="utf-8") as f:
            json.dump(
                {"key": key, "dtype": self.dtype, "examples": self.num_examples, "tuple_len": self._tuple_len}, f
            )
        self._load(key, self.num_examples)  # serve from the memory map from now on

    def _load(self, key: str, total: int) -> bool:
        folder, states, meta = self._paths(key)
        if not os.path.isfile(meta):
            return False
        with open(meta, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("key") != key or info.get("examples") != total or info.get("dtype") != self.dtype:
            return False
        array = np.load(states, mmap_mode="r")
        with warnings.catch_warnings():  # read-only by design: the cache is never written through this view
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(np.asarray(array))  # shares the memory map
        self.storage = tensor.view(torch.bfloat16) if self.dtype == "bfloat16" else tensor
        self.offsets = np.load(os.path.join(folder, "offsets.npy"))
        self.num_examples = total
        self._tuple_len = int(info.get("tuple_len", 0))
        self.key = key
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
