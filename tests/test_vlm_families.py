"""Every VLM family the backend supports, on tiny random checkpoints built here and loaded through
``VLMBackend.from_pretrained`` (without torchvision when it is absent, the CPU default):

- the shared-prefix fast path equals one full pass per question (max |dp| <= 1e-5 in float32, the same
  hard answers) for images and for videos, with 1 and with 3 samples per forward pass;
- families without video input refuse videos instead of answering from the text;
- video frames reach the processor with their true indices and frame rate (prompt timestamps);
- templates that write BOS get one BOS; visuals that never reach the model are an error; an
  unsupported model type is an error naming the supported ones.
"""

from __future__ import annotations

import json

import pytest
import torch

from reward.backends.tiny_vlms import TINY_BUILDERS
from reward.backends.vlm import VLMBackend, VLMError
from reward.backends.vlm_families import FAMILIES
from reward.media import frame_indices_per_second
from reward.types import Sample

FAMILY_TYPES = [t for f in FAMILIES for t in f.model_types]
NO_VIDEO = {t for f in FAMILIES if f.video is None for t in f.model_types}
QUESTIONS = [
    "Is the image clear?",
    "Are the colors rich and bright?",
    "Is the composition symmetrical?",
    'Does this figure show "a red fox in snow"?',
    "Are there any letters present?",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {t: TINY_BUILDERS[t](root / t, seed=0) for t in FAMILY_TYPES}


_BACKENDS: dict[str, VLMBackend] = {}


def _backend(checkpoints, model_type: str) -> VLMBackend:
    if model_type not in _BACKENDS:
        torch.set_num_threads(1)
        _BACKENDS[model_type] = VLMBackend.from_pretrained(
            checkpoints[model_type], dtype="float32", device="cpu"
        )
    return _BACKENDS[model_type]


def _images() -> list[Sample]:
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 40, 60), (3, 100, 90), (3, 64, 64)]
    return [Sample(torch.rand(s, generator=gen), prompt="p", id=f"img{i}") for i, s in enumerate(shapes)]


def _videos() -> list[Sample]:
    """Three 3-second 8-fps clips of different sizes (4 frames each after per-second sampling)."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(24, 3, 32, 48), (24, 3, 40, 40), (23, 3, 48, 32)]
    return [
        Sample(torch.rand(s, generator=gen), prompt="p", fps=8.0, id=f"vid{i}") for i, s in enumerate(shapes)
    ]


@pytest.mark.parametrize("modality", ["image", "video"])
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_fast_path_equals_one_full_pass_per_question(checkpoints, model_type, modality):
    backend = _backend(checkpoints, model_type)
    samples = _images() if modality == "image" else _videos()
    rows = [QUESTIONS] * len(samples)
    if modality == "video" and model_type in NO_VIDEO:
        with pytest.raises(VLMError, match="takes no video input"):
            backend.answer(samples, rows)
        with pytest.raises(VLMError, match="takes no video input"):
            backend.answer_naive(samples, rows)
        return
    naive = backend.answer_naive(samples, rows).p_yes
    for batch_size in (3, 1):
        backend.batch_size = batch_size
        fast = backend.answer(samples, rows).p_yes
        assert fast.shape == (3, len(QUESTIONS))
        assert (fast - naive).abs().max().item() <= 1e-5, (model_type, modality, batch_size)
        assert torch.equal(fast >= 0.5, naive >= 0.5)
    backend.batch_size = 8
    assert naive.std() > 0.02  # the random model discriminates, or equality would prove little
    assert len({round(v, 4) for v in naive[:, 0].tolist()}) == 3  # the samples' pixels matter


def test_video_frames_and_their_times_reach_the_prompt(checkpoints):
    """A 3-second clip at 8 fps: frames 0, 8, 16, 23 (0, 1, 2 and 2.875 s) with the clip's frame rate,
    so each family writes the frames' true times into its prompt."""
    video = _videos()[0]
    picked = frame_indices_per_second(24, 8.0)
    assert picked == [0, 8, 16, 23]
    expected = {
        "qwen3_vl": ["<0.5 seconds>", "<2.4 seconds>"],  # the mean time of each 2-frame patch
        "smolvlm": ["Frame from 00:00:", "Frame from 00:01:", "Frame from 00:02:"],
        "glm4v": ["<|end_of_image|>0<|begin_of_image|>", "<|end_of_image|>2<|end_of_video|>"],
    }
    for model_type, needles in expected.items():
        backend = _backend(checkpoints, model_type)
        assert backend.video_metadata(video)["frames_indices"] == picked
        enc = backend.encode([video], [backend.render(video, "Is the video stable?")])
        text = backend.tokenizer.decode(enc["input_ids"][0])
        for needle in needles:
            assert needle in text, (model_type, needle, text[:300])
    # Qwen2.5-VL's rotary time axis: 2 frames per patch at the clip's sampled rate (4 frames in 3 s)
    backend = _backend(checkpoints, "qwen2_5_vl")
    enc = backend.encode([video], [backend.render(video, "Is the video stable?")])
    assert enc["second_per_grid_ts"].tolist() == pytest.approx([2 / (4 / 24 * 8.0)])


