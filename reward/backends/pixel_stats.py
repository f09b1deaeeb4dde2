"""Answers the checklist questions that pixel statistics can judge; every other question is unknown.

This backend exists for demos, tests and CPU smoke runs of the whole pipeline. It is not a learned
human-preference model and says so in every :class:`~reward.types.Answers` it returns.

Recognising a question
    From its text alone, whatever the checklist: the text is normalised (lower case, typographic quotes
    folded, "colour" -> "color", final punctuation dropped) and matched against the anchored patterns of
    :data:`RULES`. A rule names a *family* (one statistic), the ordinal *level* the question asks about,
    and whether it is phrased negatively ("Is it blurry?"). A text that matches nothing, e.g. "Is the
    human face beautiful?", gets NaN (never 0.5): the scorer leaves it out. Alignment is not judged.

Making a probability
    ``p = sigmoid((statistic - threshold[level]) / temperature)``, ``1 - p`` for a negated question.
    Within a family the thresholds follow the order of the checklist options and the temperature is
    shared, so a stronger question never gets a higher p than a weaker one:
    p(very clear) <= p(clear) <= p(not blurry) <= p(not completely blurry).

The statistics (pixels in [0, 1]; luma Y = 0.2126 R + 0.7152 G + 0.0722 B on the encoded values)
    Frame statistics are computed on a copy whose long side is at most 256 px (antialiased), so that the
    constants do not depend on resolution; a video averages them over its per-second frames
    (:func:`reward.media.frames_per_second`, the frames the released video reward sees). The values
    quoted are what the constants were chosen from: photographs, 1/f ("pink") noise, which has the
    spectrum of natural images, and procedural test images.

    brightness        mean luma. Black 0, white 1, photos ~0.3-0.5. Thresholds: bright 0.5, not dark
                      0.3, any light at all 0.12.
    sharpness         log10(mean |Laplacian of luma| + 1e-4). Flat -4; photos ~ -1.2 to -0.9; pink noise
                      -0.6; a 9 px box blur takes pink noise to -1.9. Thresholds: very clear -0.9, clear
                      -1.2, not blurry -1.55, not completely blurry -2.1.
    colorfulness      Hasler & Suesstrunk (2003): sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2), with
                      rg = R - G, yb = (R + G)/2 - B (s: std, m: mean). Grey 0; photos ~0.13-0.28. Their
                      scale's "moderately" / "averagely" / "highly colourful" are 0.13 / 0.18 / 0.32 here.
                      A crude stand-in for colour aesthetics.
    lighting_contrast std of the 16x16 grid of cell-mean luma: large-scale light and shadow. Flat 0, iid
                      noise ~0.01 (no shading), photos ~0.05-0.12, a hard checkerboard 0.15.
    richness          mean of (a) the entropy of the 8x8x8-bin colour histogram over its maximum log 512
                      and (b) the fraction of a 16x16 grid of cells with texture (a soft step at a cell
                      luma std of 0.03). Flat 0.02, photos ~0.6-0.8, iid noise 1.
    symmetry          1 - mean|P - mirror(P)| / (2 mean|P - mean P| + 1e-3), clamped to [0, 1], on the
                      32x32 cell means P of the colour image (left-right mirror). Mirror images and flat
                      images 1; photos and iid noise ~0.3-0.4 (the ordinary, neither-nor case).

    Video statistics use adjacent frames at a reference rate of 8 fps (every round(fps / 8)-th frame),
    so that they do not depend on the clip's frame rate, on a copy whose long side is at most 128 px.
    They are NaN for images and for clips too short to measure them. Shifts are in units of the frame's
    long side per 1/8 s.

    camera_motion     log10(mean |global shift| + 1e-3). The shift between frames comes from phase
                      correlation and only counts when the change covers most of the frame: an object
                      moving over a still scene is not a camera move. Static -3; a pan of 1/16 of the
                      frame per second -2.05; 1/4 per second -1.5.
    motion            log10(mean |Y_t+1 - Y_t| + 1e-4) after undoing the camera's shift (on 5x5-blurred
                      frames, so that resampling noise does not count): what moves in the scene. Static
                      -4 (codec noise ~ -3); a ball crossing the frame in 3 s -2.3.
    camera_stability  -log10(mean |shift_t+1 - shift_t| + 1e-3): how jerky the camera path is (the change
                      of low-frequency content that a steady camera, still or panning, does not have).
                      Steady 3 (still or panning); random jitter of +-2 px at 256 px 1.75, +-6 px
                      1.25. Needs 3 frames.
    quality_stability -log10(I + 0.01), I the mean change between adjacent frames of brightness (/0.05),
                      luma std (/0.05) and sharpness (/0.15), averaged: I = 1 is a clearly visible jump at
                      every frame. Still 2, a pan ~1.7, brightness flicker < 0.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from reward.media import frames_per_second
from reward.types import Answers, Sample

SOURCE = "pixel-stats (demo heuristics, not a learned human-preference model)"
FRAME_SIDE = 256  # px, long side of the copy frame statistics are computed on
MOTION_SIDE = 128  # px, long side of the copy motion/stability statistics are computed on
REFERENCE_FPS = 8.0  # motion is measured between frames ~1/8 s apart, whatever the clip's rate
_LUMA = (0.2126, 0.7152, 0.0722)


@dataclass(frozen=True)
class Family:
    """One statistic and the ordered thresholds of the options it can judge (strongest first).

    ``temperature`` is in the statistic's units: the change that moves p from 0.5 to 0.73.
    """

    statistic: str
    levels: dict[str, float]
    temperature: float
    video_only: bool = False

    def __post_init__(self) -> None:
        values = list(self.levels.values())
        if any(a <= b for a, b in itertools.pairwise(values)):
            raise ValueError(f"family {self.statistic}: thresholds must decrease from strongest level")


FAMILIES: dict[str, Family] = {
    "brightness": Family("brightness", {"bright": 0.5, "not_dark": 0.3, "lit": 0.12}, 0.07),
    "clarity": Family(
        "sharpness",
        {"very_clear": -0.9, "clear": -1.2, "not_blurry": -1.55, "not_completely_blurry": -2.1},
        0.15,
    ),
    "color": Family(
        "colorfulness",
        {"very_beautiful": 0.32, "beautiful": 0.22, "not_ugly": 0.12, "not_very_ugly": 0.07},
        0.025,
    ),
    "lighting": Family("lighting_contrast", {"very_distinct": 0.2, "distinct": 0.13, "present": 0.05}, 0.02),
    "richness": Family(
        "richness", {"very_rich": 0.85, "rich": 0.72, "not_monotonous": 0.5, "not_empty": 0.25}, 0.06
    ),
    "symmetry": Family("symmetry", {"symmetrical": 0.7, "not_asymmetrical": 0.3}, 0.08),
    "object_motion": Family(
        "motion",
        {"highly_dynamic": -1.55, "dynamic": -2.0, "not_minimal": -2.45, "not_static": -2.9},
        0.15,
        video_only=True,
    ),
    "camera_motion": Family(
        "camera_motion",
        {"highly_dynamic": -1.45, "dynamic": -1.75, "not_minimal": -2.1, "not_static": -2.45},
        0.12,
        video_only=True,
    ),
    "camera_stability": Family(
        "camera_stability", {"stable": 2.5, "not_unstable": 2.1}, 0.12, video_only=True
    ),
    "quality_stability": Family(
        "quality_stability",
        {"very_stable": 1.5, "stable": 1.2, "not_unstable": 0.8, "no_noticeable_instability": 0.4},
        0.12,
        video_only=True,
    ),
}


@dataclass(frozen=True)
class Rule:
    """A question pattern (on normalised text) and what it asks: a family's level, maybe negated."""

    pattern: re.Pattern[str]
    family: str
    level: str
    negated: bool = False


