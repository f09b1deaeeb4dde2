"""The ``mpo`` command: one sub-command per stage, each on a recipe plus ``key=value`` overrides.

::

    mpo run      RECIPE [key=value ...]   every stage in order (generate, score, select, train, export)
    mpo generate RECIPE [key=value ...]   and likewise score | select | train | eval | export
    mpo select --scores scores.parquet --out pairs.parquet [select.key=value ...]   no recipe needed
    mpo recipe   RECIPE [key=value ...]   print the resolved recipe (what a run would use)
    mpo recipe --help-keys                every recipe key with its type, default and help (--schema: JSON)
    mpo export-dataset RECIPE [--candidates] [--out DIR] [--push-to-hub REPO]   the pairs as a datasets dataset
    mpo report   RUN_DIR                  the run's pictures: curves, before/after, selected pairs
    mpo calibrate RECIPE [key=value ...] [--setting K=V,...]   cheaper samplers vs the reference's pairs

``-v/--verbose`` and ``-q/--quiet`` (before or after the command) set the log level; ``--version``.

One process (CPU or one GPU)::

    mpo run recipes/tiny/sdxl.yaml

Many GPUs, one or several nodes (the recipe's header names its launch config)::

    accelerate launch --config_file launch/deepspeed_zero2.yaml -m mpo.cli run recipes/cogvideox-2b/mpo.yaml

Exit status (:mod:`mpo.errors`): 0 when the stage finished; 2 for bad input (command line, recipe,
files, checklist, run directory) and for a file system that refuses (disk full, read-only), with one
line naming the key, value or file and no traceback; 1 when a run cannot go on (e.g. a non-finite
loss; the last good checkpoint is kept); 143 / 130 when SIGTERM / SIGINT stopped it (training writes
a checkpoint first and says where it resumes); any other error propagates with its traceback
(non-zero), so that a scheduler sees the job fail. Under ``accelerate launch`` every process ends
with the same status and message (:mod:`mpo.distributed`).

A command owns its session: it builds the Accelerator, holds the run directory's lock
(:mod:`mpo.lock`: a second command on the same output_dir refuses), runs the stage(s) and tears the
process group down once at the end. ``--force`` redoes a finished stage made with other settings
(and, through the content hashes each later stage checks, everything after it) instead of refusing.
Stages are imported only when asked for, so that ``mpo recipe`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from mpo.config import load_recipe, load_select_config, to_yaml
from mpo.errors import errors_reach_every_rank, exit_status, message, print_line

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
FORCE_HELP = (
    "where a finished stage was made with other settings, redo it and every stage after it "
    "(default: refuse, naming the key)"
)
# The commands that train (or may) get the training Accelerator: mixed precision is fixed once set.
TRAINING_COMMANDS = ("run", "train")


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


# Stages that an iterative recipe runs per round, inside ``mpo run`` only (eval and export read the
# training state at the run's root, which rounds share).
ROUND_STAGES = ("generate", "score", "select", "train")


def _run_stage(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.command in ROUND_STAGES and recipe.rounds.count:
        from mpo.config import RecipeError

        raise RecipeError(
            f"rounds.count={recipe.rounds.count}: a recipe with rounds runs its {args.command} stage in every "
            f"round, through `mpo run` (each round generates from the policy the previous one trained); "
            "`mpo eval` and `mpo export` work on it too"
        )
    _quiet_libraries()
    _locked_stage(args.command, recipe, bool(getattr(args, "force", False)))


@errors_reach_every_rank
def _locked_stage(command: str, recipe: Any, force: bool) -> Any:
    """Build the session, hold the run lock (main process), run the stage, end the session."""
    from mpo.distributed import end_session, make_accelerator, make_training_accelerator, wait_for_everyone
    from mpo.lock import run_lock

    build = make_training_accelerator if command in TRAINING_COMMANDS else make_accelerator
    acc = build(recipe)
    with run_lock(recipe.output_dir, main=acc.is_main_process):
        wait_for_everyone(acc)  # the lock is held, or its error stops every process here
        result = _stage(command)(recipe, acc, force=force)
        end_session(acc)
    return result


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
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const="verbose",
        default=default,
        help="debug messages of mpo and reward, info of the libraries",
    )
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const="quiet",
        default=default,
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


def _calibrate(args: argparse.Namespace) -> None:
    """``calibrate RECIPE [overrides] [--setting K=V,...]...``: the sampler table on a prompt subset."""
    from mpo.calibrate import DEFAULT_SETTINGS, run_calibrate

    if not 0 <= args.agreement <= 1:
        args.parser.error(f"--agreement={args.agreement}: must be in [0, 1]")
    if args.prompts < 1 or args.reference_steps < 1:
        args.parser.error("--prompts and --reference-steps must be >= 1")
    run_calibrate(
        args.recipe,
        args.overrides,
        args.setting or list(DEFAULT_SETTINGS),
        reference_steps=args.reference_steps,
        prompts=args.prompts,
        threshold=args.agreement,
        out=args.out,
    )


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
            sub.add_argument("--force", action="store_true", help=FORCE_HELP)
            sub.set_defaults(handler=_select, parser=sub)
        else:
            sub.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/sdxl.yaml")
            sub.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
            sub.add_argument("--force", action="store_true", help=FORCE_HELP)
            sub.set_defaults(handler=_run_stage)
    sub = commands.add_parser(
        "calibrate",
        help="which cheaper sampler keeps the reference sampler's pairs (on a prompt subset)",
        description="Run the reference sampler and each --setting on a few train prompts, score and "
        "select, print cost and pair agreement per setting and recommend the cheapest that agrees.",
        parents=[common],
    )
    sub.add_argument("recipe", help="recipe YAML")
    sub.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    sub.add_argument(
        "--setting",
        action="append",
        metavar="K=V[,K=V]",
        help="generate.* overrides of one candidate setting, e.g. scheduler=unipc,num_inference_steps=12 "
        "(repeat for more; default: DPM-Solver++ 2M and UniPC at 10 / 15 / 20 steps, default at 25)",
    )
    sub.add_argument("--reference-steps", type=int, default=50, help="steps of the reference sampler")
    sub.add_argument("--prompts", type=int, default=8, help="train prompts in the subset")
    sub.add_argument("--agreement", type=float, default=0.9, help="agreement the recommendation must reach")
    sub.add_argument("--out", help="also write the table as JSON here")
    sub.set_defaults(handler=_calibrate, parser=sub)
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
    sub.add_argument(
        "--candidates", action="store_true", help="also a 'candidates' split: every scored sample"
    )
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
    import signal

    from mpo.interrupt import raise_on_sigterm

    args = build_parser().parse_args(argv)
    from mpo.logs import setup_logging

    setup_logging(args.verbosity)
    previous = signal.getsignal(signal.SIGTERM)
    raise_on_sigterm()
    try:
        args.handler(args)
    except KeyboardInterrupt:
        _end_progress_bars()
        print_line(
            f"mpo {args.command}: interrupted (SIGINT); everything finished so far is kept: run the same "
            "command again to resume"
        )
        return _leave(130)
    except Exception as err:
        status = exit_status(err)
        if status is None:
            cause = _peer_failure(err)
            if cause is None:
                raise
            err, status = cause, cause.exit_status
        _end_progress_bars()
        print_line(f"mpo {args.command}: {message(err)}")
        return _leave(status)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _leave(status: int) -> int:
    """Under a launcher, a failed command ends its process here, with its status: its process group
    was not torn down (its peers may be gone), and tearing it down at interpreter exit can abort the
    process (SIGABRT) and hide the status. Output is flushed first; the stages' cleanup has run."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _end_progress_bars() -> None:
    """Close the bars a failed stage left open, so that its message starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _peer_failure(err: Exception) -> Any:
    """When a collective broke because another process died, the failure that process left behind
    (:func:`mpo.distributed.posted_failure`); None for anything else, which keeps its traceback."""
    import torch

    text = str(err)
    broken = isinstance(err, getattr(torch.distributed, "DistError", ())) or any(
        t in text for t in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )
    if not broken:
        return None
    from mpo.distributed import posted_failure

    return posted_failure()


if __name__ == "__main__":
    sys.exit(main())
