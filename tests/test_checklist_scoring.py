"""Checklists load and validate; scoring follows paper eq. 3-6 and reproduces the release's rules."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reward.checklist import ChecklistError, available_checklists, load_checklist, parse_checklist
from reward.model import ChecklistScorer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "visionreward-official.md"


def test_bundled_checklists_have_the_papers_shape():
    image = load_checklist("image-full")
    assert len(image.dimensions) == 5 and len(image.sub_dimensions) == 18
    entries = [f for f in image.features if f.name != "alignment"] + [
        q for q in image.questions if q.presence
    ]
    assert len(entries) == 60  # Tables 15-16, "Is there lighting and shadow?" scored in two sub-dimensions
    assert len(image.questions) == 59  # ... but asked once (the release's full list has 59)
    assert image.features[0].name == "alignment"
    video = load_checklist("video-full")
    assert (len(video.dimensions), len(video.sub_dimensions), len(video.questions)) == (9, 20, 64)
    official_image = load_checklist("image-official")
    assert len(official_image.questions) == 30 and len(official_image.weights) == 28
    official_video = load_checklist("video-official")
    assert len(official_video.questions) == 29 and len(official_video.weights) == 29
    assert set(available_checklists()) >= {"image-full", "image-official", "video-full", "video-official"}


def test_every_question_knows_its_place():
    for name in available_checklists():
        checklist = load_checklist(name)
        for q in checklist.questions:
            assert q.dimension == checklist.sub_to_dimension[q.sub_dimension]
            assert q.dimension in checklist.dimensions
        full = name.endswith("-full")
        if full:  # the full lists carry their ordered options
            for q in checklist.questions:
                assert q.option in checklist.options[q.sub_dimension], (name, q.id)


def _release_questions(section: str) -> list[str]:
    text = REFERENCE.read_text()
    block = text.split(section, 1)[1]
    block = block.split("Questions, in order", 1)[1]
    stop = re.search(r"\n(coef|weights) \(", block)
    return re.findall(r"^\d+: (.+)$", block[: stop.start()], flags=re.M)


@pytest.mark.skipif(not REFERENCE.exists(), reason="release facts not beside the checkout")
def test_official_lists_match_the_release_text_and_order():
    image = load_checklist("image-official")
    assert [q.text for q in image.questions] == _release_questions("## Image")
    video = load_checklist("video-official")
    assert [q.text for q in video.questions] == _release_questions("## Video")


def release_image_score(answers: list[bool], alignment: float, coef: list[float], intercept: float) -> float:
    """The release's image rule, written out independently of the checklist machinery."""
    a = [1.0 if yes else -1.0 for yes in answers]
    body, face, hands = (1.0 if answers[i] else 0.0 for i in range(3))
    for i in (22, 23, 24, 28, 29):
        a[i] *= body
    for i in (25, 26):
        a[i] *= face
    a[27] *= hands
    features = [alignment, *a[3:]]
    return sum(f * w for f, w in zip(features, coef)) + intercept


def release_video_score(answers: list[bool], weights: list[float]) -> float:
    return sum((1.0 if yes else -1.0) * w for yes, w in zip(answers, weights)) / len(weights)


def test_image_official_reproduces_release_scores_exactly():
    checklist = load_checklist("image-official")
    coef = list(checklist.weights)
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(64, 30, generator=gen, dtype=torch.float64)
    p[:8, :3] = 0.1  # nobody present: gated answers must count 0, not -1
    alignment = torch.rand(64, generator=gen, dtype=torch.float64)
    scores = ChecklistScorer(checklist)(p, alignment)
    for b in range(64):
        expected = release_image_score((p[b] >= 0.5).tolist(), float(alignment[b]), coef, 0.0)
        assert scores.total[b].item() == pytest.approx(expected, abs=1e-12)
    # dimensions add up to the total (eq. 4)
    torch.testing.assert_close(scores.dimensions.sum(1), scores.total)