_SUBJ = r"(?:the (?:image|picture|photo|video|frames?)|it)"
_OWNER = r"(?:(?:main )?(?:object|subject)(?:'s|s') )?"
_MOTION_LEVELS = {
    "highly dynamic": "highly_dynamic",
    "dynamic": "dynamic",
    "not minimal": "not_minimal",
    "not static": "not_static",
}


def _rules() -> list[Rule]:
    spec: list[tuple[str, str, str, bool]] = [
        # brightness / darkness / any light at all
        (rf"(?:are the colors|is {_SUBJ}) bright", "brightness", "bright", False),
        (rf"(?:are the colors|is {_SUBJ}) not dark", "brightness", "not_dark", False),
        (rf"(?:are the colors|is {_SUBJ}) (?:too )?dark", "brightness", "not_dark", True),
        (r"is there (?:any )?(?:lighting|light)(?: present)?", "brightness", "lit", False),
        # clarity / blur
        (rf"is {_SUBJ} very (?:clear|sharp)", "clarity", "very_clear", False),
        (rf"is {_SUBJ} (?:clear|sharp)", "clarity", "clear", False),
        (rf"(?:does {_SUBJ} avoid being|is {_SUBJ} not) blurry", "clarity", "not_blurry", False),
        (
            rf"(?:does {_SUBJ} avoid being|is {_SUBJ} not) completely blurry",
            "clarity",
            "not_completely_blurry",
            False,
        ),
        (rf"is {_SUBJ} blurry", "clarity", "not_blurry", True),
        (rf"is {_SUBJ} completely blurry", "clarity", "not_completely_blurry", True),
        # colour saturation as a stand-in for colour aesthetics
        (
            r"are the colors (?:very|exceptionally) (?:beautiful|vivid|vibrant)",
            "color",
            "very_beautiful",
            False,
        ),
        (r"are the colors (?:beautiful|vivid|vibrant|saturated)", "color", "beautiful", False),
        (rf"is {_SUBJ} colorful", "color", "beautiful", False),
        (r"are the colors not (?:ugly|unattractive)", "color", "not_ugly", False),
        (
            r"are the colors not (?:significantly|very) (?:ugly|unattractive)",
            "color",
            "not_very_ugly",
            False,
        ),
        # large-scale light and shadow
        (r"(?:is|are) the lighting and shadows? very distinct", "lighting", "very_distinct", False),
        (r"(?:is|are) the lighting and shadows? distinct", "lighting", "distinct", False),
        (r"is there lighting and shadows?", "lighting", "present", False),
        (r"is the contrast (?:high|strong)", "lighting", "distinct", False),
        # richness / emptiness
        (rf"is {_SUBJ} very rich", "richness", "very_rich", False),
        (rf"is {_SUBJ} rich", "richness", "rich", False),
        (rf"is {_SUBJ} not monotonous", "richness", "not_monotonous", False),
        (rf"is {_SUBJ} not empty", "richness", "not_empty", False),
        (rf"is {_SUBJ} monotonous", "richness", "not_monotonous", True),
        (rf"is {_SUBJ} empty", "richness", "not_empty", True),
        # left-right symmetry
        (rf"is {_SUBJ} symmetric(?:al)?", "symmetry", "symmetrical", False),
        (
            rf"(?:does {_SUBJ} avoid asymmetry|is {_SUBJ} not asymmetric(?:al)?)",
            "symmetry",
            "not_asymmetrical",
            False,
        ),
        (rf"is {_SUBJ} asymmetric(?:al)?", "symmetry", "not_asymmetrical", True),
        # video: camera stability and image-quality stability
        (r"is the camera (?:stable|steady)", "camera_stability", "stable", False),
        (r"is the camera not (?:unstable|shaky)", "camera_stability", "not_unstable", False),
        (r"is the camera (?:unstable|shaky)", "camera_stability", "not_unstable", True),
        (r"is the (?:image|video) quality very stable", "quality_stability", "very_stable", False),
        (r"is the (?:image|video) quality stable", "quality_stability", "stable", False),
        (r"is the (?:image|video) quality not unstable", "quality_stability", "not_unstable", False),
        (
            r"is the (?:image|video) quality free of noticeable instability",
            "quality_stability",
            "no_noticeable_instability",
            False,
        ),
    ]
    for phrase, level in _MOTION_LEVELS.items():
        spec.append((rf"is the {_OWNER}motion {phrase}", "object_motion", level, False))
        spec.append((rf"is the camera (?:motion|movement) {phrase}", "camera_motion", level, False))
    spec += [
        (rf"is the {_OWNER}motion minimal", "object_motion", "not_minimal", True),
        (rf"is the {_OWNER}motion static", "object_motion", "not_static", True),
        (r"is the camera (?:motion|movement) minimal", "camera_motion", "not_minimal", True),
        (r"is the camera (?:motion|movement) static", "camera_motion", "not_static", True),
    ]
    rules = [Rule(re.compile(rf"^{p}$"), fam, lvl, neg) for p, fam, lvl, neg in spec]
    for rule in rules:
        if rule.level not in FAMILIES[rule.family].levels:
            raise ValueError(f"rule {rule.pattern.pattern}: {rule.family} has no level {rule.level!r}")
    return rules


