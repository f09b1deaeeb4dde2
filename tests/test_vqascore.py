"""VQAScore on CLIP-FlanT5: a tiny checkpoint in the release layout, loaded back by weight name; the score
equals the release's computation written out here (the library's T5 loss on spliced embeddings); a batch
scores like one image at a time; a recipe's ``alignment_model_path`` picks it for the alignment term."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from reward.backends.tiny_clip_flant5 import build_tiny_clip_flant5
from reward.backends.vqascore import SYSTEM, VQAScoreBackend, VQAScoreError, conversation
from reward.types import Sample

PROMPTS = ["a red fox in snow", "a cat", "a photo of a dog on a city street at night", "a bowl of fruit"]
IMAGE_TOKEN = -200  # the release's placeholder id


def _question(prompt: str) -> str:
    return f'Does this figure show "{prompt}"? Please answer yes or no.'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_clip_flant5(tmp_path_factory.mktemp("vqascore") / "clip-flant5", seed=0)


@pytest.fixture(scope="module")
def backend(checkpoint):
    torch.set_num_threads(1)
    return VQAScoreBackend.from_pretrained(checkpoint, dtype="float32", device="cpu", batch_size=4)


def _images() -> list[Sample]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 40, 60), (3, 30, 30), (3, 64, 20), (3, 50, 50)]
    return [
        Sample(torch.rand(s, generator=gen), prompt=p, id=f"i{k}")
        for k, (s, p) in enumerate(zip(shapes, PROMPTS))
    ]


@torch.no_grad()
def release_score(backend: VQAScoreBackend, sample: Sample, question: str) -> float:
    """The release's steps, written out: token ids with the image placeholder, its embedding row
    replaced by the projected patch features, labels = tokenizer("Yes"), exp(-T5 loss)."""
    tokenizer, model = backend.tokenizer, backend.model
    prompt = f"{SYSTEM} USER: <image>\n{question} ASSISTANT: "
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids = chunks[0] + [IMAGE_TOKEN] + chunks[1]
    pixels = backend.pixel_values([sample])
    hidden = model.vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    features = model.projector(hidden)[0]
    at = input_ids.index(IMAGE_TOKEN)
    embed = model.t5.get_input_embeddings()
    embeds = torch.cat(
        [embed(torch.tensor(input_ids[:at])), features, embed(torch.tensor(input_ids[at + 1 :]))]
    )[None]
    labels = torch.tensor([tokenizer("Yes").input_ids])
    loss = model.t5(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2]), labels=labels).loss
    return float((-loss).exp())


def test_release_layout_loads_by_weight_name(checkpoint, backend):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    saved = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(checkpoint / shard), framework="pt") as handle:
            saved.update({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118
    assert any(k.startswith("vision_tower.vision_tower.vision_model.") for k in saved)
    assert {"mm_projector.0.weight", "mm_projector.2.bias", "shared.weight", "lm_head.weight"} <= set(saved)
    model = backend.model
    for name, value in model.vision.state_dict().items():
        if not name.endswith("position_ids"):
            release_name = "vision_tower.vision_tower.vision_model." + name.removeprefix("vision_model.")
            torch.testing.assert_close(value, saved[release_name], rtol=0, atol=0)
    for name, value in model.projector.state_dict().items():
        torch.testing.assert_close(value, saved[f"mm_projector.{name}"], rtol=0, atol=0)
    for name, value in model.t5.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    assert backend.tokenizer.convert_ids_to_tokens(backend.answer_ids) == ["▁Yes", "</s>"]


def test_score_equals_the_releases_computation(backend):
    samples = _images()
    scores = backend.scores(samples, [_question(s.prompt) for s in samples])
    expected = torch.tensor([release_score(backend, s, _question(s.prompt)) for s in samples])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    assert ((scores > 0) & (scores < 1)).all()
    # the score depends on the image and on the prompt
    assert len({round(float(v), 8) for v in backend.scores(samples, [_question("a cat")] * 4)}) == 4
    same_image = backend.scores([samples[0]] * 4, [_question(p) for p in PROMPTS])
    assert len({round(float(v), 8) for v in same_image}) == 4


def test_a_batch_scores_like_one_image_at_a_time(backend):
    samples = _images()
    questions = [_question(s.prompt) for s in samples]  # different lengths: padded in the batch
    together = backend.scores(samples, questions)
    alone = torch.cat([backend.scores([s], [q]) for s, q in zip(samples, questions)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=0)
    answers = backend.answer(samples, [[q] for q in questions], questions)
    torch.testing.assert_close(answers.p_yes[:, 0], together)
    torch.testing.assert_close(answers.alignment, together)
    torch.testing.assert_close(backend.answer_naive(samples, [[q] for q in questions]).p_yes[:, 0], together)


def test_tower_weights_from_mm_vision_tower_and_bin_shards(tmp_path, backend):
    """The other layout: no tower weights in the checkpoint (taken from mm_vision_tower), .bin shards."""
    other = build_tiny_clip_flant5(
        tmp_path / "cft5", seed=0, tower_weights_in_checkpoint=False, safetensors=False
    )
    loaded = VQAScoreBackend.from_pretrained(other, dtype="float32", device="cpu")
    samples = _images()[:2]
    questions = [_question(s.prompt) for s in samples]
    torch.testing.assert_close(
        loaded.scores(samples, questions), backend.scores(samples, questions), rtol=1e-6, atol=0
    )


def test_bad_checkpoints_name_the_path_and_key(tmp_path, checkpoint):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(
        json.dumps({**config, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 7})
    )
    with pytest.raises(VQAScoreError, match=r"broken \(mm_projector\.\*\): weights do not match"):
        VQAScoreBackend.from_pretrained(broken, dtype="float32", device="cpu")
    (broken / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "mm_vision_tower"})
    )
    with pytest.raises(VQAScoreError, match="mm_vision_tower"):
        VQAScoreBackend.from_pretrained(broken, dtype="float32", device="cpu")
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    with pytest.raises(VQAScoreError, match="is not 'clip_t5'"):
        VQAScoreBackend.from_pretrained(broken, dtype="float32", device="cpu")
    with pytest.raises(VQAScoreError, match="scores images, not videos"):
        VQAScoreBackend.from_pretrained(checkpoint, dtype="float32").scores(
            [Sample(torch.rand(4, 3, 8, 8))], ["q"]
        )


def test_the_recipe_key_picks_vqascore_or_a_vlm_for_alignment(checkpoint, backend, tmp_path):
    """reward.alignment_model_path: a CLIP-FlanT5 checkpoint gives VQAScore; a VLM gives its p(yes)."""
    from mpo.schema import RewardConfig
    from reward.backends.tiny_vlm import build_tiny_qwen2_vl
    from reward.backends.vlm import VLMBackend
    from reward.visionreward import VisionReward

    vlm_path = build_tiny_qwen2_vl(tmp_path / "qwen2_vl", seed=0)
    samples = _images()[:3]
    common = {
        "checklist": "image-official",
        "backend": "vlm",
        "model_path": str(vlm_path),
        "dtype": "float32",
    }
    official = VisionReward.from_config(
        RewardConfig(**common, alignment_model_path=str(checkpoint)), device="cpu"
    )
    scores = official.score(samples)
    questions = [official.checklist.alignment_text(s.prompt) for s in samples]
    assert questions[0] == _question(samples[0].prompt)  # the release's VQAScore question
    torch.testing.assert_close(
        scores.alignment, backend.scores(samples, questions).double(), rtol=1e-5, atol=0
    )

    approximation = VisionReward.from_config(
        RewardConfig(**common, alignment_model_path=str(vlm_path)), device="cpu"
    )
    vlm = VLMBackend.from_pretrained(vlm_path, dtype="float32", device="cpu")
    asked = vlm.answer(samples, [[q] for q in questions]).p_yes[:, 0]
    torch.testing.assert_close(approximation.score(samples).alignment, asked.double(), atol=1e-5, rtol=0)
    # the questions are the checklist VLM's either way; only the alignment term differs
    torch.testing.assert_close(approximation.score(samples).p_yes, scores.p_yes, atol=1e-5, rtol=0)
    assert not torch.allclose(scores.alignment, approximation.score(samples).alignment, atol=1e-3)


def test_images_are_padded_to_a_square_with_the_mean_colour(backend):
    """A 20x60 strip: padded to 60x60 with the processor's mean colour above and below, so after
    normalisation the top and bottom bands are (nearly) zero and the middle is the image."""
    strip = Sample(torch.ones(3, 20, 60))  # white
    pixels = backend.pixel_values([strip])[0]  # [3, 28, 28]
    assert pixels.shape == (3, 28, 28)
    assert pixels[:, :8].abs().max() < 0.02 and pixels[:, -8:].abs().max() < 0.02
    assert pixels[:, 12:16].min() > 1.5  # white, normalised


def test_conversation_matches_the_release_format():
    before, after = conversation("Q?")
    assert before + "<image>" + after == f"{SYSTEM} USER: <image>\nQ? ASSISTANT: "


def test_reward_score_takes_the_alignment_model_on_the_command_line(checkpoint, backend, tmp_path):
    import pandas as pd

    from reward.cli import main
    from reward.media import load_image, save_image

    paths = []
    for k, sample in enumerate(_images()[:2]):
        paths.append(tmp_path / f"img{k}.png")
        save_image(paths[-1], sample.pixels)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "scores.parquet"
    code = main(["score", "--checklist", "image-official", "--backend", "pixel-stats", "--alignment-model",
                 str(checkpoint), "--images", *map(str, paths), "--prompts", str(prompts), "--out", str(out),
                 "--dtype", "float32", "--device", "cpu"])  # fmt: skip
    assert code == 0
    frame = pd.read_parquet(out)
    samples = [load_image(p, prompt) for p, prompt in zip(paths, PROMPTS[:2])]
    expected = backend.scores(samples, [_question(p) for p in PROMPTS[:2]])
    assert frame["alignment"].tolist() == pytest.approx(expected.tolist(), rel=1e-5)
