"""VLM answer backend on a tiny random Qwen2-VL: the shared-prefix batch equals the release's way.

The tiny checkpoint is built once per session and loaded back only through
``VLMBackend.from_pretrained`` (the real loading path). Everything runs in float32 on the CPU.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from reward.backends.alignment import AlignedBackend
from reward.backends.tiny_vlm import build_tiny_qwen2_vl
from reward.backends.video_frames import QwenFramesProcessor
from reward.backends.vlm import VLMBackend, VLMError
from reward.checklist import load_checklist
from reward.media import frame_indices_per_second
from reward.types import Sample

PROMPT = "a red fox in snow"


@pytest.fixture(scope="session")
def tiny_vlm_path(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl") / "model", seed=0)


@pytest.fixture(scope="module")
def backend(tiny_vlm_path):
    torch.set_num_threads(1)
    return VLMBackend.from_pretrained(tiny_vlm_path, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def questions():
    checklist = load_checklist("image-official")
    return checklist.question_texts(PROMPT), checklist.alignment_text(PROMPT)


def _samples() -> list[Sample]:
    """Three images of different sizes (6, 9 and 16 visual tokens) and a 3-second 8-fps video."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 40, 60), (3, 100, 90), (3, 64, 64)]
    images = [Sample(torch.rand(s, generator=gen), prompt=PROMPT, id=f"img{i}") for i, s in enumerate(shapes)]
    video = Sample(torch.rand(24, 3, 32, 48, generator=gen), prompt=PROMPT, fps=8.0, id="vid")
    return [*images, video]


@pytest.fixture(scope="module")
def fast_and_naive(backend, questions):
    qs, align = questions
    samples = _samples()
    rows = [qs] * len(samples)
    aligns = [align] * len(samples)
    return samples, backend.answer(samples, rows, aligns), backend.answer_naive(samples, rows, aligns)


def test_shared_prefix_equals_one_full_pass_per_question(fast_and_naive, questions):
    samples, fast, naive = fast_and_naive
    assert fast.p_yes.shape == (len(samples), len(questions[0])) == (4, 30)
    assert fast.p_yes.dtype == torch.float32
    torch.testing.assert_close(fast.p_yes, naive.p_yes, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.alignment, naive.alignment, atol=1e-4, rtol=0)
    # The random model must actually discriminate, or equality would prove little.
    assert fast.p_yes.std() > 0.05
    assert fast.source.startswith("vlm:") and str(samples[0].id) not in fast.source


class AllowOnly(LogitsProcessor):
    """Greedy decoding restricted to the answer tokens (a random model's top token is rarely one)."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = torch.tensor(allowed)

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked


def test_hard_answer_equals_greedy_generate_first_token(backend, fast_and_naive, questions):
    samples, fast, _ = fast_and_naive
    restrict = LogitsProcessorList([AllowOnly(backend.yes_ids + backend.no_ids)])
    checked = [0, 1, 3]  # two images and the video
    said_yes = torch.zeros(len(checked), len(questions[0]), dtype=torch.bool)
    for i, row in enumerate(checked):
        for j, question in enumerate(questions[0]):
            inputs = backend.encode([samples[row]], [backend.render(samples[row], question)])
            out = backend.model.generate(
                **inputs, max_new_tokens=1, do_sample=False, logits_processor=restrict
            )
            token = int(out[0, -1])
            assert token in backend.yes_ids + backend.no_ids
            said_yes[i, j] = token in backend.yes_ids
    hard = fast.p_yes[checked] >= 0.5
    assert torch.equal(hard, said_yes)
    assert hard.any() and (~hard).any()  # both answers occur, so the comparison can fail


def test_generate_readout_equals_forward_readout(backend, questions):
    sample = _samples()[0]
    qs = questions[0][:4]
    plain = backend.answer_naive([sample], [qs])
    generated = backend.answer_naive([sample], [qs], use_generate=True)
    torch.testing.assert_close(generated.p_yes, plain.p_yes, atol=1e-5, rtol=0)


def test_batching_samples_changes_nothing(backend, fast_and_naive, questions):
    samples, together, _ = fast_and_naive
    qs, align = questions
    alone = [backend.answer([s], [qs], [align]) for s in samples]
    torch.testing.assert_close(torch.cat([a.p_yes for a in alone]), together.p_yes, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([a.alignment for a in alone]), together.alignment, atol=1e-5, rtol=0)


def test_question_chunks_bound_the_cache_and_change_nothing(tiny_vlm_path, fast_and_naive, questions):
    samples, together, _ = fast_and_naive
    qs, align = questions
    chunked = VLMBackend.from_pretrained(tiny_vlm_path, dtype="float32", device="cpu", question_chunk=7)
    answers = chunked.answer(samples, [qs] * len(samples), [align] * len(samples))
    torch.testing.assert_close(answers.p_yes, together.p_yes, atol=1e-5, rtol=0)
    torch.testing.assert_close(answers.alignment, together.alignment, atol=1e-5, rtol=0)


def test_alignment_row_present_or_absent(backend, fast_and_naive, questions, tiny_vlm_path, tmp_path):
    samples, with_alignment, _ = fast_and_naive
    qs, align = questions
    without = backend.answer(samples[:2], [qs] * 2)
    assert without.alignment is None
    torch.testing.assert_close(without.p_yes, with_alignment.p_yes[:2], atol=1e-5, rtol=0)
    # the alignment term is p(yes) to the alignment question, asked like any other
    asked = backend.answer(samples[:2], [[align]] * 2)
    torch.testing.assert_close(with_alignment.alignment[:2], asked.p_yes[:, 0], atol=1e-5, rtol=0)

    other = VLMBackend.from_pretrained(build_tiny_qwen2_vl(tmp_path / "other", seed=7), dtype="float32")
    separate = AlignedBackend(backend, other).answer(samples[:2], [qs] * 2, [align] * 2)
    torch.testing.assert_close(separate.p_yes, without.p_yes, atol=1e-6, rtol=0)
    torch.testing.assert_close(separate.alignment, other.answer(samples[:2], [[align]] * 2).p_yes[:, 0])
    assert not torch.allclose(separate.alignment, with_alignment.alignment[:2], atol=1e-3)
    assert any("alignment" in note for note in separate.notes)


class RecordingProcessor:
    """Passes calls through to the real processor and keeps the videos it was given."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.videos: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, **kwargs):
        self.videos.extend(kwargs.get("videos") or [])
        return self.inner(**kwargs)


