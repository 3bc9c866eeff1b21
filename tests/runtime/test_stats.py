"""Run statistics: per-stage means and percentiles, fps, and the bounded window."""

import pytest

from dpa.runtime.stats import StageStats


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_stage_statistics_and_fps_on_a_fake_clock():
    clock = FakeClock()
    stats = StageStats(window=3, clock=clock)
    for frame, (encoder, decoder) in enumerate([(0.010, 0.020), (0.030, 0.020), (0.020, 0.050), (0.040, 0.030)]):
        clock.now += 0.1 if frame < 2 else 0.2  # frames end at 100.1, 100.2, 100.4, 100.6
        seconds = {"encoder": encoder, "decoder": decoder}
        if frame == 0:
            seconds["ifa_memory"] = 0.004
        stats.add(seconds)
    table = stats.stage_ms()
    assert list(table) == ["encoder", "ifa_memory", "decoder"]  # pipeline order
    assert table["encoder"]["mean"] == pytest.approx(25.0)  # whole run: (10 + 30 + 20 + 40) / 4
    assert table["encoder"]["median"] == pytest.approx(30.0)  # last 3: 30, 20, 40
    assert table["ifa_memory"]["mean"] == pytest.approx(4.0)  # per frame that ran it
    assert table["decoder"]["p90"] == pytest.approx(46.0)  # last 3: 20, 50, 30 -> numpy's linear p90
    assert stats.fps() == pytest.approx(4 / 0.6)
    assert stats.recent_fps() == pytest.approx(3 / 0.5)  # window of 3 frames: 100.1 -> 100.6
    summary = stats.summary()
    assert summary["frames"] == 4 and summary["stages_ms"] == table
    assert "4 frames" in stats.line(dropped=2) and "dropped 2" in stats.line(dropped=2)


def test_memory_is_bounded_by_the_window():
    stats = StageStats(window=5, clock=FakeClock())
    for _ in range(1000):
        stats.add({"encoder": 0.001})
    assert len(stats.recent["encoder"]) == 5
    assert stats.counts["encoder"] == 1000
