"""`reward verify`: the native CogVLM2 port against the release's remote code, on your own samples.

The release's modeling_cogvlm.py needs a transformers of about 4.40-4.43, so it cannot run in this
project's environment; a user with the real weights can still run it in a second one. This command
computes, for every sample and checklist question, the port's first-token logits (one full forward
over the release's prompt), has the remote code compute the same in the other environment
(``remote_runner.py``, which builds the prompt with the checkpoint's own
``build_conversation_input_ids``), and prints:

- whether both built the same token ids and token types (template, vision block, time indices);
- the largest difference of the answer-position logits, and of p(yes);
- how many hard answers (the release's rule) agree.

It exits 0 when the token layouts are identical, every hard answer agrees and the largest logit
difference is within ``--tolerance``; 1 otherwise. ::

    python -m venv /opt/cogvlm2-env && /opt/cogvlm2-env/bin/pip install "transformers==4.41.2" \\
        torch torchvision pillow einops xformers pytorchvideo decord
    reward verify --model THUDM/VisionReward-Video --remote-python /opt/cogvlm2-env/bin/python \\
        --videos clips/*.mp4 --prompts prompts.txt --checklist video-official --dtype bfloat16

In bfloat16 the two differ by kernel rounding (the remote code uses xformers / triton kernels);
expect logit differences of a few 1e-2 and the same hard answers except where p(yes) is within
~0.01 of 0.5. In float32 the differences are ~1e-5.

Only the transformers remote-code layout has remote code to compare with; the SAT release
(VisionReward-Image) is checked by converting it (``reward convert``) and scoring, not here.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from reward.backends.cogvlm2.config import CogVLM2Error

RUNNER = Path(__file__).with_name("remote_runner.py")


def _media(backend: Any, sample: Any) -> torch.Tensor:
    """The uint8 media the release's script hands to build_conversation_input_ids."""
    from reward.media import frames_per_second, to_uint8

    if sample.modality == "image":
        return to_uint8(sample.pixels)
    frames = frames_per_second(sample.pixels, sample.fps, backend.builder.max_frames)
    if frames.shape[0] == 0:
        raise CogVLM2Error(f"sample {sample.id}: the video is too short for one frame")
    return to_uint8(frames).permute(1, 0, 2, 3).contiguous()  # [C, T, H, W]


def _native_pixels(backend: Any, sample: Any, media: torch.Tensor) -> torch.Tensor:
    from reward.backends.cogvlm2.inputs import image_pixels, video_pixels

    size = backend.config.vision_config["image_size"]
    if sample.modality == "image":
        return image_pixels(media, size)[None]
    return video_pixels(media.permute(1, 0, 2, 3), size)