def test_video_is_sampled_one_frame_per_second(backend):
    video = _samples()[3]  # 24 frames at 8 fps: 3 s -> frames at 0, 1, 2, 3 s
    spy = RecordingProcessor(backend.processor)
    recording = VLMBackend(backend.model, spy, source="spy")
    recording.answer([video], [["Is the video stable?", "Is the motion smooth?"]])
    assert len(spy.videos) == 1
    frames = spy.videos[0]
    assert frames.shape == (4, 3, 32, 48) and frames.dtype == torch.uint8
    picked = frame_indices_per_second(24, 8.0)
    assert picked == [0, 8, 16, 23]
    expected = (video.pixels[picked] * 255).round().to(torch.uint8)
    assert torch.equal(frames, expected)
    capped = VLMBackend(backend.model, spy, source="spy", max_frames=2)
    assert capped.visual_input(video).shape[0] == 2


def test_frame_video_layout_puts_consecutive_frames_in_one_patch(tiny_vlm_path):
    """Constant-colour frames: each video patch must hold frames (2g, 2g+1) in its time slots."""
    frames = torch.stack([torch.full((3, 56, 56), 40 * k, dtype=torch.uint8) for k in range(5)])
    processor = QwenFramesProcessor.from_checkpoint(tiny_vlm_path)
    out = processor([frames])
    assert out["video_grid_thw"].tolist() == [[3, 4, 4]]  # 5 frames -> 6 (last repeated) -> 3 groups
    p = processor.patch_size
    patches = out["pixel_values_videos"].reshape(3, 16, 3, 2, p * p)
    level = patches[:, :, 0, :, :].mean(dim=(1, 3))  # red channel, [group, time slot]
    order = level.flatten()
    assert torch.all(order[1:5] > order[:4])  # frames 0..4 in order, then the repeat of frame 4
    assert torch.isclose(order[5], order[4])


def test_processor_without_chat_template_is_a_clear_error(tiny_vlm_path, tmp_path):
    broken = tmp_path / "no_template"
    shutil.copytree(tiny_vlm_path, broken)
    (broken / "chat_template.jinja").unlink()
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(VLMError, match="no chat template") as err:
        VLMBackend.from_pretrained(broken, dtype="float32")
    assert str(broken) in str(err.value)


def test_logsumexp_reduce_matches_naive_and_differs_from_max(tiny_vlm_path, backend, questions):
    pooled = VLMBackend(backend.model, backend.processor, source="x", answer_reduce="logsumexp")
    samples, qs = _samples()[:1], [questions[0][:6]]
    fast = pooled.answer(samples, qs)
    torch.testing.assert_close(fast.p_yes, pooled.answer_naive(samples, qs).p_yes, atol=1e-4, rtol=0)
    assert not torch.allclose(fast.p_yes, backend.answer(samples, qs).p_yes, atol=1e-3)


def test_mismatched_question_lists_name_the_sample(backend):
    samples = _samples()[:2]
    with pytest.raises(VLMError, match="img1"):
        backend.answer(samples, [["Is it clear?", "Is it bright?"], ["Is it clear?"]])
    with pytest.raises(VLMError, match="alignment"):
        backend.answer(samples, [["Is it clear?"]] * 2, ["Does it show a fox?"])


def test_reward_built_from_a_recipe_scores_with_the_vlm(tiny_vlm_path, backend, fast_and_naive, questions):
    """The reward contract end to end: recipe section -> build_backend -> VisionReward.score."""
    from mpo.config import RewardConfig
    from reward.visionreward import VisionReward

    cfg = RewardConfig(
        checklist="image-official",
        backend="vlm",
        model_path=str(tiny_vlm_path),
        dtype="float32",
        batch_size=2,
    )
    reward = VisionReward.from_config(cfg)
    assert isinstance(reward.backend, VLMBackend)
    samples, answers, _ = fast_and_naive
    scores = reward.score(samples[:3])
    torch.testing.assert_close(scores.p_yes.float(), answers.p_yes[:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.alignment.float(), answers.alignment[:3], atol=1e-5, rtol=0)
    assert torch.isfinite(scores.total).all() and scores.source == f"vlm:{tiny_vlm_path}"
