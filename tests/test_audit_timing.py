"""Adaptive interleaved timing against fake engines on a fake clock: known ratios, known stopping rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpdeploy.audit.metrics import measure_latency
from mpdeploy.audit.timing import TimingPolicy, ratio_interval, split_budget, time_batch


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Each call 'takes' `ms` (times a seeded multiplicative noise factor) on the fake clock."""

    def __init__(self, clock: FakeClock, ms: float, noise: float = 0.0, seed: int = 0, slow_first: int = 0):
        self.clock, self.ms, self.noise = clock, ms, noise
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.slow_first = slow_first  # cold calls, 3x slower, before the engine is warm

    def time(self, x, iterations: int) -> list[float]:
        out = []
        for _ in range(iterations):
            ms = self.ms * (3.0 if self.calls < self.slow_first else 1.0)
            if self.noise:
                ms *= math.exp(self.rng.normal(0.0, self.noise))
            self.calls += 1
            self.clock.now += ms / 1000.0
            out.append(ms)
        return out


def _engines(clock, dense_ms=10.0, sparse_ms=8.0, noise=0.0, **kw):
    return {"dense": FakeEngine(clock, dense_ms, noise, seed=1, **kw),
            "sparse": FakeEngine(clock, sparse_ms, noise, seed=2, **kw)}


def test_noise_free_ratio_stops_on_tolerance_after_min_rounds():
    clock = FakeClock()
    policy = TimingPolicy(min_rounds=5, max_rounds=100, tolerance=0.02, budget_s=1000.0)
    out = time_batch(_engines(clock), np.zeros(1), policy, clock=clock)
    assert out["stopped"] == "tolerance"
    assert len(out["round_ratios"]) == 5  # zero spread: the interval is a point once min_rounds are done
    assert out["interval"]["center"] == pytest.approx(10.0 / 8.0)  # sparse = 0.8 x dense
    assert out["interval"]["half_width"] == pytest.approx(0.0, abs=1e-12)


def test_noisy_ratio_is_right_within_tolerance_and_interval_covers_truth():
    clock = FakeClock()
    policy = TimingPolicy(min_rounds=5, max_rounds=2000, tolerance=0.02, budget_s=None)
    out = time_batch(_engines(clock, noise=0.05), np.zeros(1), policy, clock=clock)
    assert out["stopped"] == "tolerance"
    iv = out["interval"]
    assert iv["half_width"] <= 0.02
    assert iv["low"] <= 1.25 <= iv["high"]
    assert len(out["round_ratios"]) > 5  # noise needs more rounds than the minimum


def test_planted_noise_widens_the_interval():
    widths = []
    for noise in (0.01, 0.2):
        clock = FakeClock()
        policy = TimingPolicy(min_rounds=20, max_rounds=20, tolerance=None)
        widths.append(time_batch(_engines(clock, noise=noise), np.zeros(1), policy, clock=clock)["interval"]["half_width"])
    assert widths[1] > 5 * widths[0]


def test_time_budget_stops_before_tolerance():
    clock = FakeClock()
    # 10 + 8 ms per call, 3 calls each: 54 ms a round; 1 s of budget is ~16-18 rounds after warm-up.
    policy = TimingPolicy(min_rounds=5, max_rounds=10_000, tolerance=0.0001, budget_s=1.0, warmup_calls=2)
    out = time_batch(_engines(clock, noise=0.3), np.zeros(1), policy, clock=clock)
    assert out["stopped"] == "time budget"
    assert out["seconds"] == pytest.approx(1.0, abs=0.06)  # overshoots by at most one round
    assert out["interval"]["half_width"] > 0.0001  # the report says how far it got


def test_min_rounds_beat_the_budget_and_max_rounds_bound():
    clock = FakeClock()
    out = time_batch(_engines(clock), np.zeros(1), TimingPolicy(min_rounds=4, max_rounds=50, tolerance=None,
                                                                 budget_s=0.001), clock=clock)
    assert out["stopped"] == "time budget" and len(out["round_ratios"]) == 4
    clock = FakeClock()
    out = time_batch(_engines(clock, noise=0.3), np.zeros(1), TimingPolicy(min_rounds=4, max_rounds=7, tolerance=1e-9),
                     clock=clock)
    assert out["stopped"] == "max rounds" and len(out["round_ratios"]) == 7


