"""resfuse.testing's timing helpers."""
from resfuse.testing import median_seconds, median_seconds_each


def test_median_seconds_each_round_robin():
    calls = []
    a, b = (lambda: calls.append("a")), (lambda: calls.append("b"))
    times = median_seconds_each([a, b], 3, warmup=2)
    assert len(times) == 2 and all(t >= 0 for t in times)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up of each, then alternating rounds
    calls.clear()
    assert median_seconds(a, 4, warmup=1) >= 0 and calls == ["a"] * 5
