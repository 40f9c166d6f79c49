"""The recipe through the Trainer under every engine, where GPUs exist: a pass/fail table.

    python benchmarks/engines_gpu.py            # every engine this machine can run; writes results/engines_gpu.md
    python benchmarks/engines_gpu.py --engines fsdp1,zero3 --output results/engines_gpu.md

Each engine trains a tiny BERT (4 blocks, hidden 64, built from a config: no download) for 4 steps with
``WBTrainer`` and ``WBConfig(top_layers=2, freeze_layers=1)`` (monitoring off: it is refused under sharded
engines), launched with ``torchrun --standalone --nproc_per_node <GPUs>``. It checks, on the Trainer's own path:

- ``engine``: the engine ``WBTrainer`` detected (``trainer.wb_engine``) is the one configured;
- ``groups``: the optimizer's groups carry exactly the names, rates, weight decays and parameter names that
  ``build_param_groups`` gives for the unwrapped model (constant schedule, so the rates stay put);
- ``frozen``: every frozen parameter is bit-identical after training; ``trained``: every trained matrix moved;
- ``ranks``: the full parameters (gathered from the shards) are identical on every rank.

Engines: ``fsdp1`` (FSDP1, ``use_orig_params=True``, every BertLayer a unit), ``fsdp2`` (``fully_shard``),
``zero1`` / ``zero2`` / ``zero3`` (DeepSpeed, no optimizer / scheduler block), ``compile`` (one process,
``torch_compile=True`` with inductor); all bf16. Without GPUs accelerate runs FSDP as DDP, so the FSDP rows are
skipped and the others run on CPU (gloo, fp32); tests/test_engines.py covers the CPU side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ["fsdp1", "fsdp2", "zero1", "zero2", "zero3", "compile"]
CHECKS = ["engine", "groups", "frozen", "trained", "ranks"]
EXPECTED_ENGINE = {
    "fsdp1": "FSDP1",
    "fsdp2": "FSDP2",
    "zero1": "DeepSpeed ZeRO-1",
    "zero2": "DeepSpeed ZeRO-2",
    "zero3": "DeepSpeed ZeRO-3",
    "compile": "single",
}


# ----- worker (one process of a torchrun launch) --------------------------------------------------------------------
def worker(engine: str, out: Path) -> None:
    import torch
    import torch.distributed as dist
    import transformers

    from hf_wb import WBConfig, WBTrainer, build_param_groups
    from hf_wb.engines import canonical_name

    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (128, 16), generator=g)
    data = [{"input_ids": i, "labels": int(i[0] > 50)} for i in ids]
    recipe = WBConfig(top_layers=2, freeze_layers=1, histogram_steps=0, diagnostics=False, bias_prior=False)
    kw: dict = dict(
        output_dir=str(out / f"run_{engine}"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        bf16=gpu,
    )
    if not gpu:
        kw["ddp_backend"] = "gloo"
    if engine == "fsdp1":
        kw.update(fsdp="full_shard", fsdp_config={"version": 1, "use_orig_params": True})
        kw["fsdp_config"]["transformer_layer_cls_to_wrap"] = ["BertLayer"]
    elif engine == "fsdp2":
        kw.update(fsdp="full_shard", fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
    elif engine.startswith("zero"):
        kw["deepspeed"] = {
            "zero_optimization": {"stage": int(engine[-1])},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
        }
    elif engine == "compile":
        kw.update(torch_compile=True)
    trainer = WBTrainer(model=model, args=transformers.TrainingArguments(**kw), train_dataset=data, wb_config=recipe)
    expected = build_param_groups(model, recipe, 1e-3, 0.01, lmap=trainer.wb_layer_map)
    before = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    trainer.train()

    def summary(groups):
        return [(x["name"], x["lr"], x["weight_decay"], [canonical_name(n) for n in x["param_names"]]) for x in groups]

    wrapped = trainer.model_wrapped
    if engine == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, writeback=False):
            after = {canonical_name(n): p.detach().float().cpu().clone() for n, p in wrapped.named_parameters()}
    elif engine == "fsdp2":
        full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in trainer.model.named_parameters()}
        after = {canonical_name(n): p.detach().float().cpu().clone() for n, p in full.items()}
    elif engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            after = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    else:
        after = {canonical_name(n): p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    trained = [n for n in before if n not in frozen and before[n].dim() > 1]
    result = {
        "engine": trainer.wb_engine.name == EXPECTED_ENGINE[engine],
        "groups": summary(trainer.optimizer.param_groups) == summary(expected),
        "frozen": bool(frozen) and all(torch.equal(after[n], before[n]) for n in frozen),
        "trained": bool(trained) and all(not torch.equal(after[n], before[n]) for n in trained),
        "detected": trainer.wb_engine.name,
        "world_size": trainer.wb_engine.world_size,
    }
    if dist.is_available() and dist.is_initialized():
        flat = torch.cat([after[k].flatten() for k in sorted(after)]).to(trainer.args.device)
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        result["ranks"] = all(torch.equal(gathered[0], x) for x in gathered[1:])
        rank = dist.get_rank()
    else:
        result["ranks"], rank = True, 0
    if rank == 0:
        (out / f"{engine}.json").write_text(json.dumps(result))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----- driver --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    parser.add_argument("--output", default=str(REPO / "results" / "engines_gpu.md"), help="the table (Markdown)")
    parser.add_argument("--nproc", type=int, default=0, help="processes per launch; 0 = number of GPUs, else 2")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per engine")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return 0

    import torch

    gpus = torch.cuda.device_count()
    nproc = args.nproc or gpus or 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines.split(","):
            if engine not in ENGINES:
                parser.error(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
            if engine.startswith("fsdp") and not gpus:
                rows.append((engine, "skipped: no GPU (accelerate would run FSDP as DDP)", {}))
                continue
            n = 1 if engine == "compile" else nproc
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
            cmd += [__file__, "--worker", engine, tmp]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append((engine, f"timed out after {args.timeout} s", {}))
                continue
            report = Path(tmp) / f"{engine}.json"
            if proc.returncode != 0 or not report.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                rows.append((engine, "error: " + " | ".join(tail)[-300:], {}))
                continue
            result = json.loads(report.read_text())
            ok = all(result[c] for c in CHECKS)
            rows.append(
                (engine, f"{'PASS' if ok else 'FAIL'} ({result['detected']}, {result['world_size']} proc)", result)
            )

    device = torch.cuda.get_device_name(0) if gpus else "CPU (no GPU)"
    lines = [
        f"# hf_wb recipe under each engine (`python benchmarks/engines_gpu.py`), {device}, torch {torch.__version__}",
        "",
        "| engine | result | " + " | ".join(CHECKS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in CHECKS) + " |",
    ]
    for engine, status, result in rows:
        cells = [("ok" if result[c] else "FAIL") if c in result else "-" for c in CHECKS]
        lines.append(f"| {engine} | {status} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(table, encoding="utf-8")
    return 0 if all(s.startswith(("PASS", "skipped")) for _, s, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
