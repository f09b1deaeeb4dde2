"""The ``mpo`` command: one sub-command per stage, each on a recipe plus ``key=value`` overrides.

::

    mpo run      RECIPE [key=value ...]   every stage in order (generate, score, select, train, export)
    mpo generate RECIPE [key=value ...]   and likewise score | select | train | eval | export
    mpo select --scores scores.parquet --out pairs.parquet [select.key=value ...]   no recipe needed
    mpo recipe   RECIPE [key=value ...]   print the resolved recipe (what a run would use)
    mpo recipe --help-keys                every recipe key with its type, default and help (--schema: JSON)
    mpo export-dataset RECIPE [--candidates] [--out DIR] [--push-to-hub REPO]   the pairs as a datasets dataset
    mpo report   RUN_DIR                  the run's pictures: curves, before/after, selected pairs

``-v/--verbose`` and ``-q/--quiet`` (before or after the command) set the log level; ``--version``.

One process (CPU or one GPU)::

    mpo run recipes/tiny/sdxl.yaml

Many GPUs, one or several nodes (the recipe's header names its launch config)::

    accelerate launch --config_file launch/deepspeed_zero2.yaml -m mpo.cli run recipes/cogvideox-2b/mpo.yaml

Exit status: 0 when the stage finished; 2 for bad input (command line, recipe, files, checklist, run
directory), with a message naming the key, value and file and no traceback; 1 when a run cannot go
on (e.g. a non-finite loss; the last good checkpoint is kept); any other error propagates with its
traceback (non-zero), so that a scheduler sees the job fail. Stages are imported only when asked for, so that ``mpo recipe``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mpo.config import load_recipe, load_select_config, to_yaml

# command -> (module, function); each function takes the loaded recipe.
STAGES: dict[str, tuple[str, str]] = {
    "run": ("mpo.run", "run_all"),
    "generate": ("mpo.generate", "generate_stage"),
    "score": ("mpo.score", "score_stage"),
    "select": ("mpo.select", "select_stage"),
    "train": ("mpo.train", "train_stage"),
    "eval": ("mpo.evaluate", "eval_stage"),
    "export": ("mpo.export", "export_stage"),
}
HELP = {
    "run": "all stages in order on one run directory",
    "generate": "N candidates per prompt: latents and prompt embeddings, sharded and resumable",
    "score": "score the candidates with the recipe's reward",
    "select": "preference pairs from the scores (or from any scores file with --scores/--out)",
    "train": "Diffusion-DPO on the selected pairs, with eval curves and checkpoints",
    "eval": "reward per dimension on the held-out prompts",
    "export": "the aligned checkpoint as a diffusers folder / LoRA weights",
}
OVERRIDES_HELP = "key=value recipe overrides, e.g. train.max_steps=10 select.level=sub_dimension"


def _stage(command: str) -> Callable[..., Any]:
    module, function = STAGES[command]
    return getattr(importlib.import_module(module), function)


def _quiet_libraries() -> None:
    """The stages draw their own progress bars and summaries; the libraries' per-load bars
    ("Loading pipeline components", "Loading weights") would bury them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _run_stage(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_libraries()
    _stage(args.command)(recipe)


def _print_recipe(args: argparse.Namespace) -> None:
    if args.help_keys or args.schema:
        from mpo.recipe_help import format_keys, keys_as_json, recipe_keys

        sys.stdout.write(keys_as_json(recipe_keys()) if args.schema else format_keys(recipe_keys()))
        return
    if args.recipe is None:
        args.parser.error("give a RECIPE (or --help-keys / --schema for the list of keys)")
    sys.stdout.write(to_yaml(load_recipe(args.recipe, args.overrides)))


def _export_dataset(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    _quiet_libraries()
    from mpo.export_dataset import export_dataset

    export_dataset(recipe, args.out, args.candidates, args.push_to_hub, private=not args.public)


def _report(args: argparse.Namespace) -> None:
    from mpo.report import report_command

    report_command(args.run_dir)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mpo-trainer")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def _verbosity_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """-v / -q on the main parser and on every command (``mpo -v train R`` = ``mpo train R -v``)."""
    group = parser.add_mutually_exclusive_group()
    default = argparse.SUPPRESS if suppress else "normal"
    group.add_argument(
        "-v", "--verbose", dest="verbosity", action="store_const", const="verbose", default=default,
        help="debug messages of mpo and reward, info of the libraries",
    )
    group.add_argument(
        "-q", "--quiet", dest="verbosity", action="store_const", const="quiet", default=default,
        help="warnings and errors only; no progress bars",
    )


def _select(args: argparse.Namespace) -> None:
    """``select RECIPE [overrides]`` or ``select --scores FILE --out FILE [select.* overrides]``."""
    if args.scores is None:
        if args.out is not None:
            args.parser.error("--out goes with --scores (with a recipe, pairs go to its run directory)")
        if not args.items:
            args.parser.error("give a RECIPE, or --scores FILE --out FILE")
        args.recipe, args.overrides = args.items[0], args.items[1:]
        return _run_stage(args)
    if args.out is None:
        args.parser.error("--scores needs --out (where to write the pairs parquet)")
    not_overrides = [item for item in args.items if "=" not in item]
    if not_overrides:
        args.parser.error(f"with --scores only key=value overrides follow, not {not_overrides}")
    cfg = load_select_config(args.items)
    importlib.import_module("mpo.select").select_from_file(args.scores, args.out, cfg)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpo",
        description="Align diffusion models with fine-grained VisionReward preferences (MPO + Diffusion-DPO).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _verbosity_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _verbosity_flags(common, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in STAGES:
        sub = commands.add_parser(command, help=HELP[command], description=HELP[command], parents=[common])
        if command == "select":
            sub.add_argument("items", nargs="*", metavar="RECIPE [key=value ...]", help=OVERRIDES_HELP)
            sub.add_argument("--scores", help="a scores.parquet to select from, without a recipe")
            sub.add_argument("--out", help="the pairs parquet to write (with --scores)")
            sub.set_defaults(handler=_select, parser=sub)
        else:
            sub.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/sdxl.yaml")
            sub.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
            sub.set_defaults(handler=_run_stage)
    sub = commands.add_parser(
        "recipe", help="print the resolved recipe", description="print the resolved recipe", parents=[common]
    )
    sub.add_argument("recipe", nargs="?", help="recipe YAML")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    sub.add_argument(
        "--help-keys", action="store_true", help="list every recipe key: type, default and help text"
    )
    sub.add_argument("--schema", action="store_true", help="the same list as JSON")
    sub.set_defaults(handler=_print_recipe, parser=sub)
    text = "the selected pairs (and optionally every scored candidate) as a Hugging Face datasets dataset"
    sub = commands.add_parser("export-dataset", help=text, description=text, parents=[common])
    sub.add_argument("recipe", help="recipe YAML of the run")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    sub.add_argument("--candidates", action="store_true", help="also a 'candidates' split: every scored sample")
    sub.add_argument("--out", help="folder to save_to_disk into (default: <output_dir>/dataset)")
    sub.add_argument("--push-to-hub", metavar="REPO", help="also push it to this hub dataset repo")
    sub.add_argument("--public", action="store_true", help="create the hub dataset repo public")
    sub.set_defaults(handler=_export_dataset)
    text = "write the run's pictures: held-out curves, before/after per eval prompt, selected pairs"
    sub = commands.add_parser("report", help=text, description=text, parents=[common])
    sub.add_argument("run_dir", help="a run directory (holds recipe.yaml)")
    sub.set_defaults(handler=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mpo`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    from mpo.logs import setup_logging

    setup_logging(args.verbosity)
    try:
        args.handler(args)
    except Exception as err:
        status = _exit_status(err)
        if status is None:
            raise
        print(f"mpo {args.command}: {err}", file=sys.stderr)
        return status
    return 0


def _exit_status(err: Exception) -> int | None:
    """The project's own errors end the command with their message instead of a traceback: bad input
    (recipe, files, checklists, run directory; the ValueError subclasses) exits 2, a run that cannot go
    on (e.g. a non-finite loss; the last good checkpoint is kept) exits 1. Anything else propagates."""
    if type(err).__module__.split(".")[0] not in ("mpo", "reward"):
        return None
    if isinstance(err, ValueError):
        return 2
    if isinstance(err, RuntimeError):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
