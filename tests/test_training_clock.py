"""Training seconds leave out the pauses (probes, evaluations, checkpoints), and a resumed run adds to its past."""

from __future__ import annotations

from unlearn.training import loop


def test_paused_time_is_not_training_time(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = loop.TrainingClock(already=5.0)  # a resumed run that had trained 5 s
    now[0] += 2.0  # a step
    with clock.paused():
        now[0] += 30.0  # an evaluation
        assert clock.seconds() == 7.0  # read inside a pause: up to the pause (what a checkpoint records)
    now[0] += 1.0
    assert clock.seconds() == 8.0
    try:
        with clock.paused():
            now[0] += 4.0
            raise RuntimeError("a probe failed")
    except RuntimeError:
        pass
    assert clock.seconds() == 8.0
