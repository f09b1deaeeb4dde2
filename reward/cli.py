"""`reward`: score, fit and evaluate with a VisionReward checklist, independently of training.

    reward checklists
    reward score --checklist image-official --answers annotations.jsonl --out scores.parquet
    reward score --checklist image-full --backend vlm --model Qwen/Qwen2-VL-2B-Instruct \
                 --images imgs/*.png --prompts prompts.txt --out scores.parquet
    reward fit   --checklist image-full --pairs pairs.jsonl --out weights.json
    reward eval  --pairs pairs.jsonl --weights weights.json
    reward convert THUDM/VisionReward-Image          # SAT release -> transformers folder (reward cache)
    reward verify --model THUDM/VisionReward-Video --remote-python OLD_ENV/bin/python --videos v.mp4

With --model and no --backend, the backend follows the model: ``vlm``, which answers a CogVLM2
checkpoint (the official VisionReward releases) with the native ``cogvlm2`` backend.

Training the reward itself (paper section 3.2), on one process or under ``accelerate launch``:

    reward train   recipes/reward/tiny_qa.yaml [key=value ...]       learn from human yes / no answers
    reward distill recipes/reward/tiny_distill.yaml [key=value ...]  learn a teacher's p(yes)
    reward recipe  recipes/reward/tiny_qa.yaml [key=value ...]       print the resolved recipe
    reward eval-answers --checklist image-full --annotations held_out.jsonl --model runs/x/model --out r.json
    reward import-vrdb data/train-*.parquet --questions meta_qa_en.txt --out vrdb/annotations.jsonl

Outputs are parquet, JSONL or CSV by suffix, one row per sample: id, total, dim.<name>,
sub.<name>, q.<question id> (p(yes)), and the backend that answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from reward.checklist import ChecklistError, available_checklists, load_checklist, weights_path
from reward.errors import RewardInputError
from reward.media import MediaError

OUT_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def _write_rows(rows: list[dict[str, Any]], out: str | Path) -> None:
    """Atomic write (tmp + rename) of rows as parquet / JSONL / CSV by suffix."""
    import pandas as pd

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    frame = pd.DataFrame(rows)
    if out.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    elif out.suffix == ".csv":
        frame.to_csv(tmp, index=False)
    elif out.suffix in (".jsonl", ".json"):
        frame.to_json(tmp, orient="records", lines=True)
    else:
        raise ChecklistError(f"{out}: output must end in {', '.join(OUT_SUFFIXES)}")
    tmp.replace(out)


def _read_prompts(path: str | None, media: list[str]) -> list[str]:
    if not path:
        return [""] * len(media)
    p = Path(path)
    if not p.is_file():
        raise ChecklistError(f"{p}: no such prompts file (--prompts)")
    if p.suffix in (".json", ".jsonl"):
        from reward.answers import read_rows

        table: dict[str, str] = {}
        if p.suffix == ".json" and p.read_text().lstrip().startswith("{"):
            table = {str(k): str(v) for k, v in json.loads(p.read_text()).items()}
        else:
            for row in read_rows(p):
                table[str(row.get("path") or row.get("id"))] = str(row["prompt"])
        prompts = []
        for m in media:
            key = m if m in table else Path(m).name if Path(m).name in table else Path(m).stem
            if key not in table:
                raise ChecklistError(f"{p}: no prompt for {m} (keys are paths, file names or stems)")
            prompts.append(table[key])
        return prompts
    lines = [line.rstrip("\n") for line in p.read_text().splitlines() if line.strip()]
    if len(lines) != len(media):
        raise ChecklistError(
            f"{p}: {len(lines)} prompts for {len(media)} files (one prompt per line, in file order)"
        )
    return lines


def _check_out(out: str | Path) -> None:
    """Fail on an output name before any work is done, not after."""
    if Path(out).suffix not in OUT_SUFFIXES:
        raise ChecklistError(f"{out}: output must end in {', '.join(OUT_SUFFIXES)}")


def cmd_score(args: argparse.Namespace) -> int:
    _check_out(args.out)
    checklist = load_checklist(args.checklist, weights=args.weights)
    if args.answers:
        from reward.answers import answers_to_tensors, read_rows
        from reward.model import ChecklistScorer

        ids, p_yes, alignment = answers_to_tensors(checklist, read_rows(args.answers), str(args.answers))
        scores = ChecklistScorer(checklist)(p_yes, alignment, source=f"answers:{args.answers}")
        rows = [{"id": i, **r, "source": scores.source} for i, r in zip(ids, scores.to_rows())]
        _write_rows(rows, args.out)
        print(f"scored {len(rows)} rows with {checklist.describe()} -> {args.out}")
        return 0

    media = list(args.images or []) + list(args.videos or [])
    if not media:
        raise ChecklistError("give --answers FILE, or --images / --videos with --backend")
    from tqdm import tqdm

    from reward.backends import MODEL_BACKENDS, build_backend
    from reward.media import load_media
    from reward.visionreward import VisionReward

    prompts = _read_prompts(args.prompts, media)
    backend = args.backend or ("vlm" if args.model else "pixel-stats")
    if backend == "pixel-stats" and args.model:
        raise ChecklistError(
            f"--model {args.model} with --backend pixel-stats: pixel statistics use no model; drop "
            "--backend (the backend then follows the model) or drop --model"
        )
    kwargs: dict[str, Any] = {}
    if backend in MODEL_BACKENDS:
        kwargs = {
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "max_frames": args.max_frames,
            "device": args.device,
        }
    if args.alignment_model:  # VQAScore (CLIP-FlanT5) or a VLM's p(yes), for any backend
        kwargs.update(alignment_model_path=args.alignment_model, dtype=args.dtype, device=args.device)
        kwargs["batch_size"] = args.batch_size
    reward = VisionReward(checklist, build_backend(backend, model_path=args.model, **kwargs), args.batch_size)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    batch = []
    bar = tqdm(total=len(media), unit="sample", desc=f"reward score ({backend})")

    def flush() -> None:
        if batch:
            scores = reward.score(batch)
            rows.extend(
                {"id": s.id, "prompt": s.prompt, **r, "source": scores.source}
                for s, r in zip(batch, scores.to_rows())
            )
            bar.update(len(batch))
            batch.clear()

    for path, prompt in zip(media, prompts):
        try:
            batch.append(load_media(path, prompt))
        except MediaError as err:
            failed.append(str(err))
            print(f"skipped: {err}", file=sys.stderr)
            bar.update(1)
            continue
        if len(batch) == args.batch_size:
            flush()
    flush()
    bar.close()
    if not rows:
        raise ChecklistError(f"none of the {len(media)} files could be read")
    _write_rows(rows, args.out)
    print(f"scored {len(rows)} samples ({len(failed)} skipped) with {checklist.describe()} -> {args.out}")
    if rows and rows[0]["source"].startswith("pixel-stats"):
        print(
            "note: pixel-stats answers only what pixel statistics can judge; it is a demo, not a human-preference model"
        )
    return 0


def _pair_features(checklist, pairs_path: str):
    from reward.answers import read_pairs
    from reward.model import ChecklistScorer

    scorer = ChecklistScorer(checklist)
    p_a, al_a, p_b, al_b, labels = read_pairs(checklist, pairs_path)
    if not bool((labels != 0.5).any()):
        raise ChecklistError(
            f"{pairs_path}: all {len(labels)} pairs are ties (label 0.5); fitting and accuracy need pairs with a preference"
        )
    fa = scorer.features(p_a, al_a).nan_to_num(0.0)
    fb = scorer.features(p_b, al_b).nan_to_num(0.0)
    return scorer, (p_a, al_a, p_b, al_b), fa, fb, labels


def cmd_fit(args: argparse.Namespace) -> int:
    from reward.fit import fit_logistic, fit_masked_logistic
    from reward.metrics import preference_accuracy

    checklist = load_checklist(args.checklist)
    _, _, fa, fb, labels = _pair_features(checklist, args.pairs)
    delta = (fa - fb).numpy()
    y = labels.numpy()
    fitted = {"masked": fit_masked_logistic(delta, y), "logistic": fit_logistic(delta, y)}
    chosen = fitted[args.method]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from dataclasses import replace

    result = replace(checklist, weights=chosen.weights, intercept=0.0).weights_dict(
        method="masked-logistic (Algorithm 1)" if args.method == "masked" else "logistic"
    )
    if Path(args.checklist).suffix in (".yaml", ".yml"):  # so that `reward eval` finds it again
        result["checklist_path"] = str(Path(args.checklist).resolve())
    out.write_text(json.dumps(result, indent=2))
    for name, fit in fitted.items():
        score_a, score_b = fa.numpy() @ fit.weights, fb.numpy() @ fit.weights
        acc = preference_accuracy(score_a, score_b, y, ties="drop")
        negatives = int((fit.weights < 0).sum())
        zeros = int((fit.weights == 0).sum())
        print(
            f"{name:9s} train accuracy (ties dropped) {float(_first(acc)):.4f}  zero weights {zeros}  negative weights {negatives}"
        )
    print(f"wrote {args.method} weights for {checklist.name} ({len(chosen.weights)} features) -> {out}")
    return 0


def _first(value: Any) -> Any:
    if isinstance(value, tuple):
        return value[0]
    return getattr(value, "accuracy", value)


def cmd_eval(args: argparse.Namespace) -> int:
    from reward.metrics import preference_accuracy, tau_with_ties

    weights = weights_path(args.weights)
    if not weights.is_file():
        raise ChecklistError(f"{weights}: no such weights file (--weights)")
    name = args.checklist
    if name is None:
        try:
            data = json.loads(weights.read_text())
        except (OSError, ValueError) as err:
            raise ChecklistError(f"{weights}: cannot read weights file ({err})") from err
        name = data.get("checklist_path") if Path(str(data.get("checklist_path"))).is_file() else None
        name = name or data.get("checklist")
        if not name:
            raise ChecklistError(
                f"{weights}: names no checklist; pass --checklist (a bundled name or a YAML path)"
            )
    checklist = load_checklist(name, weights=weights)
    scorer, (p_a, al_a, p_b, al_b), _, _, labels = _pair_features(checklist, args.pairs)
    sa = scorer(p_a, al_a).total.nan_to_num(0.0).numpy()
    sb = scorer(p_b, al_b).total.nan_to_num(0.0).numpy()
    y = labels.numpy()
    report = {
        "pairs": len(y),
        "accuracy_without_ties": _first(preference_accuracy(sa, sb, y, ties="drop")),
        "accuracy_with_ties": _first(preference_accuracy(sa, sb, y, ties="calibrate")),
        "tau_with_ties": _first(tau_with_ties(sa, sb, y)),
    }
    report = {k: float(v) if not isinstance(v, int) else v for k, v in report.items()}
    print(json.dumps(report, indent=2))
    return 0


def cmd_checklists(_: argparse.Namespace) -> int:
    for name in available_checklists():
        print(load_checklist(name).describe())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from reward.train import train_stage
    from reward.train_config import load_train_recipe

    recipe = load_train_recipe(args.recipe, args.overrides)
    transformers_logging.disable_progress_bar()
    train_stage(recipe, kind=args.command)
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from reward.train_config import load_train_recipe, to_yaml

    sys.stdout.write(to_yaml(load_train_recipe(args.recipe, args.overrides)))
    return 0


def cmd_eval_answers(args: argparse.Namespace) -> int:
    from reward.answer_eval import AnswerTable, evaluate_answers, report_text

    checklist = load_checklist(args.checklist, weights=args.weights)
    if bool(args.model) == bool(args.scores):
        raise ChecklistError("give the student as --model PATH (scored here) or --scores FILE, one of them")
    student, backend = None, None
    if args.scores:
        student = AnswerTable.from_scores(args.scores, checklist)
    else:
        from reward.backends import build_backend

        backend = build_backend(
            "vlm",
            model_path=args.model,
            dtype=args.dtype,
            device=args.device,
            batch_size=args.batch_size,
            max_frames=args.max_frames,
        )
    report = evaluate_answers(
        checklist,
        student=student,
        student_model=backend,
        annotations=args.annotations or (),
        teacher=args.teacher,
        pairs=args.pairs,
        fit_pairs=args.fit_pairs,
        media_root=args.media_root,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
    )
    from mpo.store import write_text

    text = report_text(report)
    out = Path(args.out)
    write_text(out, json.dumps(report, indent=2))
    write_text(out.with_suffix(".txt"), text + "\n")
    print(text)
    print(f"-> {out} (and {out.with_suffix('.txt')})")
    return 0


def cmd_import_vrdb(args: argparse.Namespace) -> int:
    from reward.vrdb import convert_rows, default_checklist, read_questions

    checklist = load_checklist(args.checklist) if args.checklist else default_checklist(args.sources)
    questions = read_questions(args.questions, checklist)
    counts = convert_rows(args.sources, questions, args.out, args.media_dir, args.video_root)
    print(
        f"{counts['samples']} samples, {counts['answers']} answers ({counts['masked']} masked answers left out), "
        f"questions of {checklist.name} -> {args.out}"
    )
    return 0


def _add_training_commands(sub: Any) -> None:
    for name, text in (
        ("train", "fine-tune a VLM on checklist annotations (human yes / no answers)"),
        ("distill", "train a VLM to answer like a teacher (its scores' p(yes) as soft targets)"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("recipe", help="reward-training recipe (recipes/reward/*.yaml)")
        cmd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
        cmd.set_defaults(func=cmd_train)
    shown = sub.add_parser("recipe", help="print a reward-training recipe, resolved (what a run would use)")
    shown.add_argument("recipe")
    shown.add_argument("overrides", nargs="*")
    shown.set_defaults(func=cmd_recipe)

    ev = sub.add_parser("eval-answers", help="answer accuracy vs annotations / agreement with a teacher")
    ev.add_argument("--checklist", required=True)
    ev.add_argument("--annotations", nargs="*", help="held-out annotation files (human answers)")
    ev.add_argument("--teacher", help="a teacher's scores file (q.<id> = p(yes))")
    ev.add_argument("--model", help="the student VLM (folder or hub id), scored here")
    ev.add_argument("--scores", help="the student's scores file instead of --model")
    ev.add_argument("--pairs", help="held-out preference pairs over sample ids {a, b, label}")
    ev.add_argument("--fit-pairs", help="pairs to fit each side's weights on (Algorithm 1)")
    ev.add_argument("--weights", help="weights file replacing the checklist's (without --fit-pairs)")
    ev.add_argument("--media-root", help="where relative media paths start")
    ev.add_argument("--out", required=True, help="report JSON (a .txt table is written beside it)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-frames", type=int, default=24)
    ev.add_argument("--dtype", default="bfloat16")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.set_defaults(func=cmd_eval_answers)

    imp = sub.add_parser("import-vrdb", help="VisionRewardDB release rows -> annotation JSONL")
    imp.add_argument("sources", nargs="+", help="the release's parquet (or JSONL) files")
    imp.add_argument("--questions", required=True, help="the release's meta_qa_en.txt (one question a line)")
    imp.add_argument("--out", required=True, help="annotation JSONL to write")
    imp.add_argument(
        "--checklist", help="checklist the questions belong to (default image-full / video-full)"
    )
    imp.add_argument("--media-dir", help="where images are written (default: media/ beside --out)")
    imp.add_argument("--video-root", help="folder the rows' video_path values are relative to")
    imp.set_defaults(func=cmd_import_vrdb)


def _bad_input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (exit status 2, one line, no traceback): the reward's own, and the
    recipe and checkpoint errors of the training machinery it shares with ``mpo``."""
    from mpo.config import RecipeError
    from mpo.train_state import CheckpointError

    return (RewardInputError, RecipeError, CheckpointError)