def test_video_official_reproduces_release_scores_and_order():
    checklist = load_checklist("video-official")
    weights = list(checklist.weights)
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(32, 29, generator=gen, dtype=torch.float64)
    scores = ChecklistScorer(checklist)(p)
    for b in range(32):
        assert scores.total[b].item() == pytest.approx(
            release_video_score((p[b] >= 0.5).tolist(), weights), abs=1e-12
        )
    # the release's pairwise rule: video 1 better iff sum((a1 - a2) * w) > 0
    signed = (p >= 0.5).double() * 2 - 1
    w = torch.tensor(weights, dtype=torch.float64)
    for i in range(0, 32, 2):
        release_says = float(((signed[i] - signed[i + 1]) * w).sum()) > 0
        assert release_says == bool(scores.total[i] > scores.total[i + 1])
    torch.testing.assert_close(scores.dimensions.sum(1), scores.total)


def test_soft_scoring_is_eq_4_and_6_with_gates_and_unknowns():
    checklist = load_checklist("image-full")
    scorer = ChecklistScorer(checklist)
    gen = torch.Generator().manual_seed(2)
    p = torch.rand(5, len(checklist.questions), generator=gen, dtype=torch.float64)
    p[1, checklist.question_index("rich")] = math.nan  # one unknown answer
    p[2, checklist.question_index("face_present")] = 0.0  # no face: face questions contribute 0
    alignment = torch.rand(5, generator=gen, dtype=torch.float64)
    scores = scorer(p, alignment)
    # independent computation
    for b in range(5):
        per_sub: dict[str, float] = {}
        for f, w in zip(checklist.features, checklist.weights):
            value = float(alignment[b]) if f.question < 0 else 2 * float(p[b, f.question]) - 1
            if math.isnan(value):
                continue
            if f.gate >= 0:
                value *= float(p[b, f.gate])
            per_sub[f.sub_dimension] = per_sub.get(f.sub_dimension, 0.0) + w * value
        for s, name in enumerate(checklist.sub_dimensions):
            assert scores.sub_dimensions[b, s].item() == pytest.approx(per_sub[name], abs=1e-12)
        assert scores.total[b].item() == pytest.approx(sum(per_sub.values()), abs=1e-12)
    face = checklist.sub_dimensions.index("face")
    assert scores.sub_dimensions[2, face].item() == 0.0
    assert bool(scores.hard[0].eq(p[0] >= 0.5).all())


def test_all_unknown_dimension_is_nan_not_zero():
    checklist = load_checklist("image-full")
    p = torch.full((1, len(checklist.questions)), math.nan, dtype=torch.float64)
    p[0, checklist.question_index("colors_bright")] = 0.9
    scores = ChecklistScorer(checklist)(p, None)
    assert not math.isnan(scores.dimension("quality").item())
    assert math.isnan(scores.dimension("fidelity").item())
    assert math.isnan(scores.dimension("alignment").item())  # no alignment given: unknown, not 0
    assert scores.total.item() == pytest.approx((2 * 0.9 - 1) / len(checklist.features))


def _tiny(questions, **extra):
    data = {
        "name": "t",
        "dimensions": [
            {"name": "quality", "sub_dimensions": ["clarity"]},
            {"name": "fidelity", "sub_dimensions": ["body"]},
        ],
        "questions": questions,
    }
    data.update(extra)
    return data