def test_frames_of_different_lengths_share_no_video_tensor(checkpoints):
    """Families that take videos as one [videos, frames, ...] tensor group clips by frame count."""
    gen = torch.Generator().manual_seed(3)
    clips = [Sample(torch.rand(t, 3, 32, 32, generator=gen), fps=8.0, id=f"c{t}") for t in (24, 12, 25, 13)]
    rows = [QUESTIONS[:2]] * len(clips)
    for model_type in ("llava_onevision", "qwen2_vl"):
        backend = _backend(checkpoints, model_type)
        together = backend.answer(clips, rows).p_yes
        alone = torch.cat([backend.answer([c], rows[:1]).p_yes for c in clips])
        assert (together - alone).abs().max().item() <= 1e-5, model_type


@pytest.mark.parametrize("model_type", ["gemma3", "idefics3"])
def test_a_template_that_writes_bos_gets_one_bos(checkpoints, model_type):
    backend = _backend(checkpoints, model_type)
    bos = backend.tokenizer.bos_token_id
    assert backend.tokenizer("x")["input_ids"][0] == bos  # this tokenizer adds BOS by itself ...
    text = backend.render("image", "Is the image clear?")
    assert text.startswith(backend.tokenizer.bos_token)  # ... and the template writes one too
    enc = backend.encode(_images()[:1], [text])
    ids = enc["input_ids"][0].tolist()
    assert ids[0] == bos and ids.count(bos) == 1


class DropVisuals:
    """A processor that loses the image: placeholders removed, no pixels (what a broken one does)."""

    def __init__(self, inner, placeholder: str) -> None:
        self.inner, self.placeholder = inner, placeholder

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, text, images=None, videos=None, **kwargs):
        kwargs.pop("video_metadata", None)
        return self.inner(text=[t.replace(self.placeholder, "") for t in text], **kwargs)


def test_visuals_that_never_reach_the_model_are_an_error(checkpoints):
    backend = _backend(checkpoints, "qwen2_vl")
    broken = VLMBackend(backend.model, DropVisuals(backend.processor, "<|image_pad|>"), source="broken")
    with pytest.raises(VLMError, match="img0: the image did not reach broken"):
        broken.answer(_images(), [QUESTIONS] * 3)
    with pytest.raises(VLMError, match="did not reach"):
        broken.answer_naive(_images()[:1], [QUESTIONS[:1]])


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    folder = tmp_path / "paligemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    with pytest.raises(VLMError) as err:
        VLMBackend.from_pretrained(folder, dtype="float32", device="cpu")
    message = str(err.value)
    assert str(folder) in message and "'paligemma'" in message
    for family in FAMILIES:
        assert family.name in message and family.model_types[0] in message


def test_a_missing_processor_dependency_is_named(checkpoints, monkeypatch, tmp_path, capsys):
    """SmolVLM's processor needs num2words: without it the error says so, on one line, exit 2."""
    from transformers.models.smolvlm import processing_smolvlm

    from reward.cli import main

    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    with pytest.raises(VLMError, match="num2words"):
        VLMBackend.from_pretrained(checkpoints["smolvlm"], dtype="float32", device="cpu")
    image = tmp_path / "a.png"
    from reward.media import save_image

    save_image(image, _images()[0].pixels)
    code = main(["score", "--checklist", "image-official", "--backend", "vlm", "--model", str(checkpoints["smolvlm"]),
                 "--images", str(image), "--out", str(tmp_path / "s.parquet"), "--dtype", "float32",
                 "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "num2words" in err[0] and str(checkpoints["smolvlm"]) in err[0]


def test_a_torchvision_that_does_not_load_is_named(checkpoints, monkeypatch):
    """Installed but broken (the registry's wheel beside a CPU torch): one clear error, not a traceback."""
    import sys

    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # importing it now fails
    with pytest.raises(VLMError, match="torchvision is installed but does not load"):
        VLMBackend.from_pretrained(checkpoints["qwen2_vl"], dtype="float32", device="cpu")
