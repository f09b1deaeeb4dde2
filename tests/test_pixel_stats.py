"""The pixel-statistics backend: which questions it recognises, and that its answers move the right way."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reward.backends.pixel_stats import FAMILIES, SOURCE, PixelStatsBackend, match_question, sample_statistics
from reward.checklist import load_checklist
from reward.types import AnswerBackend, Sample

torch.set_num_threads(1)
BACKEND = PixelStatsBackend()

# Every question of the paper's Tables 15-18 and of the released select lists that belongs to a family
# pixel statistics can judge, strongest option first within each family.
FAMILY_TEXTS: dict[str, list[str]] = {
    "brightness": ["Are the colors bright?", "Are the colors not dark?", "Is there any lighting present?"],
    "image clarity": [
        "Is the image very clear?",
        "Is the image clear?",
        "Does the image avoid being blurry?",
        "Does the image avoid being completely blurry?",
    ],
    "video clarity": [
        "Is it very clear?",
        "Is it clear?",
        "Is it not blurry?",
        "Is it not completely blurry?",
    ],
    "image colour": ["Are the colors beautiful?", "Are the colors not ugly?"],
    "video colour": [
        "Are the colors exceptionally beautiful?",
        "Are the colors beautiful?",
        "Are the colors not unattractive?",
        "Are the colors not significantly unattractive?",
    ],
    "lighting": [
        "Is the lighting and shadow very distinct?",
        "Is the lighting and shadow distinct?",
        "Is there lighting and shadow?",
    ],
    "richness": [
        "Is the image very rich?",
        "Is the image rich?",
        "Is the image not monotonous?",
        "Is the image not empty?",
    ],
    "symmetry": ["Is the image symmetrical?", "Does the image avoid asymmetry?"],
    "quality stability": [
        "Is the image quality very stable?",
        "Is the image quality stable?",
        "Is the image quality not unstable?",
        "Is the image quality free of noticeable instability?",
    ],
    "camera stability": ["Is the camera stable?", "Is the camera not unstable?"],
    "object motion": [
        "Is the object's motion highly dynamic?",
        "Is the object's motion dynamic?",
        "Is the object's motion not minimal?",
        "Is the object's motion not static?",
    ],
    "camera motion": [
        "Is the camera motion highly dynamic?",
        "Is the camera motion dynamic?",
        "Is the camera motion not minimal?",
        "Is the camera motion not static?",
    ],
}
VIDEO_ONLY = {"quality stability", "camera stability", "object motion", "camera motion"}

# Checklist questions that pixel statistics cannot judge: they must stay unknown.
UNKNOWN_TEXTS = [
    "Is the human face beautiful?",
    "Is the human face very beautiful?",
    "Are the objects well-coordinated?",
    "Is the main subject prominent?",
    "Is the background beautiful?",
    "Is there a background?",
    "Are the lighting and shadows very beautiful?",
    "Is the lighting beautiful?",
    "Is the lighting perfectly accurate?",
    "Are the image details very exquisite?",
    "Does the image avoid being hard to recognize?",
    "Are the details very refined?",
    "Is the composition aesthetically pleasing?",
    "Is the camera movement aesthetically pleasing?",
    "Does the camera movement have no obvious flaws?",
    "Is the smoothness of the object's movement good?",
    "Is the object's movement completely realistic?",
    "Is the focus aesthetically pleasing?",
    "Is there a human body in the image?",
    "Is the image completely safe?",
    "Are there any letters present?",
    'Does the video meet all the requirements stated in the text "a cat"?',
    'Does this figure show "a bright clear image"?',
]


def _answer(sample: Sample, texts: list[str]) -> torch.Tensor:
    return BACKEND.answer([sample], [texts]).p_yes[0]


def _texture(size: int, seed: int, contrast: float = 0.18, mean: float = 0.45) -> torch.Tensor:
    """Multi-scale noise with roughly the 1/f spectrum of natural images: ``[3, size, size]``."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.zeros(1, 3, size, size)
    for cells in (4, 8, 16, 32, size):
        noise = torch.randn(1, 3, cells, cells, generator=gen)
        image += (
            F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False) * (8 / cells) ** 0.5
        )
    image = 0.6 * image.mean(1, keepdim=True) + 0.4 * image  # correlated channels, like photographs
    image = (image - image.mean()) / image.std()
    return (mean + contrast * image[0]).clamp(0, 1)