RULES: list[Rule] = _rules()

_FOLD = str.maketrans({"’": "'", "‘": "'", "”": '"', "“": '"', "\u00a0": " "})


def normalise(text: str) -> str:
    """Lower case, typographic quotes folded, British spelling of colour folded, no final punctuation."""
    text = text.translate(_FOLD).lower()
    text = re.sub(r"\bcolour", "color", text)
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip("?.! ")


@lru_cache(maxsize=4096)
def match_question(text: str) -> Rule | None:
    """The rule that judges this question, or None when pixel statistics cannot judge it."""
    norm = normalise(text)
    for rule in RULES:
        if rule.pattern.match(norm):
            return rule
    return None


# ----------------------------------------------------------------------------------------------------
# statistics


def _shrink(frames: torch.Tensor, side: int) -> torch.Tensor:
    """``[N,3,H,W]`` -> long side at most ``side`` px (antialiased), float32 in [0, 1]."""
    frames = frames.float().clamp(0, 1)
    h, w = frames.shape[-2:]
    scale = side / max(h, w)
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        frames = F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    return frames.clamp(0, 1)


def _luma(frames: torch.Tensor) -> torch.Tensor:
    """``[N,3,H,W]`` -> ``[N,1,H,W]``."""
    weights = torch.tensor(_LUMA, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
    return (frames * weights).sum(1, keepdim=True)


def _log_sharpness(luma: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=luma.dtype)
    lap = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), kernel.view(1, 1, 3, 3))
    return torch.log10(lap.abs().mean((1, 2, 3)) + 1e-4)