def test_rounds_alternate_order():
    clock, order = FakeClock(), []
    engines = _engines(clock)
    for name, engine in engines.items():
        original = engine.time
        engine.time = lambda x, n, name=name, original=original: (order.append(name), original(x, n))[1]
    time_batch(engines, np.zeros(1), TimingPolicy(min_rounds=4, max_rounds=4, warmup_calls=0), clock=clock)
    assert order == ["dense", "sparse", "sparse", "dense"] * 2


def test_adaptive_warmup_stops_once_latency_stops_falling():
    clock = FakeClock()
    engines = _engines(clock, slow_first=4)
    out = time_batch(engines, np.zeros(1), TimingPolicy(min_rounds=2, max_rounds=2, warmup_calls=50), clock=clock)
    # 4 cold calls (30 ms), then warm ones (10 ms): the last 3 match the 3 before once 9 calls are done.
    assert out["warmup"]["dense"] == {"calls": 9, "stopped": "stable", "last_ms": 10.0}
    clock = FakeClock()
    out = time_batch(_engines(clock, slow_first=100), np.zeros(1),
                     TimingPolicy(min_rounds=2, max_rounds=2, warmup_calls=5), clock=clock)
    assert out["warmup"]["sparse"] == {"calls": 5, "stopped": "max calls", "last_ms": 24.0}


def test_warmup_budget_bounds_unstable_engine():
    clock = FakeClock()
    engines = _engines(clock, noise=0.5)  # never 3 calls within 10%... most of the time
    policy = TimingPolicy(min_rounds=2, max_rounds=2, warmup_calls=10_000, budget_s=1.0, warmup_share=0.2)
    out = time_batch(engines, np.zeros(1), policy, clock=clock)
    for name in ("dense", "sparse"):
        assert out["warmup"][name]["stopped"] in ("time budget", "stable")
        assert out["warmup"][name]["calls"] < 40  # 0.1 s at ~10 ms a call, plus one


def test_ratio_interval_known_values():
    iv = ratio_interval([2.0, 2.0, 2.0])
    assert iv["center"] == pytest.approx(2.0) and iv["half_width"] == pytest.approx(0.0)
    # log ratios +-a: mean 0, sd a*sqrt(2) over 2 samples (ddof 1); t(0.975, 1) = 12.706.
    a = 0.01
    iv = ratio_interval([math.exp(a), math.exp(-a)])
    assert iv["center"] == pytest.approx(1.0)
    assert math.log(iv["high"]) == pytest.approx(12.7062 * a * math.sqrt(2) / math.sqrt(2), rel=1e-4)
    assert ratio_interval([1.0])["half_width"] == math.inf


def test_split_budget():
    assert split_budget(100.0, [1, 8, 32], 0.6) == {1: pytest.approx(20.0), 8: pytest.approx(20.0), 32: pytest.approx(20.0)}
    assert split_budget(None, [1], 0.6) == {1: None}


def test_measure_latency_reports_interval_and_reason():
    clock = FakeClock()
    policy = TimingPolicy(min_rounds=3, max_rounds=40, tolerance=0.02, warmup_calls=2)
    seen = []
    out = measure_latency(_engines(clock), {4: np.zeros((4, 1))}, warmup=2, repeats=40, calls_per_round=3,
                          progress=lambda step, done, total: seen.append((step, done, total)),
                          policies={4: policy}, clock=clock)
    lat = out[4]
    assert lat["ratio_p50"] == pytest.approx(1.25) and lat["stopped"] == "tolerance"
    assert lat["ratio_interval"]["low"] == pytest.approx(1.25) and lat["ratio_spread"]["rounds"] == 3
    assert seen[-1] == ("latency b4", 3, 3)


# ---------------------------------------------------------------------------------------------------
# streamed evaluation: the same numbers as from whole logit arrays, and a time budget on a fair sample