def _box_blur(image: torch.Tensor, k: int = 9) -> torch.Tensor:
    kernel = torch.ones(3, 1, k, k) / (k * k)
    return F.conv2d(F.pad(image[None], (k // 2,) * 4, mode="replicate"), kernel, groups=3)[0]


def _checkerboard(size: int = 96, cell: int = 8) -> torch.Tensor:
    idx = torch.arange(size) // cell
    board = ((idx[:, None] + idx[None, :]) % 2).float()
    return torch.stack([board, 0.6 * board + 0.2, 1 - board])


def _pan(frames: int, step: float, size: int = 96, seed: int = 0, jitter: float = 0.0) -> torch.Tensor:
    """A camera moving ``step`` px per frame over a textured scene, with optional random jitter (px)."""
    gen = torch.Generator().manual_seed(seed + 1)
    canvas = _texture(size * 2, seed)
    offsets = torch.arange(frames) * step + jitter * (torch.rand(frames, generator=gen) * 2 - 1)
    rows = torch.full((frames,), size / 2) + jitter * (torch.rand(frames, generator=gen) * 2 - 1)
    out = []
    for ox, oy in zip(offsets.round().long().tolist(), rows.round().long().tolist()):
        out.append(canvas[:, oy : oy + size, 8 + ox : 8 + ox + size])
    return torch.stack(out)


def _moving_square(frames: int, speed: float, size: int = 96, flat: bool = False) -> torch.Tensor:
    """A bright square crossing a still scene (textured or ``flat``) at ``speed`` px per frame."""
    background = torch.full((3, size, size), 0.3) if flat else _texture(size, 3)
    out = []
    for t in range(frames):
        frame = background.clone()
        x = int(4 + t * speed) % (size - 24)
        frame[:, 30:54, x : x + 24] = torch.tensor([1.0, 0.9, 0.2])[:, None, None]
        out.append(frame)
    return torch.stack(out)


# --- recognising questions ---------------------------------------------------------------------


def test_satisfies_the_backend_protocol():
    assert isinstance(BACKEND, AnswerBackend)
    assert BACKEND.name == "pixel-stats"


@pytest.mark.parametrize("family", list(FAMILY_TEXTS))
def test_every_family_text_of_the_paper_and_release_is_recognised(family):
    texts = FAMILY_TEXTS[family]
    assert all(PixelStatsBackend.known(texts)), [t for t in texts if match_question(t) is None]
    statistics = PixelStatsBackend.statistic_of(texts)
    assert len(set(statistics)) == 1, f"{family}: one family must be judged by one statistic"
    assert (family in VIDEO_ONLY) == FAMILIES[match_question(texts[0]).family].video_only


def test_unknown_questions_are_not_recognised():
    assert not any(PixelStatsBackend.known(UNKNOWN_TEXTS))
    assert PixelStatsBackend.statistic_of(UNKNOWN_TEXTS) == [None] * len(UNKNOWN_TEXTS)


def test_matching_ignores_case_typographic_apostrophes_and_spelling():
    curly = "IS THE OBJECT\u2019S MOTION HIGHLY DYNAMIC"
    assert match_question(curly) == match_question("Is the object's motion highly dynamic?")
    assert match_question("Are the colours bright?") == match_question("Are the colors bright?")
    assert match_question("Is the image very clear ?") is not None


def test_bundled_checklists_recognised_questions_are_exactly_the_families():
    expected = {t for texts in FAMILY_TEXTS.values() for t in texts}
    for name in ("image-full", "video-full", "image-official", "video-official"):
        texts = [q.text for q in load_checklist(name).questions]
        recognised = {t for t, k in zip(texts, PixelStatsBackend.known(texts)) if k}
        assert recognised <= expected, f"{name}: unexpected matches {recognised - expected}"
        assert recognised == expected & set(texts), f"{name}: missed {(expected & set(texts)) - recognised}"


# --- answers --------------------------------------------------------------------------------------


def test_unknown_questions_are_nan_and_alignment_is_not_judged():
    image = Sample(_texture(64, 0))
    answers = BACKEND.answer([image], [["Is the image clear?", *UNKNOWN_TEXTS]], ["Does this figure show x?"])
    assert answers.p_yes.shape == (1, 1 + len(UNKNOWN_TEXTS))
    assert answers.p_yes.dtype == torch.float32
    assert not math.isnan(answers.p_yes[0, 0])
    assert answers.p_yes[0, 1:].isnan().all()
    assert answers.alignment is None
    assert answers.source == SOURCE and "not a learned human-preference model" in answers.source
    assert any("alignment" in note for note in answers.notes)


def test_video_questions_are_unknown_for_an_image():
    texts = [t for family in VIDEO_ONLY for t in FAMILY_TEXTS[family]]
    assert _answer(Sample(_texture(64, 1)), texts).isnan().all()


def test_black_image_is_dark_and_white_image_is_bright():
    texts = ["Are the colors bright?", "Are the colors not dark?", "Are the colors dark?"]
    black = _answer(Sample(torch.zeros(3, 48, 48)), texts)
    white = _answer(Sample(torch.ones(3, 48, 48)), texts)
    assert white[0] > 0.95 and white[1] > 0.95 and white[2] < 0.05
    assert black[0] < 0.05 and black[1] < 0.05 and black[2] > 0.95
    assert torch.allclose(black[2], 1 - black[1])  # the negated question is the complement


def test_sharp_checkerboard_is_clearer_than_its_blurred_copy():
    texts = FAMILY_TEXTS["image clarity"]
    sharp = _answer(Sample(_checkerboard()), texts)
    blurred = _answer(Sample(_box_blur(_checkerboard())), texts)
    assert (sharp >= blurred).all() and (sharp > blurred).any()
    assert sharp[1] > 0.9  # "clear"
    assert blurred[2] < 0.5  # "avoid being blurry"
    flat = _answer(Sample(torch.full((3, 48, 48), 0.5)), texts)
    assert flat[-1] < 0.05  # a flat image is completely blurry


def test_mirrored_image_is_symmetrical_and_random_one_is_not():
    texts = FAMILY_TEXTS["symmetry"]
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    mirrored = torch.cat([noise[..., :32], noise[..., :32].flip(-1)], -1)
    sym = _answer(Sample(mirrored), texts)
    rand = _answer(Sample(noise), texts)
    assert sym[0] > 0.95 and sym[1] > 0.95
    assert rand[0] < 0.05


def test_flat_image_is_empty_and_textured_image_is_rich():
    texts = FAMILY_TEXTS["richness"]
    flat = _answer(Sample(torch.full((3, 64, 64), 0.5)), texts)
    noise = _answer(Sample(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))), texts)
    assert flat[-1] < 0.05  # not "not empty"
    assert noise[0] > 0.9  # very rich
    photo_like = _answer(Sample(_texture(96, 2)), texts)
    assert (photo_like > flat).all()


def test_grey_image_has_no_colour_and_no_lighting():
    grey = Sample(torch.full((3, 48, 48), 0.5))
    assert (_answer(grey, FAMILY_TEXTS["video colour"]) < 0.1).all()
    assert (_answer(grey, FAMILY_TEXTS["lighting"]) < 0.1).all()
    lit = torch.linspace(0.0, 1.0, 64).view(1, 1, 64).expand(3, 64, 64)  # light falling off across
    assert (_answer(Sample(lit), FAMILY_TEXTS["lighting"]) > 0.9).all()


def test_moving_object_is_more_dynamic_than_a_still_scene():
    texts = FAMILY_TEXTS["object motion"]
    still = _answer(Sample(_moving_square(12, 0.0), fps=8), texts)
    moving = _answer(Sample(_moving_square(12, 4.0), fps=8), texts)
    assert (still < 0.05).all()
    assert moving[-1] > 0.95  # not static
    assert (moving > still).all()
    # a small object over a still scene is not a camera move, even where the scene has no texture
    # for the camera's shift to lock on to
    for flat in (False, True):
        video = Sample(_moving_square(12, 4.0, flat=flat), fps=8)
        p = _answer(video, ["Is the camera motion not static?", "Is the object's motion not static?"])
        assert p[0] < 0.5 and p[1] > 0.9, f"flat background: {flat}"


def test_panning_camera_is_camera_motion():
    texts = FAMILY_TEXTS["camera motion"]
    pan = _answer(Sample(_pan(12, 4.0), fps=8), texts)
    still = _answer(Sample(_pan(12, 0.0), fps=8), texts)
    assert pan[1] > 0.9 and (still < 0.05).all()
    # once the camera's shift is undone nothing in the scene moves: not object motion
    assert _answer(Sample(_pan(12, 4.0), fps=8), ["Is the object's motion not minimal?"])[0] < 0.1


def test_shaky_camera_is_less_stable_than_a_steady_pan():
    texts = FAMILY_TEXTS["camera stability"]
    steady = _answer(Sample(_pan(16, 2.0), fps=8), texts)
    shaky = _answer(Sample(_pan(16, 2.0, jitter=4.0), fps=8), texts)
    assert steady[0] > 0.9
    assert shaky[1] < 0.1


def test_flickering_video_has_unstable_quality():
    texts = FAMILY_TEXTS["quality stability"]
    steady = _pan(12, 0.0)
    flicker = steady * torch.tensor([1.0, 0.55] * 6).view(12, 1, 1, 1)
    assert (_answer(Sample(steady, fps=8), texts) > 0.9).all()
    assert (_answer(Sample(flicker, fps=8), texts) < 0.1).all()


def test_motion_does_not_depend_on_the_frame_rate():
    slow = sample_statistics(Sample(_pan(12, 3.0), fps=8))
    fast = sample_statistics(Sample(_pan(34, 1.0), fps=24))  # the same pan sampled three times as often
    assert abs(slow["camera_motion"] - fast["camera_motion"]) < 0.1
    assert abs(slow["camera_stability"] - fast["camera_stability"]) < 0.3


def test_frame_statistics_of_a_video_use_the_per_second_frames():
    video = torch.ones(17, 3, 32, 32)
    video[[0, 8, 16]] = 0.0  # at 8 fps the frames at t = 0 s, 1 s, 2 s are black, all others white
    assert _answer(Sample(video, fps=8), ["Are the colors not dark?"])[0] < 0.05


def test_too_short_video_is_unknown_for_motion():
    p = _answer(Sample(torch.rand(1, 3, 32, 32), fps=8), FAMILY_TEXTS["object motion"])
    assert p.isnan().all()


def _random_images(count: int) -> list[Sample]:
    gen = torch.Generator().manual_seed(7)
    samples = []
    for i in range(count):
        contrast, mean = float(torch.rand(1, generator=gen)) * 0.3, float(torch.rand(1, generator=gen))
        image = _texture(64, 100 + i, contrast=contrast, mean=mean)
        if i % 3 == 0:
            image = _box_blur(image, 1 + 2 * (i % 5))
        samples.append(Sample(image))
    return samples


def test_ordinal_monotonicity_within_every_family():
    images = _random_images(12)
    videos = [Sample(_pan(10, s, size=48, seed=i, jitter=j), fps=8) for i, (s, j) in enumerate(
        [(0.0, 0.0), (1.0, 0.0), (3.0, 1.0), (0.0, 3.0), (4.0, 0.0)])]  # fmt: skip
    videos.append(Sample(_moving_square(10, 3.0, size=64), fps=8))
    for family, texts in FAMILY_TEXTS.items():
        samples = videos if family in VIDEO_ONLY else images + videos
        p = BACKEND.answer(samples, [texts] * len(samples)).p_yes
        assert not p.isnan().any(), family
        steps = p[:, 1:] - p[:, :-1]  # weaker question minus stronger one
        assert (steps >= -1e-6).all(), f"{family}: a stronger question got a higher p\n{p}"
        assert (steps > 1e-3).any(), f"{family}: the levels do not differ"
