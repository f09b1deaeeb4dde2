"""The torchvision-free video processors: same prompts and layouts as the library's torchvision ones.

The comparison with the library needs torchvision (skipped without it, the CPU default); the rest runs
everywhere.
"""

from __future__ import annotations

import pytest
import torch

from reward.backends.tiny_vlms import TINY_BUILDERS
from reward.backends.video_frames import FixedSizeFramesProcessor, QwenFramesProcessor
from reward.backends.vlm_families import FAMILIES, _processor_without_torchvision, family_of

VIDEO_TYPES = [t for f in FAMILIES if f.video is not None for t in f.model_types]
METADATA = {"total_num_frames": 32, "fps": 8.0, "frames_indices": [0, 8, 16, 24], "duration": 4.0}


def _clips(n: int = 3) -> list[torch.Tensor]:
    """Smooth random clips (4 frames, 50x70: every family resizes them), as uint8."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 4, 3, 10, 14, generator=gen)
    return [
        (torch.nn.functional.interpolate(c, size=(50, 70), mode="bilinear") * 255).round().to(torch.uint8)
        for c in coarse
    ]


def test_metadata_passes_through_and_sampling_is_refused():
    processor = QwenFramesProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    out = processor(_clips(1), video_metadata=[METADATA], return_metadata=True)
    meta = out["video_metadata"][0]
    assert meta.frames_indices == [0, 8, 16, 24] and meta.fps == 8.0 and meta.timestamps == [0, 1, 2, 3]
    assert (meta.height, meta.width) == (50, 70)
    with pytest.raises(ValueError, match="sampled by the reward"):
        processor(_clips(1), do_sample_frames=True)
    with pytest.raises(ValueError, match="already"):
        QwenFramesProcessor(do_sample_frames=True)
    with pytest.raises(ValueError, match="same number of frames"):
        FixedSizeFramesProcessor(size={"height": 28, "width": 28})([_clips(1)[0], _clips(1)[0][:3]])


@pytest.mark.parametrize("model_type", VIDEO_TYPES)
def test_matches_the_library_video_processor(tmp_path, model_type):
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    path = TINY_BUILDERS[model_type](tmp_path / model_type)
    library = AutoProcessor.from_pretrained(path)
    ours = _processor_without_torchvision(str(path), family_of(model_type))
    tokenizer = library.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Is it clear?"}]}],
        chat_template=library.chat_template or tokenizer.chat_template,
        tokenize=False,
        add_generation_prompt=True,
    )
    kwargs = {"text": [text] * 3, "videos": _clips(), "video_metadata": [METADATA] * 3, "do_sample_frames": False,
              "padding": True, "return_tensors": "pt", "add_special_tokens": False}  # fmt: skip
    want, got = library(**kwargs), ours(**kwargs)
    assert sorted(want) == sorted(got)
    for key, value in want.items():
        if value.is_floating_point() and "pixel" in key:
            # PIL and torchvision round the resized frames differently, by about one level in 255
            diff = (value - got[key]).abs()
            assert diff.max() < 0.05 and diff.mean() < 1e-3, (key, diff.max(), diff.mean())
        else:
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)
