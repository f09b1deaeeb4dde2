"""The native CogVLM2 port: both release layouts load into it exactly, the release's prompt layout and
answer rules, and the shared-prefix fast path equals one full forward per question.

Tiny random image and video models are built in code (``reward.backends.cogvlm2.tiny``), saved in the
transformers remote-code layout (the release's weight names, with remote-code files that raise if
imported) and in the SAT layout, and loaded back only through the real loaders. Float32 on the CPU.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from reward.backends import build_backend
from reward.backends.cogvlm2.backend import CogVLM2Backend, release_queries
from reward.backends.cogvlm2.config import CogVLM2Error
from reward.backends.cogvlm2.loading import detect_layout, load_model
from reward.backends.cogvlm2.modeling import VISION, expert_mask, position_ids
from reward.backends.cogvlm2.tiny import (
    build_tiny_model,
    save_remote_layout,
    save_sat_layout,
    tiny_answer_ids,
    tiny_config,
    tiny_tokenizer,
)
from reward.checklist import load_checklist
from reward.cli import main as reward_main
from reward.convert import convert
from reward.types import Sample

PROMPT = "a red fox in snow"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def built(tokenizer):
    """The directly built tiny models: image (visual expert), video, and the image model of the SAT
    code (its adapter convolution keeps the vision width)."""
    torch.set_num_threads(1)
    answers = tiny_answer_ids(tokenizer)
    return {
        "image": build_tiny_model(tiny_config("image", tokenizer), seed=1, answer_ids=answers),
        "video": build_tiny_model(tiny_config("video", tokenizer), seed=2, answer_ids=answers),
        "sat": build_tiny_model(
            tiny_config("image", tokenizer, adapter_width=32), seed=4, answer_ids=answers
        ),
    }


@pytest.fixture(scope="module")
def remote(tmp_path_factory, built, tokenizer):
    root = tmp_path_factory.mktemp("cogvlm2_remote")
    return {v: save_remote_layout(built[v], tokenizer, root / v) for v in ("image", "video")}


@pytest.fixture(scope="module")
def backends(remote):
    return {v: CogVLM2Backend.from_pretrained(p, dtype="float32", device="cpu") for v, p in remote.items()}


def _state_equal(a, b) -> list[str]:
    """Names whose tensors differ (the inv_freq buffers are compared by value: they stay float32)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    same_dtype = [k for k in sa if not k.endswith("inv_freq")]
    return [
        k
        for k in sa
        if (k in same_dtype and sa[k].dtype != sb[k].dtype) or not torch.equal(sa[k].float(), sb[k].float())
    ]


def _samples(modality: str) -> list[Sample]:
    gen = torch.Generator().manual_seed(3)
    if modality == "image":
        return [
            Sample(torch.rand(3, h, w, generator=gen), prompt=PROMPT, id=f"img{i}")
            for i, (h, w) in enumerate([(20, 30), (40, 16), (16, 16)])
        ]
    # 1, 3 and 5 frames after per-second sampling: prefixes of different lengths in one batch
    shapes = [(4, 8.0), (12, 4.0), (10, 2.0)]
    return [
        Sample(torch.rand(t, 3, 18, 24, generator=gen), prompt=PROMPT, fps=fps, id=f"vid{i}")
        for i, (t, fps) in enumerate(shapes)
    ]


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("variant", ["image", "video"])
def test_remote_code_layout_loads_by_weight_name_without_running_its_code(remote, built, variant):
    path = remote[variant]
    assert detect_layout(path) == ("remote", str(path))
    model = load_model(path, dtype=torch.float32)
    assert _state_equal(model, built[variant]) == []
    assert model.config.variant == variant and model.config.vision_expert == (variant == "image")
    assert not [m for m in sys.modules if m.startswith("transformers_modules")]
    # the rotary inverse frequencies are the checkpoint's (stored in bf16), not recomputed ones
    stored = {k: v for f in path.glob("model-*.safetensors") for k, v in load_file(str(f)).items()}
    assert stored["model.layers.0.self_attn.rotary_emb.inv_freq"].dtype == torch.bfloat16
    fresh = model.model.layers[0].self_attn.rotary_emb.compute_inv_freq()
    loaded = model.model.layers[0].self_attn.rotary_emb.inv_freq
    assert torch.equal(loaded, fresh.to(torch.bfloat16).float()) and not torch.equal(loaded, fresh)