def _stopped_errors() -> tuple[type[Exception], ...]:
    """Errors that stop a run for a reason its message states (a non-finite loss at a named step):
    one line and exit status 1; what was saved before stays."""
    from reward.train import TrainingError

    return (TrainingError,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reward", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score answers, or images/videos with a backend")
    score.add_argument(
        "--checklist", required=True, help=f"bundled ({', '.join(available_checklists())}) or a YAML path"
    )
    score.add_argument("--weights", help="weights file (e.g. from `reward fit`) replacing the checklist's")
    score.add_argument("--answers", help="JSONL/parquet rows {id, prompt, answers: {...}, alignment}")
    score.add_argument(
        "--backend",
        choices=["vlm", "cogvlm2", "pixel-stats"],
        help="default: vlm when --model is given (a CogVLM2 checkpoint picks cogvlm2), else pixel-stats",
    )
    score.add_argument("--model", help="VLM folder or hub id (backends vlm, cogvlm2)")
    score.add_argument(
        "--alignment-model",
        help="model for the alignment term: a CLIP-FlanT5 checkpoint (the release's VQAScore, e.g. "
        "zhiqiulin/clip-flant5-xxl) or a VLM (its p(yes), an approximation)",
    )
    score.add_argument("--images", nargs="*")
    score.add_argument("--videos", nargs="*")
    score.add_argument(
        "--prompts", help="text file, one prompt per line in file order; or JSON/JSONL path -> prompt"
    )
    score.add_argument("--out", required=True)
    score.add_argument("--batch-size", type=int, default=8)
    score.add_argument("--max-frames", type=int, default=24)
    score.add_argument("--dtype", default="bfloat16")
    score.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    score.set_defaults(func=cmd_score)

    fit = sub.add_parser("fit", help="learn weights from preference pairs (paper Algorithm 1)")
    fit.add_argument("--checklist", required=True)
    fit.add_argument(
        "--pairs", required=True, help="JSONL/parquet rows {a: answers row, b: answers row, label}"
    )
    fit.add_argument("--out", required=True)
    fit.add_argument("--method", choices=["masked", "logistic"], default="masked")
    fit.set_defaults(func=cmd_fit)

    ev = sub.add_parser("eval", help="preference accuracy (with/without ties) and tau with ties")
    ev.add_argument("--pairs", required=True)
    ev.add_argument("--weights", required=True)
    ev.add_argument(
        "--checklist", help="bundled name or a YAML path (default: the checklist named in the weights file)"
    )
    ev.set_defaults(func=cmd_eval)

    sub.add_parser("checklists", help="list the bundled checklists").set_defaults(func=cmd_checklists)
    from reward.backends.cogvlm2.verify import add_parser as add_verify
    from reward.convert import add_parser as add_convert

    add_convert(sub)
    add_verify(sub)
    _add_training_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mpo.errors import print_line

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _bad_input_errors() as err:
        print_line(f"error: {err}")
        return 2
    except _stopped_errors() as err:
        print_line(f"error: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
