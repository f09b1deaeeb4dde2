"""Per-second frame selection follows the release's rule exactly (checked against a literal loop)."""

from __future__ import annotations

import pytest

from reward.media import frame_indices_per_second


def release_frames(num_frames: int, fps: float, max_frames: int = 24) -> list[int]:
    """The release's loop, written out: timestamps i / fps, seconds 0 .. round(max timestamp),
    the first frame at the smallest distance, stop at max_frames."""
    timestamps = [i / fps for i in range(num_frames)]
    picked: list[int] = []
    for second in range(round(max(timestamps)) + 1):
        closest = min(timestamps, key=lambda t: abs(t - second))
        picked.append(timestamps.index(closest))
        if len(picked) >= max_frames:
            break
    return picked


FPS = [
    0.5,
    0.75,
    1.0,
    2.0,
    3.0,
    4.0,
    5.0,
    6.0,
    7.5,
    8.0,
    10.0,
    12.0,
    15.0,
    16.0,
    23.976,
    24.0,
    25.0,
    29.97,
    30.0,
    60.0,
]


@pytest.mark.parametrize("fps", FPS)
def test_frames_match_the_release_rule_on_a_grid(fps):
    for num_frames in range(1, 200):
        for cap in (24, 5):
            assert frame_indices_per_second(num_frames, fps, cap) == release_frames(num_frames, fps, cap), (
                num_frames,
                fps,
                cap,
            )


def test_known_cases_and_edges():
    assert frame_indices_per_second(49, 8.0) == [0, 8, 16, 24, 32, 40, 48]  # CogVideoX: 49 frames at 8 fps
    assert frame_indices_per_second(24, 8.0) == [0, 8, 16, 23]  # 2.875 s rounds up to a 4th second
    assert frame_indices_per_second(20, 8.0) == [0, 8, 16]  # 2.375 s: no 3rd second
    assert frame_indices_per_second(21, 8.0) == [0, 8, 16]  # 2.5 s rounds half to even: 2
    assert frame_indices_per_second(2, 0.5) == [0, 0, 1]  # under 1 fps: a frame serves two seconds
    assert frame_indices_per_second(1000, 30.0) == [30 * s for s in range(24)]
    assert frame_indices_per_second(0, 8.0) == []
    with pytest.raises(ValueError, match="fps"):
        frame_indices_per_second(5, 0.0)