@pytest.mark.parametrize(
    ("questions", "extra", "message"),
    [
        ([{"id": "a", "text": "A?", "sub_dimension": "nowhere"}], {}, "unknown sub-dimension 'nowhere'"),
        (
            [{"id": "a", "text": "A?", "sub_dimension": "clarity", "dimension": "style"}],
            {},
            "unknown dimension 'style'",
        ),
        (
            [
                {"id": "a", "text": "A?", "sub_dimension": "clarity"},
                {"id": "b", "text": "A?", "sub_dimension": "body"},
            ],
            {},
            "duplicate question 'A?'",
        ),
        (
            [
                {"id": "a", "text": "A?", "sub_dimension": "clarity"},
                {"id": "a", "text": "B?", "sub_dimension": "body"},
            ],
            {},
            "duplicate question id 'a'",
        ),
        (
            [
                {"id": "a", "text": "A?", "sub_dimension": "clarity"},
                {"id": "b", "text": "B?", "sub_dimension": "body", "gate": "ghost"},
            ],
            {},
            "gate 'ghost' points to no question",
        ),
        (
            [
                {"id": "a", "text": "A?", "sub_dimension": "clarity"},
                {"id": "b", "text": "B?", "sub_dimension": "body", "gate": "a"},
            ],
            {},
            "gate 'a' is not a presence question",
        ),
        (
            [
                {"id": "a", "text": "A?", "sub_dimension": "clarity"},
                {"id": "b", "text": "B?", "sub_dimension": "body"},
            ],
            {"weights": {"values": [1.0, 2.0, 3.0]}},
            "3 values for 2 features",
        ),
        (
            [{"id": "a", "text": "A?", "sub_dimension": "clarity", "colour": 1}],
            {},
            "unknown key(s) ['colour']",
        ),
    ],
)
def test_validation_errors_name_file_and_entry(questions, extra, message):
    with pytest.raises(ChecklistError) as err:
        parse_checklist(_tiny(questions, **extra), "my-list.yaml")
    assert "my-list.yaml" in str(err.value)
    assert message in str(err.value)


def test_weights_file_round_trip_and_mismatch(tmp_path):
    checklist = load_checklist("video-full")
    weights = np.linspace(0.1, 1.0, len(checklist.features))
    good = tmp_path / "w.json"
    data = checklist.weights_dict()
    data["weights"] = weights.tolist()
    good.write_text(json.dumps(data))
    loaded = load_checklist("video-full", weights=good)
    np.testing.assert_allclose(loaded.weights, weights)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"checklist": "video-full", "weights": [1.0, 2.0]}))
    with pytest.raises(ChecklistError, match=r"bad.json: weights: 2 values for 63 features"):
        load_checklist("video-full", weights=bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"checklist": "image-full", "weights": weights.tolist()}))
    with pytest.raises(ChecklistError, match="fitted for checklist 'image-full'"):
        load_checklist("video-full", weights=wrong)


def test_unknown_checklist_lists_bundled():
    with pytest.raises(ChecklistError, match="image-official"):
        load_checklist("imag-full")