def _logits(n=300, classes=20, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, classes)).astype(np.float32)
    sparse = dense + rng.normal(scale=0.3, size=dense.shape).astype(np.float32)
    labels = np.where(rng.random(n) < 0.7, dense.argmax(1), rng.integers(0, classes, n))
    return dense, sparse, labels


def test_streamed_accuracy_matches_whole_array_metrics():
    from mpdeploy.audit.evaluate import StreamedAccuracy
    from mpdeploy.audit.metrics import certified_mask, topk_correct

    dense, sparse, labels = _logits()
    stream = StreamedAccuracy(keep_logits=50)
    for lo in range(0, len(dense), 64):
        stream.update(dense[lo:lo + 64], sparse[lo:lo + 64], labels[lo:lo + 64])
    got = stream.metrics(True)
    assert got["images"] == 300 and got["classes"] == 20
    assert got["agreement"] == pytest.approx(float((dense.argmax(1) == sparse.argmax(1)).mean()))
    assert got["certified"] == int(certified_mask(dense, sparse).sum())
    diff = np.abs(sparse.astype(np.float64) - dense)
    assert got["max_logit_error"] == pytest.approx(diff.max()) and got["mean_logit_error"] == pytest.approx(diff.mean())
    for k in (1, 5):
        want = topk_correct(dense, labels, k).mean() - topk_correct(sparse, labels, k).mean()
        assert got[f"top{k}_drop"] == pytest.approx(want)
    np.testing.assert_array_equal(stream.head_logits("sparse"), sparse[:50])
    assert set(stream.samples()) == {"margin", "distance"} and len(stream.samples()["margin"]) == 300


def test_run_both_stops_on_budget_after_keep_images():
    from mpdeploy.audit.evaluate import run_both

    clock = FakeClock()
    dense, sparse, labels = _logits(n=320)

    class Engine:
        def __init__(self, table):
            self.table = table

        def run(self, x):
            clock.now += 1.0  # one second per batch
            return self.table[x[:, 0].astype(int)]

    batches = [(np.arange(lo, lo + 32, dtype=np.float32)[:, None], labels[lo:lo + 32]) for lo in range(0, 320, 32)]
    stream, y, head, failures = run_both({"dense": Engine(dense), "sparse": Engine(sparse)}, batches, None, 20,
                                         keep=40, budget_s=5.0, clock=clock)
    assert not failures and stream.stopped == "time budget"
    assert stream.count == 96 and len(y) == 96  # 2 engines x 1 s per batch: 3 batches spend 6 s >= 5 s
    assert len(head) == 40
    stream, *_ = run_both({"dense": Engine(dense), "sparse": Engine(sparse)}, batches, None, 20, keep=40)
    assert stream.stopped == "all images" and stream.count == 320


def test_slow_calls_get_fewer_calls_per_round_to_fit_the_budget():
    clock = FakeClock()
    # 1 s + 0.8 s per call: 5 rounds x 3 calls x 1.8 s = 27 s would overrun a 12 s budget 2x.
    engines = _engines(clock, dense_ms=1000.0, sparse_ms=800.0)
    policy = TimingPolicy(min_rounds=5, max_rounds=30, calls_per_round=3, tolerance=None, budget_s=12.0,
                          warmup_calls=1)
    out = time_batch(engines, np.zeros(1), policy, clock=clock)
    assert out["calls_per_round"] == 1  # (12 - 1.8) s left / (5 x 1.8 s) = 1.1 -> 1
    # 10.8 s after 5 rounds, so a 6th fits in; it ends at 12.6 s, past the budget, and stops there.
    assert len(out["round_ratios"]) == 6 and out["stopped"] == "time budget"
    assert out["seconds"] == pytest.approx(1.8 + 6 * 1.8)
    assert out["interval"]["center"] == pytest.approx(1.25)
    clock = FakeClock()
    fast = time_batch(_engines(clock), np.zeros(1), policy, clock=clock)
    assert fast["calls_per_round"] == 3  # fast calls keep the configured count