def test_sat_checkpoint_converts_to_exactly_the_directly_built_model(tmp_path, built, tokenizer):
    sat = save_sat_layout(built["sat"], tmp_path / "sat")
    tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "converted"
    assert (
        reward_main(
            ["convert", str(sat), "--out", str(out), "--tokenizer", str(tmp_path / "tok"), "--dtype", "keep"]
        )
        == 0
    )
    model = load_model(out, dtype=torch.float32)
    assert _state_equal(model, built["sat"]) == []
    assert model.config.adapter_width == 32 and model.config.template_version == "vqa"
    assert detect_layout(out)[0] == "native"


def test_sat_split_tar_parts_and_the_bf16_release(tmp_path, built, tokenizer):
    sat = save_sat_layout(built["sat"], tmp_path / "release" / "visionreward_image", dtype=torch.bfloat16)
    tokenizer.save_pretrained(tmp_path / "tok")
    subprocess.run(["tar", "cf", str(tmp_path / "all.tar"), "-C", str(sat.parent), sat.name], check=True)
    (tmp_path / "hub" / "ckpts").mkdir(parents=True)
    subprocess.run(
        ["split", "-b", "40000", str(tmp_path / "all.tar"), str(tmp_path / "hub" / "ckpts" / "split_part_")],
        check=True,
    )
    parts = sorted((tmp_path / "hub" / "ckpts").iterdir())
    assert len(parts) > 3
    out = convert(str(tmp_path / "hub"), tmp_path / "out", tokenizer=str(tmp_path / "tok"), dtype="keep")
    model = load_model(out, dtype=torch.bfloat16)
    assert _state_equal(model, copy.deepcopy(built["sat"]).to(torch.bfloat16)) == []
    assert not (tmp_path / "out.extract").exists()  # the extraction is cleaned up
    parts[1].unlink()  # a missing part is named
    with pytest.raises(CogVLM2Error, match=r"split_part_ab: missing part"):
        convert(str(tmp_path / "hub"), tmp_path / "out2", tokenizer=str(tmp_path / "tok"))


def test_layouts_that_do_not_match_name_the_first_odd_weight(tmp_path, remote, built):
    broken = tmp_path / "broken"
    shutil.copytree(remote["video"], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    weights = load_file(str(shard))
    dropped = sorted(k for k in weights if not k.endswith("inv_freq"))[0]
    weights.pop(dropped)
    weights["model.vision.extra.weight"] = torch.zeros(2)
    save_file(weights, str(shard), metadata={"format": "pt"})
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(dropped)
    index["weight_map"]["model.vision.extra.weight"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CogVLM2Error, match=rf"weight '{dropped}' is missing"):
        load_model(broken, dtype=torch.float32)
    weights[dropped] = torch.zeros(
        load_file(str(sorted(remote["video"].glob("model-*.safetensors"))[0]))[dropped].shape
    )
    save_file(weights, str(shard), metadata={"format": "pt"})
    index["weight_map"][dropped] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CogVLM2Error, match=r"unexpected weight 'model\.vision\.extra\.weight'"):
        load_model(broken, dtype=torch.float32)
    # an image checkpoint's config over video weights: the first vision-expert weight is missing
    config = json.loads((remote["video"] / "config.json").read_text())
    config["architectures"] = ["CogVLMForCausalLM"]
    mixed = tmp_path / "mixed"
    shutil.copytree(remote["video"], mixed)
    (mixed / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CogVLM2Error, match=r"weight 'model\.layers\.0\.mlp\.vision_mlp\.down_proj\.weight' is missing"
    ):
        load_model(mixed, dtype=torch.float32)

    sat = save_sat_layout(built["sat"], tmp_path / "sat")
    state = torch.load(sat / "1" / "mp_rank_00_model_states.pt", weights_only=True)
    state["module"]["mixins.eva.extra_adapter.weight"] = torch.zeros(3)
    torch.save(state, sat / "1" / "mp_rank_00_model_states.pt")
    with pytest.raises(CogVLM2Error, match=r"unexpected SAT weight 'mixins\.eva\.extra_adapter\.weight'"):
        convert(str(sat), tmp_path / "out", tokenizer=str(remote["video"]))
    (sat / "1" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CogVLM2Error, match=r"mp_rank_00_model_states\.pt: missing shard"):
        convert(str(sat), tmp_path / "out", tokenizer=str(remote["video"]))


