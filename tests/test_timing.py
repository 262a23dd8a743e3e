"""The one stage timer: Pipeline's and the bench peers' timings have one shape."""

from __future__ import annotations

from edgediff.runtime.timing import StageTimer


class _Peer:
    def forward(self, x):
        return x + 1


def test_stages_sum_steps_list_and_total():
    timer = StageTimer()
    t = timer.stage("text_encoder", timer.stage("tokenize", 0.0))
    timer.stage("steps", t)
    timer.stage("steps", t)
    timings = timer.total()
    assert set(timings) == {"tokenize", "text_encoder", "steps", "total"} and len(timings["steps"]) == 2


def test_wrapped_calls_are_charged_to_the_current_record():
    peer, timer = _Peer(), StageTimer()
    timer.wrap(peer, "forward", "steps")
    first = timer.time(lambda: [peer.forward(i) for i in range(3)])
    assert len(first["steps"]) == 3 and first["total"] >= sum(first["steps"])
    second = timer.time(lambda: peer.forward(0))
    assert len(second["steps"]) == 1 and peer.forward(1) == 2