def verify(
    model: str,
    remote_python: str,
    samples: list[Any],
    questions: list[list[str]],
    dtype: str = "float32",
    device: str = "cpu",
    tolerance: float = 1e-3,
    runner: str | Path = RUNNER,
    report: Any = print,
) -> bool:
    """Compare port and remote code on ``samples`` x ``questions``; True when they agree."""
    from reward.backends.cogvlm2.backend import CogVLM2Backend
    from reward.backends.cogvlm2.loading import detect_layout

    found = detect_layout(model)
    if found is None or found[0] != "remote":
        layout = "not a CogVLM2 checkpoint" if found is None else f"the {found[0]} layout"
        raise CogVLM2Error(
            f"{model}: {layout}; reward verify compares with the release's remote code, which only the transformers remote-code layout has"
        )
    backend = CogVLM2Backend.from_pretrained(model, dtype=dtype, device=device)
    items, native, labels = [], [], []
    with torch.inference_mode():
        for sample, qs in zip(samples, questions):
            media = _media(backend, sample)
            pixels = _native_pixels(backend, sample, media)
            queries = backend.queries(qs)
            items.append({"modality": sample.modality, "media": media, "queries": queries})
            for j, query in enumerate(queries):
                ids, types = backend.builder.row(pixels.shape[0], sample.modality, query)
                logits = backend.first_token_logits(sample, query, pixels=pixels).float().cpu()
                native.append(
                    {"input_ids": torch.tensor(ids), "token_type_ids": torch.tensor(types), "logits": logits}
                )
                labels.append(f"sample {sample.id or '?'}, question {j}")
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "inputs.pt", Path(tmp) / "remote.pt"
        torch.save({"template": backend.rule.template, "items": items}, inputs)
        cmd = [
            remote_python,
            str(runner),
            "--model",
            str(found[1]),
            "--inputs",
            str(inputs),
            "--out",
            str(out),
            "--dtype",
            dtype,
            "--device",
            device,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise CogVLM2Error(f"the remote code failed in {remote_python} (exit {done.returncode}):\n{tail}")
        remote = torch.load(out, weights_only=True)
    if len(remote) != len(native):
        raise CogVLM2Error(f"the remote runner returned {len(remote)} results for {len(native)} prompts")

    layout_ok, worst, worst_p, agree = True, (0.0, ""), 0.0, 0
    for label, mine, theirs in zip(labels, native, remote):
        for key in ("input_ids", "token_type_ids"):
            a, b = mine[key], theirs[key].long()
            if a.shape != b.shape or not torch.equal(a, b):
                n = min(len(a), len(b))
                at = next((i for i in range(n) if a[i] != b[i]), n)
                report(
                    f"{label}: {key} differ at position {at} (port {a[at : at + 4].tolist()}, remote {b[at : at + 4].tolist()}; lengths {len(a)} / {len(b)})"
                )
                layout_ok = False
        diff = float((mine["logits"] - theirs["logits"]).abs().max())
        if diff > worst[0]:
            worst = (diff, label)
        p_mine, p_theirs = backend.p_yes(mine["logits"][None])[0], backend.p_yes(theirs["logits"][None])[0]
        worst_p = max(worst_p, float((p_mine - p_theirs).abs()))
        agree += int(bool(p_mine >= 0.5) == bool(p_theirs >= 0.5))
    total = len(native)
    report(
        f"reward verify: {len(samples)} samples x {len(questions[0]) if questions else 0} questions, port vs remote code ({dtype}, {device})"
    )
    report(
        f"token layout: {'identical on all ' + str(total) + ' prompts' if layout_ok else 'DIFFERENT (see above)'}"
    )
    report(f"largest |logit difference|: {worst[0]:.3e} ({worst[1] or '-'})")
    report(f"largest |p(yes) difference|: {worst_p:.3e}; hard answers agree on {agree} / {total}")
    ok = layout_ok and agree == total and worst[0] <= tolerance
    report("OK" if ok else f"MISMATCH (tolerance {tolerance:g} on the logits)")
    return ok


def cmd_verify(args: argparse.Namespace) -> int:
    from reward.checklist import load_checklist
    from reward.media import load_media

    media = list(args.images or []) + list(args.videos or [])
    if not media:
        raise CogVLM2Error("give --images or --videos: the comparison runs on your own samples")
    from reward.cli import _read_prompts

    prompts = _read_prompts(args.prompts, media)
    checklist = load_checklist(args.checklist)
    samples = [load_media(path, prompt) for path, prompt in zip(media, prompts)]
    questions = [checklist.question_texts(s.prompt)[: args.questions] for s in samples]
    ok = verify(
        args.model,
        args.remote_python,
        samples,
        questions,
        dtype=args.dtype,
        device=args.device,
        tolerance=args.tolerance,
    )
    return 0 if ok else 1


def add_parser(sub: Any) -> None:
    """Register ``reward verify`` on the reward CLI's subparsers."""
    p = sub.add_parser("verify", help="compare the native CogVLM2 port with the release's remote code")
    p.add_argument(
        "--model", required=True, help="CogVLM2 checkpoint in the remote-code layout (folder or hub id)"
    )
    p.add_argument(
        "--remote-python", required=True, help="python of an environment that runs the remote code"
    )
    p.add_argument("--checklist", default="video-official")
    p.add_argument("--questions", type=int, default=None, help="only the first N questions")
    p.add_argument("--images", nargs="*")
    p.add_argument("--videos", nargs="*")
    p.add_argument("--prompts", help="one prompt per line in file order, or a JSON/JSONL path -> prompt map")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest logit difference accepted")
    p.set_defaults(func=cmd_verify)