def test_yaml_files_parse_without_custom_tags():
    for path in (Path(__file__).resolve().parents[1] / "reward" / "checklists").glob("*.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("name", available_checklists())
def test_absence_sits_strictly_between_wrong_and_right_for_every_gated_question(name):
    """A gated question scores 0 when its thing is absent, -w when present and wrong, +w when right."""
    checklist = load_checklist(name)
    scorer = ChecklistScorer(checklist)
    gated = [(k, f) for k, f in enumerate(checklist.features) if f.gate >= 0]
    if not gated:
        assert not any(q.presence for q in checklist.questions)
        return
    gen = torch.Generator().manual_seed(3)
    for k, feature in gated:
        base = torch.rand(1, len(checklist.questions), generator=gen, dtype=torch.float64)
        rows = base.repeat(3, 1)
        rows[0, feature.gate] = 0.0  # absent (its answer to the gated question is irrelevant)
        rows[1, feature.gate], rows[1, feature.question] = 1.0, 0.0  # present, wrong
        rows[2, feature.gate], rows[2, feature.question] = 1.0, 1.0  # present, right
        alignment = torch.full((3,), 0.5, dtype=torch.float64)
        x = scorer.features(rows, alignment)[:, k]
        assert x[1] < x[0] < x[2], (name, feature.name, x.tolist())
        assert x[0] == 0.0 and x[1] == -x[2]
    # Whole samples: every question a presence question gates answered wrong, absent, every one right.
    for gate in sorted({f.gate for _, f in gated}):
        members = sorted({f.question for _, f in gated if f.gate == gate})
        rows = torch.rand(1, len(checklist.questions), generator=gen, dtype=torch.float64).repeat(3, 1)
        rows[0, gate] = 0.0
        rows[1:, gate] = 1.0
        rows[1, members], rows[2, members] = 0.0, 1.0
        alignment = torch.full((3,), 0.5, dtype=torch.float64)
        totals = scorer(rows, alignment).total
        assert totals[1] < totals[0] < totals[2], (name, checklist.questions[gate].id, totals.tolist())


def test_soft_answers_round_to_the_signed_rule():
    """Soft answers are the expected ±1 answer: at p in {0, 1} soft and signed scoring agree."""
    signed = load_checklist("image-official")
    soft = parse_checklist(
        {**yaml.safe_load(Path(signed.source).read_text()), "scoring": {"answers": "soft", "gates": "soft"}},
        "soft-official",
    )
    gen = torch.Generator().manual_seed(4)
    p = (torch.rand(16, 30, generator=gen, dtype=torch.float64) > 0.5).double()
    alignment = torch.rand(16, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        ChecklistScorer(soft)(p, alignment).total, ChecklistScorer(signed)(p, alignment).total
    )
    # and in between, the soft score moves linearly with p
    p_half = p.clone()
    p_half[:, 5] = 0.75
    delta = ChecklistScorer(soft)(p_half, alignment).total - ChecklistScorer(soft)(p, alignment).total
    w = soft.weights[[f.question for f in soft.features].index(5)]
    torch.testing.assert_close(delta, (2 * 0.75 - 1 - (2 * p[:, 5] - 1)) * w)


def test_binary_answers_are_the_papers_eq_3_and_centre_only_when_gated():
    data = _tiny(
        [
            {"id": "sharp", "text": "Is it sharp?", "sub_dimension": "clarity"},
            {"id": "person", "text": "Is there a person?", "sub_dimension": "body", "presence": True},
            {"id": "body_ok", "text": "Is the body right?", "sub_dimension": "body", "gate": "person"},
        ],
        scoring={"answers": "binary", "gates": "hard"},
    )
    scorer = ChecklistScorer(parse_checklist(data, "binary.yaml"))
    p = torch.tensor([[0.9, 0.0, 0.2], [0.1, 1.0, 0.2], [0.7, 1.0, 0.8]], dtype=torch.float64)
    assert scorer.features(p).tolist() == [[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]


def test_release_full_image_weights_map_onto_image_full_by_question_text():
    """The release's 55 full-list weights: alignment, then the full list without presence questions and
    its two 'Is there ...?' questions; non-zero exactly where the select list has its weights."""
    from reward.checklist import CHECKLIST_DIR

    data = json.loads((CHECKLIST_DIR / "image-full.release-weights.json").read_text())
    coef, order = data["release_coef"], data["release_questions"]
    assert len(coef) == len(order) == 55
    full = load_checklist("image-full")
    presence = {q.text for q in full.questions if q.presence}
    asked = [q.text for q in full.questions]
    assert set(order[1:]) == set(asked) - presence - {
        "Is there a background?",
        "Is there lighting and shadow?",
    }
    official = load_checklist("image-official")
    assert [v for v in coef if v] == list(official.weights)  # the select list is the non-zero support
    assert [q for q, v in zip(order[1:], coef[1:]) if v] == [
        official.questions[f.question].text for f in official.features[1:]
    ]
    mapped = load_checklist("image-full", weights="image-full.release-weights")
    release = dict(zip(order[1:], coef[1:]))
    for f, w in zip(mapped.features, mapped.weights):
        if f.question < 0:
            assert w == coef[0]
        elif "@" in f.name:  # a second scoring of an asked question: the release weighs each question once
            assert w == 0.0
        else:
            assert w == release.get(full.questions[f.question].text, 0.0), f.name
    assert mapped.weights_source.endswith("image-full.release-weights.json")


def test_aliases_name_the_same_question_and_cannot_collide():
    video = load_checklist("video-full")
    for alias, qid in (
        ("Are the details relatively refined?", "details_refined"),
        ("Is the smoothness of the object's movement very good?", "movement_smoothness_good"),
        ("Is the camera very stable?", "camera_stable"),
    ):
        assert video.questions[video.question_index(alias)].id == qid
        assert alias not in video.question_texts("x")  # never asked
    data = _tiny(
        [
            {"id": "a", "text": "A?", "sub_dimension": "clarity", "aliases": ["B?"]},
            {"id": "b", "text": "B?", "sub_dimension": "body"},
        ]
    )
    with pytest.raises(ChecklistError, match="duplicate question 'B\\?'"):
        parse_checklist(data, "alias.yaml")
