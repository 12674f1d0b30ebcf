"""What a follower of a Redis job passes on when a job runs twice (`server.queue.redis.follow.Replay`): each run's
events once, progress and each image's previews only forward, text only beyond what was sent."""

from __future__ import annotations

import json

from server.queue.redis.follow import Replay


def _fields(event: dict, run: str, seq: int) -> dict[str, str]:
    return {"e": json.dumps(event), "r": run, "s": str(seq)}


def _preview(step: int, image: int) -> dict:
    return {"type": "preview", "step": step, "total": 576, "image": image, "preview": "x"}


def test_a_second_run_sends_no_preview_the_first_had_passed():
    replay = Replay()
    first = [_preview(144, 0), _preview(144, 1), {"type": "progress", "step": 200, "total": 576}]
    assert [replay.accept(_fields(e, "a", i)) for i, e in enumerate(first)] == first
    assert replay.accept(_fields(first[0], "a", 0)) is None  # the same event read twice
    again = [_preview(144, 0), _preview(144, 1), _preview(288, 1)]  # the job runs again from step 0
    assert [replay.accept(_fields(e, "b", i)) for i, e in enumerate(again)] == [None, None, again[2]]
    assert replay.accept(_fields(_preview(200, 0), "b", 3)) == _preview(200, 0)  # image 0 moves on
