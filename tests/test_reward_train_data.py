"""Reward-training data: annotation files and teacher scores, bad rows named by file and row, the
split by sample, yes/no balance per question, the resumable stream, and the VisionRewardDB converter."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reward import train_data as td
from reward.checklist import load_checklist
from reward.cli import main
from reward.synthetic import QUESTIONS, draw, write_shapes
from reward.vrdb import convert_rows, read_questions


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_shapes(tmp_path_factory.mktemp("shapes"), count=24)


@pytest.fixture(scope="module")
def checklist(shapes):
    return load_checklist(shapes["checklist"])


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _error(fn, *args) -> str:
    with pytest.raises(td.DataError) as info:
        fn(*args)
    return str(info.value)


# ---- reading --------------------------------------------------------------------------------------
def test_long_and_wide_rows_name_questions_by_index_id_or_text(shapes, checklist, tmp_path):
    image = str(shapes["images"] / "00000.png")
    path = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"image": image, "question": "bright", "answer": "yes"},
            {"image": image, "question": 1, "answer": False},
            {"path": image, "prompt": "p", "answers": {"Is there a red square?": "YES", "blue_square": 0}},
        ],
    )
    data = td.read_annotations([path], checklist)
    assert [s.prompt for s in data.samples] == ["", "p"]  # one media file with two prompts: two samples
    got = [(r.sample, checklist.questions[r.question].id, r.target) for r in data.rows]
    assert got == [(0, "bright", 1.0), (0, "dark", 0.0), (1, "red_square", 1.0), (1, "blue_square", 0.0)]
    assert data.rows[1].where == f"{path}:2" and not data.soft


def test_relative_media_start_at_the_file_or_media_root(shapes, checklist, tmp_path):
    rows = [{"image": "images/00001.png", "question": "dark", "answer": "no"}]
    beside = _jsonl(shapes["annotations"].parent / "rel.jsonl", rows)
    assert td.read_annotations([beside], checklist).samples[0].media == shapes["images"] / "00001.png"
    elsewhere = _jsonl(tmp_path / "rel.jsonl", rows)
    data = td.read_annotations([elsewhere], checklist, media_root=shapes["annotations"].parent)
    assert data.samples[0].media == shapes["images"] / "00001.png"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"question": "Is the sky green?", "answer": "yes"}, "unknown question 'Is the sky green?'"),
        ({"question": "bright", "answer": "maybe"}, "answer 'maybe' is not yes or no"),
        ({"question": "bright", "answer": 0.7}, "answer 0.7 is not yes or no"),
        ({"question": 9, "answer": "no"}, "unknown question 9"),
        ({"answer": "no"}, "needs 'question' and 'answer'"),
    ],
)
def test_bad_rows_name_the_file_and_line(shapes, checklist, tmp_path, row, expected):
    image = str(shapes["images"] / "00000.png")
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [{"image": image, "question": "bright", "answer": "yes"}, {"image": image, **row}],
    )
    message = _error(td.read_annotations, [path], checklist)
    assert message.startswith(f"{path}:2: ") and expected in message


def test_parquet_rows_are_named_by_index(shapes, checklist, tmp_path):
    image = str(shapes["images"] / "00000.png")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"image": image, "question": "dark", "answer": "yes"}] * 2 + [
        {"image": image, "question": "dark", "answer": "sometimes"}]), path)  # fmt: skip
    assert _error(td.read_annotations, [path], checklist).startswith(
        f"{path}: row 2: question 'dark': answer 'sometimes' is not yes or no"
    )


def test_missing_and_damaged_media_are_found_before_training(shapes, checklist, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    rows = [
        {"image": str(shapes["images"] / "00000.png"), "question": "bright", "answer": "yes"},
        {"image": str(tmp_path / "gone.png"), "question": "bright", "answer": "yes"},
        {"image": str(broken), "question": "bright", "answer": "no"},
    ]
    path = _jsonl(tmp_path / "a.jsonl", rows)
    problems = td.check_media(td.read_annotations([path], checklist).samples)
    assert len(problems) == 2
    assert problems[0].startswith(f"{path}:2: image {tmp_path / 'gone.png'}: no such file")
    assert problems[1].startswith(f"{path}:3: image {broken}: cannot be read")


def test_video_without_frames_names_file_and_row(tmp_path):
    import subprocess

    import imageio_ffmpeg

    clip = tmp_path / "empty.mp4"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "color=c=black:s=32x32:r=8",
         "-frames:v", "0", "-c:v", "libx264", str(clip)], check=True,
    )  # fmt: skip
    checklist = load_checklist("video-official")
    path = _jsonl(
        tmp_path / "v.jsonl", [{"video": str(clip), "prompt": "a cat", "question": 3, "answer": "yes"}]
    )
    data = td.read_annotations([path], checklist)
    message = _error(td.load_sample, data.samples[0], 24)
    assert message.startswith(f"{path}:1: video {clip}: cannot be used: shorter than one frame")
    assert "\n" not in message  # one line, not ffmpeg's whole log


def test_modality_must_match_the_checklist(shapes, tmp_path):
    path = _jsonl(
        tmp_path / "a.jsonl", [{"image": str(shapes["images"] / "00000.png"), "question": 0, "answer": "no"}]
    )
    assert "is an image but checklist 'video-official' is for videos" in _error(
        td.read_annotations, [path], load_checklist("video-official")
    )


def test_teacher_scores_become_soft_targets_and_nan_is_left_out(shapes, checklist, tmp_path):
    image = str(shapes["images"] / "00000.png")
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": image, "prompt": "", "q.bright": 0.8, "q.dark": float("nan"), "q.red_square": 0.1, "q.blue_square": 1.0},
    ]), path)  # fmt: skip
    data = td.read_teacher_scores(path, checklist)
    assert data.soft and [(checklist.questions[r.question].id, r.target) for r in data.rows] == [
        ("bright", 0.8), ("red_square", 0.1), ("blue_square", 1.0)]  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    _jsonl(bad, [{"id": image, "q.bright": 1.5}])
    assert _error(td.read_teacher_scores, bad, checklist) == f"{bad}:1: q.bright=1.5 is outside [0, 1]"
    _jsonl(bad, [{"id": image, "q.symmetrical": 0.5}])
    assert "unknown question column(s) ['q.symmetrical']" in _error(td.read_teacher_scores, bad, checklist)


# ---- split, balance, stream -------------------------------------------------------------------------
def test_split_is_by_sample_seeded_and_keeps_explicit_splits(shapes, checklist):
    data = td.read_annotations([shapes["annotations"]], checklist)
    split = td.split_samples(data.samples, 0.25, None, seed=0)
    assert split.count("val") == 6 and len(split) == 24
    assert split == td.split_samples(data.samples, 0.25, None, seed=0)
    assert split != td.split_samples(data.samples, 0.25, None, seed=1)
    # Every row of a sample is on its sample's side: rows are never split apart.
    sides = {}
    for row in data.rows:
        sides.setdefault(row.sample, set()).add(split[row.sample])
    assert all(len(s) == 1 for s in sides.values())
    forced = [
        td.SampleRef(s.media, s.prompt, s.where, "val" if i == 0 else None)
        for i, s in enumerate(data.samples)
    ]
    assert td.split_samples(forced, 0.0, 3, seed=0)[0] == "val"
    assert td.split_samples(forced, 0.0, 3, seed=0).count("val") == 3


def test_downsample_balances_yes_and_no_per_question_and_weight_reweighs(checklist):
    rows = [td.QARow(i, 0, 1.0, f"r{i}") for i in range(7)] + [
        td.QARow(10 + i, 0, 0.0, f"n{i}") for i in range(3)
    ]
    rows += [td.QARow(20, 2, 1.0, "only-yes")]
    kept, report = td.balance_rows(rows, "downsample", seed=0)
    assert report[0] == {"yes": 7, "no": 3, "kept": 6} and report[2] == {"yes": 1, "no": 0, "kept": 0}
    assert sum(r.target == 1.0 for r in kept) == sum(r.target == 0.0 for r in kept) == 3
    assert kept == td.balance_rows(rows, "downsample", seed=0)[0]
    assert kept != td.balance_rows(rows, "downsample", seed=3)[0]  # which yes rows go depends on the seed
    weighted, _ = td.balance_rows(rows, "weight", seed=0)
    yes_w = sum(r.weight for r in weighted if r.question == 0 and r.target == 1.0)
    no_w = sum(r.weight for r in weighted if r.question == 0 and r.target == 0.0)
    assert yes_w == pytest.approx(no_w) == pytest.approx(5.0)
    assert len(td.balance_rows(rows, "none", seed=0)[0]) == len(rows)


def test_stream_is_a_function_of_the_position_and_split_across_processes(shapes, checklist):
    data = td.read_annotations([shapes["annotations"]], checklist)
    split = td.split_samples(data.samples, 0.25, None, seed=0)
    train = td.TrainSet.build(data, split, "none", seed=5)
    assert all(split[s] == "train" for s in train.samples)
    epoch = [train.sample_at(p) for p in range(len(train.samples))]
    assert sorted(epoch) == sorted(train.samples)  # one epoch visits every training sample once
    assert [train.sample_at(p) for p in range(40)] == [train.sample_at(p) for p in range(40)]

    def positions(batch, rank, world, seen, steps):
        loader = iter(td.make_loader(train, 24, batch, rank, world, seen, 0))
        return [[item["position"] for item in next(loader)] for _ in range(steps)]

    one = positions(4, 0, 1, 0, 3)
    two = [positions(2, r, 2, 0, 3) for r in range(2)]
    assert [a + b for a, b in zip(*two)] == one  # 1 process x batch 4 == 2 processes x batch 2
    assert positions(4, 0, 1, 8, 1) == one[2:3]  # resuming after 8 positions continues there
    with pytest.raises(td.DataError, match="not a multiple"):
        td.make_loader(train, 24, 3, 0, 1, 8, 0)
    item = next(iter(td.make_loader(train, 24, 1, 0, 1, 0, 0)))[0]
    ref = data.samples[item["sample_index"]]
    assert item["questions"] == [QUESTIONS[checklist.questions[q].id] for q in item["question_index"]]
    assert item["sample"].pixels.shape == (3, 56, 56) and item["sample"].id == str(ref.media)


def test_synthetic_answers_follow_the_pixels():
    for index in range(8):
        image, answers = draw(index)
        background = image[:, :4, :4].mean() if image[:, :4, :4].std() < 0.1 else image[:, -4:, -4:].mean()
        assert answers["bright"] == (background > 0.5) and answers["dark"] != answers["bright"]
        reds = ((image[0] > 0.7) & (image[2] < 0.3)).sum()
        blues = ((image[2] > 0.7) & (image[0] < 0.3)).sum()
        assert answers["red_square"] == (reds > blues) and answers["blue_square"] == (blues > reds)


# ---- VisionRewardDB --------------------------------------------------------------------------------
def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_vrdb_rows_become_annotations_that_train_reads(tmp_path):
    checklist = load_checklist("image-full")
    texts = [q.text for q in checklist.questions]
    qa = tmp_path / "meta_qa_en.txt"
    qa.write_text("\n".join(texts[:3]) + "\n")  # the release's file lists its questions in its own order
    rows = [
        {"internal_id": "a1", "prompt": "a red bus", "image": {"bytes": _png((200, 0, 0)), "path": None},
         "annotation": {"symmetry": 1}, "meta_result": [1, 0, 1], "meta_mask": [1, 1, 0]},
        {"internal_id": "b2", "prompt": "a cat", "image": _png((0, 0, 200)),
         "annotation": {"symmetry": -1}, "meta_result": [0, 1, 1], "meta_mask": [1, 1, 1]},
    ]  # fmt: skip
    # The card's two layouts: a datasets Image struct {bytes, path}, and plain binary (older revision).
    source, binary = tmp_path / "train-00000-of-00002.parquet", tmp_path / "train-00001-of-00002.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:1]), source)
    pq.write_table(pa.Table.from_pylist(rows[1:]), binary)
    out = tmp_path / "vrdb" / "annotations.jsonl"
    counts = convert_rows([source, binary], read_questions(qa, checklist), out)
    assert counts == {"samples": 2, "answers": 5, "masked": 1}
    first = json.loads(out.read_text().splitlines()[0])
    assert first["image"] == "media/a1.png" and first["answers"] == {texts[0]: "yes", texts[1]: "no"}
    assert Image.open(out.parent / "media" / "a1.png").getpixel((0, 0)) == (200, 0, 0)
    data = td.read_annotations([out], checklist)
    assert [s.prompt for s in data.samples] == ["a red bus", "a cat"] and len(data.rows) == 5
    assert [(r.question, r.target) for r in data.rows[2:]] == [(0, 0.0), (1, 1.0), (2, 1.0)]

    # the command: same output, exit 0; then the errors, each naming file and row
    command = ["import-vrdb", str(source), str(binary), "--questions", str(qa), "--out", str(out)]
    assert main(command) == 0
    assert json.loads(out.read_text().splitlines()[0]) == first
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{**rows[1], "meta_result": [0, 2, 1]}]), bad)
    assert "bad.parquet: row 0: meta_result[1]" in _error(
        convert_rows, [bad], texts[:3], tmp_path / "x.jsonl"
    )
    pq.write_table(pa.Table.from_pylist([{**rows[1], "meta_result": [0, 1]}]), bad)
    assert "meta_result has 2 answers and meta_mask 3" in _error(
        convert_rows, [bad], texts[:3], tmp_path / "x.jsonl"
    )
    qa.write_text(texts[0] + "\nIs the image haunted?\n")
    assert _error(read_questions, qa, checklist).startswith(
        f"{qa}:2: question 'Is the image haunted?' is not in"
    )


def test_import_vrdb_bad_input_exits_2(tmp_path, capsys):
    qa = tmp_path / "qa.txt"
    qa.write_text("Is the image haunted?\n")
    source = tmp_path / "s.jsonl"
    _jsonl(source, [{"internal_id": "x", "image": None, "meta_result": [1]}])
    assert main(["import-vrdb", str(source), "--questions", str(qa), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "Is the image haunted?" in capsys.readouterr().err