def test_unknown_family_and_unconverted_sat_release_are_clear_errors(tmp_path, monkeypatch):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(CogVLM2Error, match=r"llama: not a CogVLM2 checkpoint.*LlamaForCausalLM"):
        build_backend("cogvlm2", model_path=str(other), dtype="float32", device="cpu")
    with pytest.raises(CogVLM2Error, match="not a CogVLM2 checkpoint"):
        convert(str(other), tmp_path / "out")
    monkeypatch.setenv("MPO_REWARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CogVLM2Error, match=r"reward convert THUDM/VisionReward-Image"):
        build_backend("vlm", model_path="THUDM/VisionReward-Image", dtype="float32", device="cpu")


def test_a_converted_hub_release_is_found_where_recipes_name_it(tmp_path, monkeypatch, remote):
    monkeypatch.setenv("MPO_REWARD_CACHE", str(tmp_path / "cache"))
    convert(str(remote["image"]), tmp_path / "cache" / "THUDM--VisionReward-Image", dtype="float32")
    backend = build_backend("vlm", model_path="THUDM/VisionReward-Image", dtype="float32", device="cpu")
    assert isinstance(backend, CogVLM2Backend) and backend.config.variant == "image"


# ------------------------------------------------------------------------------------------ release rules
def test_token_layout_positions_and_experts_follow_the_release(backends, tokenizer):
    video = backends["video"].builder
    ids, types = video.row(2, "video", "Is it?\n")
    n = video.config.tokens_per_image  # 6: boi, 2x2 patches, eoi
    text = tokenizer.encode("Question: Is it?\n Answer:", add_special_tokens=False)
    time0, time1 = (
        tokenizer.encode("0", add_special_tokens=False),
        tokenizer.encode("1", add_special_tokens=False),
    )
    pad = video.placeholder
    assert ids == [tokenizer.bos_token_id, *[pad] * n, *time0, *[pad] * n, *time1, *text]
    assert types == [0, *[1] * n, *[0] * len(time0), *[1] * n, *[0] * len(time1), *[0] * len(text)]
    assert len(time0) == len(time1) == 1
    # bos 0 | boi 1, patches 2, eoi 3, "0" 4 | boi 5, patches 6, eoi 7, "1" 8 | text 9, 10, ...
    expected = [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 6, 6, 6, 7, 8, *range(9, 9 + len(text))]
    assert position_ids(torch.tensor(types)).tolist() == expected

    image = backends["image"].builder
    ids, types = image.row(1, "image", "Is it?")
    assert ids[1 : 1 + n] == [pad] * n and ids[1 + n :] == tokenizer.encode(
        "Question: Is it? Short answer:", add_special_tokens=False
    )
    mask = expert_mask(torch.tensor([types]))[0].tolist()
    assert mask[: n + 2] == [False, True, True, True, True, True, False, False]  # boi + patches only
    assert not any(mask[n + 1 :])


def test_queries_keep_the_release_newlines_and_they_move_the_answer(backends):
    questions = load_checklist("video-official").question_texts(PROMPT)
    queries = backends["video"].queries(questions)
    assert all(q.endswith("?\n") for q in queries[:-1]) and queries[-1] == questions[-1]
    assert release_queries([" Is it? ", "Why?"], "strip") == ["Is it?", "Why?"]
    plain = CogVLM2Backend(
        backends["video"].model, backends["video"].tokenizer, source="x", query_format="plain"
    )
    sample = _samples("video")[1:2]
    a = backends["video"].answer(sample, [questions]).p_yes
    b = plain.answer(sample, [questions]).p_yes
    assert torch.allclose(a[:, -1], b[:, -1], atol=1e-6)  # the last question has no newline either way
    assert float((a[:, :-1] - b[:, :-1]).abs().max()) > 1e-3


def test_official_rule_is_the_greedy_first_token(backends, tokenizer):
    for variant, backend in backends.items():
        sample = _samples(variant)[0]
        questions = backend.queries(load_checklist(f"{variant}-full").question_texts(PROMPT))
        logits = torch.stack([backend.first_token_logits(sample, q) for q in questions])
        greedy_yes = torch.tensor([int(i) in backend.yes_ids for i in logits.argmax(-1)])
        assert torch.equal(backend.p_yes(logits) >= 0.5, greedy_yes)
        assert 0 < int(greedy_yes.sum()) < len(questions)  # both answers occur: the test can fail
    assert [tokenizer.decode([i]) for i in backends["video"].yes_ids] == ["yes"]
    assert sorted(tokenizer.decode([i]) for i in backends["image"].yes_ids) == [" yes", "yes"]


def test_inv_freq_from_the_checkpoint_moves_the_answer(tmp_path, remote, backends):
    changed = tmp_path / "changed"
    shutil.copytree(remote["video"], changed)
    for shard in changed.glob("model-*.safetensors"):
        weights = load_file(str(shard))
        for k in weights:
            if k.endswith("inv_freq"):
                weights[k] = weights[k].float() * 1.5  # a checkpoint with other frequencies
        save_file(weights, str(shard), metadata={"format": "pt"})
    other = CogVLM2Backend.from_pretrained(changed, dtype="float32", device="cpu")
    sample, question = _samples("video")[2], "Is the video stable?"
    assert not torch.allclose(
        other.first_token_logits(sample, question), backends["video"].first_token_logits(sample, question)
    )


# ------------------------------------------------------------------------------------------ fast path
CASES = [
    ("image", "image-official"),
    ("image", "image-full"),
    ("video", "video-official"),
    ("video", "video-full"),
]


@pytest.fixture(scope="module")
def naive_logits(backends):
    """The release's way, once per case: one full forward per (sample, question), full-vocabulary
    logits at the answer position (what ``answer_naive`` reads p(yes) from)."""
    out = {}
    for variant, name in CASES:
        backend, cl = backends[variant], load_checklist(name)
        rows = []
        for s in _samples(variant):
            queries = backend.queries(cl.question_texts(s.prompt))
            if cl.alignment_question:
                queries.append(cl.alignment_text(s.prompt))
            rows.append(torch.stack([backend.first_token_logits(s, q) for q in queries]))
        out[name] = torch.stack(rows)  # [samples, questions (+ alignment), vocab]
    return out


def test_answer_naive_reads_the_full_forward_logits(backends, naive_logits):
    backend, cl = backends["video"], load_checklist("video-official")
    samples = _samples("video")
    naive = backend.answer_naive(samples, [cl.question_texts(s.prompt) for s in samples])
    logits = naive_logits["video-official"]
    assert torch.allclose(naive.p_yes, backend.p_yes(logits.flatten(0, 1)).view(logits.shape[:2]), atol=1e-6)


@pytest.mark.parametrize("variant,checklist", CASES)
@pytest.mark.parametrize("rule", ["official", "yes-no"])
def test_fast_path_equals_one_full_forward_per_question(backends, naive_logits, variant, checklist, rule):
    base = backends[variant]
    backend = CogVLM2Backend(base.model, base.tokenizer, source="tiny", answer_rule=rule)
    cl = load_checklist(checklist)
    samples = _samples(variant)
    questions = [cl.question_texts(s.prompt) for s in samples]
    align = [cl.alignment_text(s.prompt) for s in samples] if cl.alignment_question else None
    logits = naive_logits[checklist]
    naive = backend.p_yes(logits.flatten(0, 1)).view(logits.shape[:2])
    hard = naive[:, : len(cl.questions)] >= 0.5
    assert 0 < int(hard.sum()) < hard.numel()  # both answers occur, so a wrong answer would show
    for batch, chunk in ((1, None), (3, None), (3, 7)):
        backend.batch_size, backend.question_chunk = batch, chunk
        fast = backend.answer(samples, questions, align)
        assert float((fast.p_yes - naive[:, : len(cl.questions)]).abs().max()) < 1e-5, (batch, chunk)
        assert torch.equal(fast.p_yes >= 0.5, hard)
        if align is not None:
            assert float((fast.alignment - naive[:, -1]).abs().max()) < 1e-5


def test_bad_samples_are_named(backends, tokenizer, built, remote):
    backend = backends["video"]
    empty = Sample(torch.rand(0, 3, 16, 16), prompt=PROMPT, id="clip-empty.mp4")
    with pytest.raises(CogVLM2Error, match=r"clip-empty\.mp4.*no frame"):
        backend.answer([empty], [["Is it stable?"]])
    long = Sample(torch.rand(40, 3, 16, 16), prompt="a fox " * 300, fps=1.0, id="clip-long.mp4")
    cl = load_checklist("video-official")
    with pytest.raises(
        CogVLM2Error, match=r"clip-long\.mp4: the prompt is \d+ tokens, more than the model's context of 512"
    ):
        backend.answer([long], [cl.question_texts(long.prompt)])
    with pytest.raises(CogVLM2Error, match=r"img: an image, but this CogVLM2 checkpoint reads videos"):
        backend.answer([Sample(torch.rand(3, 16, 16), id="img")], [["Is it?"]])


def test_vision_tokens_must_match_vision_positions(built):
    model = built["image"]
    ids = torch.zeros(1, 5, dtype=torch.long)
    types = torch.tensor([[0, VISION, VISION, VISION, 0]])
    with pytest.raises(ValueError, match="3 vision positions but 6 vision tokens"):
        model(input_ids=ids, token_type_ids=types, images=torch.zeros(1, 3, 16, 16))