def _cell_std(luma: torch.Tensor, cells: int) -> torch.Tensor:
    """Luma standard deviation inside each cell of a ``cells x cells`` grid: ``[N, cells*cells]``."""
    mean = F.adaptive_avg_pool2d(luma, cells)
    var = (F.adaptive_avg_pool2d(luma * luma, cells) - mean * mean).clamp_min(0)
    return var.sqrt().flatten(1)


def _colour_entropy(frames: torch.Tensor) -> torch.Tensor:
    """Entropy of the 8x8x8-bin RGB histogram of each frame, divided by its maximum log(512)."""
    n = frames.shape[0]
    q = (frames * 8).long().clamp(0, 7)
    bins = q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2] + 512 * torch.arange(n).view(n, 1, 1)
    counts = torch.bincount(bins.flatten(), minlength=512 * n).view(n, 512).float()
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(1) / math.log(512)


def frame_statistics(frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-frame statistics of ``[N,3,H,W]`` frames, each a ``[N]`` tensor (see the module docstring)."""
    frames = _shrink(frames, FRAME_SIDE)
    luma = _luma(frames)
    r, g, b = frames[:, 0], frames[:, 1], frames[:, 2]
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    colorfulness = torch.sqrt(rg.var(1, unbiased=False) + yb.var(1, unbiased=False)) + 0.3 * torch.sqrt(
        rg.mean(1) ** 2 + yb.mean(1) ** 2
    )
    textured = torch.sigmoid((_cell_std(luma, 16) - 0.03) / 0.01).mean(1)
    cells = F.adaptive_avg_pool2d(frames, 32)
    spread = 2 * (cells - cells.mean((2, 3), keepdim=True)).abs().mean((1, 2, 3))
    mismatch = (cells - cells.flip(-1)).abs().mean((1, 2, 3))
    return {
        "brightness": luma.mean((1, 2, 3)),
        "sharpness": _log_sharpness(luma),
        "colorfulness": colorfulness,
        "lighting_contrast": F.adaptive_avg_pool2d(luma, 16).flatten(1).std(1, unbiased=False),
        "richness": 0.5 * (_colour_entropy(frames) + textured),
        "symmetry": (1 - mismatch / (spread + 1e-3)).clamp(0, 1),
    }


def _reference_rate_luma(pixels: torch.Tensor, fps: float) -> torch.Tensor:
    step = max(1, round(fps / REFERENCE_FPS))
    return _luma(_shrink(pixels[::step], MOTION_SIDE))


def global_shifts(luma: torch.Tensor) -> torch.Tensor:
    """Translation (dy, dx) in pixels from each frame to the next: ``[T,1,H,W]`` -> ``[T-1, 2]``.

    Phase correlation (the peak of the normalised cross-power spectrum) on Hann-windowed frames,
    refined to sub-pixel precision by a parabola through the peak and its neighbours. It follows the
    dominant (background) content, so it measures the camera, not an object moving over a still scene.
    """
    _, _, h, w = luma.shape
    window = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)[None, :]
    frames = (luma[:, 0] - luma[:, 0].mean((1, 2), keepdim=True)) * window
    spec = torch.fft.rfft2(frames)
    cross = spec[:-1] * spec[1:].conj()
    corr = torch.fft.irfft2(cross / cross.abs().clamp_min(1e-8), s=(h, w))  # [T-1, H, W]
    flat = corr.flatten(1).argmax(1)
    iy, ix = flat // w, flat % w
    rows = torch.arange(corr.shape[0])

    def refine(idx: torch.Tensor, size: int, pick: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        left, mid, right = pick((idx - 1) % size), pick(idx), pick((idx + 1) % size)
        denom = left - 2 * mid + right
        offset = torch.where(denom.abs() > 1e-8, 0.5 * (left - right) / denom, torch.zeros_like(denom))
        pos = idx.float() + offset.clamp(-0.5, 0.5)
        return torch.where(pos > size / 2, pos - size, pos)

    dy = refine(iy, h, lambda i: corr[rows, i, ix])
    dx = refine(ix, w, lambda i: corr[rows, iy, i])
    # the correlation peak sits at the shift that maps frame t+1 back onto frame t: flip its sign
    return -torch.stack([dy, dx], 1)


def _compensated_change(luma: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Mean |Y_t+1 - Y_t| after moving frame t+1 back by the camera's shift, inside the valid region."""
    n, _, h, w = luma.shape
    theta = torch.zeros(n - 1, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2 * shifts[:, 1] / w  # normalised grid units
    theta[:, 1, 2] = 2 * shifts[:, 0] / h
    grid = F.affine_grid(theta, [n - 1, 1, h, w], align_corners=False)
    moved = F.grid_sample(luma[1:], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    valid = F.grid_sample(torch.ones_like(luma[1:]), grid, mode="bilinear", align_corners=False) > 0.999
    diff = (moved - luma[:-1]).abs() * valid
    return diff.sum() / valid.sum().clamp_min(1)


def _smooth(luma: torch.Tensor) -> torch.Tensor:
    """A 5x5 binomial blur: removes the finest detail, where sub-pixel resampling errors would live."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = (k[:, None] * k[None, :]).view(1, 1, 5, 5)
    return F.conv2d(F.pad(luma, (2, 2, 2, 2), mode="replicate"), kernel)


def motion_statistics(pixels: torch.Tensor, fps: float) -> dict[str, torch.Tensor]:
    """Video statistics from adjacent frames at the reference rate (0-d tensors, NaN if too short)."""
    luma = _reference_rate_luma(pixels, fps)
    nan = torch.tensor(float("nan"))
    out = dict.fromkeys(("motion", "camera_motion", "camera_stability", "quality_stability"), nan)
    if luma.shape[0] < 2:
        return out
    width = float(max(luma.shape[-2:]))
    smooth = _smooth(luma)
    change = F.adaptive_avg_pool2d((smooth[1:] - smooth[:-1]).abs(), 8).flatten(1)  # [T-1, 64]
    # a camera move changes (nearly) the whole frame; a change confined to a few cells is an object
    # moving over a still scene, whose phase-correlation peak must not be read as a camera move
    global_change = torch.sigmoid((torch.sigmoid((change - 0.015) / 0.003).mean(1) - 0.4) / 0.08)
    shifts = global_shifts(luma) * global_change[:, None]  # px per step
    out["camera_motion"] = torch.log10(shifts.norm(dim=1).mean() / width + 1e-3)
    out["motion"] = torch.log10(_compensated_change(smooth, shifts) + 1e-4)
    per_frame = torch.stack(
        [
            luma.mean((1, 2, 3)) / 0.05,
            luma.flatten(1).std(1, unbiased=False) / 0.05,
            _log_sharpness(luma) / 0.15,
        ],
        1,
    )
    out["quality_stability"] = -torch.log10((per_frame[1:] - per_frame[:-1]).abs().mean() + 0.01)
    if shifts.shape[0] >= 2:
        jitter = (shifts[1:] - shifts[:-1]).norm(dim=1).mean() / width
        out["camera_stability"] = -torch.log10(jitter + 1e-3)
    return out


_FRAME_STATS = ("brightness", "sharpness", "colorfulness", "lighting_contrast", "richness", "symmetry")
_VIDEO_STATS = ("motion", "camera_motion", "camera_stability", "quality_stability")


def sample_statistics(sample: Sample, needed: set[str] | None = None) -> dict[str, float]:
    """The statistics of one sample (only ``needed`` ones when given). Video-only ones are NaN for images."""
    needed = set(_FRAME_STATS + _VIDEO_STATS) if needed is None else needed
    stats: dict[str, float] = {}
    pixels = sample.pixels.detach().cpu()
    if needed & set(_FRAME_STATS):
        frames = pixels[None] if sample.modality == "image" else frames_per_second(pixels, sample.fps)
        stats.update({k: float(v.mean()) for k, v in frame_statistics(frames).items()})
    if needed & set(_VIDEO_STATS):
        if sample.modality == "video":
            stats.update({k: float(v) for k, v in motion_statistics(pixels, sample.fps).items()})
        else:
            stats.update(dict.fromkeys(_VIDEO_STATS, float("nan")))
    return stats


# ----------------------------------------------------------------------------------------------------
# the backend


class PixelStatsBackend:
    """Judges brightness, clarity, colour, light and shadow, richness, symmetry, and for video motion and
    stability, from pixel statistics; every other question (and alignment) is NaN (unknown)."""

    name = "pixel-stats"

    @staticmethod
    def known(questions: list[str]) -> list[bool]:
        """Which question texts this backend can judge (for some modality)."""
        return [match_question(q) is not None for q in questions]

    @staticmethod
    def statistic_of(questions: list[str]) -> list[str | None]:
        """The statistic that answers each question, or None for an unknown question."""
        rules = [match_question(q) for q in questions]
        return [FAMILIES[r.family].statistic if r else None for r in rules]

    def answer(
        self,
        samples: list[Sample],
        questions: list[list[str]],
        alignment_questions: list[str] | None = None,
    ) -> Answers:
        if len(questions) != len(samples):
            raise ValueError(f"pixel-stats: {len(samples)} samples but {len(questions)} question lists")
        if not samples:
            raise ValueError("pixel-stats: no samples to answer")
        q_count = len(questions[0])
        rows = []
        judged = 0
        for sample, texts in zip(samples, questions):
            if len(texts) != q_count:
                raise ValueError(
                    f"pixel-stats: sample {sample.id or '?'} has {len(texts)} questions, expected {q_count}"
                )
            row, known = _answer_one(sample, texts)
            rows.append(row)
            judged = max(judged, known)
        notes = [
            "alignment is not judged: pixel statistics cannot tell whether a sample matches its prompt",
            f"{judged} of {q_count} questions judged from pixel statistics; the rest are unknown (NaN)",
        ]
        return Answers(p_yes=torch.stack(rows), alignment=None, source=SOURCE, notes=notes)


def _answer_one(sample: Sample, texts: list[str]) -> tuple[torch.Tensor, int]:
    """p(yes) for each question of one sample (NaN where unknown) and how many were judged."""
    is_video = sample.modality == "video"
    rules = [match_question(t) for t in texts]
    rules = [r if r is not None and (is_video or not FAMILIES[r.family].video_only) else None for r in rules]
    stats = sample_statistics(sample, {FAMILIES[r.family].statistic for r in rules if r})
    nan = float("nan")
    value = torch.tensor([stats[FAMILIES[r.family].statistic] if r else nan for r in rules])
    threshold = torch.tensor([FAMILIES[r.family].levels[r.level] if r else nan for r in rules])
    temperature = torch.tensor([FAMILIES[r.family].temperature if r else 1.0 for r in rules])
    sign = torch.tensor([-1.0 if r and r.negated else 1.0 for r in rules])
    p = torch.sigmoid(sign * (value - threshold) / temperature).float()
    return p, int((~p.isnan()).sum())
