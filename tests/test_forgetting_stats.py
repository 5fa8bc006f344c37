"""bench/bench_forgetting.py's statistics: the 95% t-interval over seeds and the verdict it allows, on numbers whose
answer is known."""
import importlib.util
import json
import math
import statistics

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_forgetting", ROOT / "bench" / "bench_forgetting.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_t_interval_is_mean_plus_minus_t_times_standard_error():
    values = [0.10, 0.12, 0.08, 0.11, 0.09]
    iv = bench.t_interval(values)
    assert iv.mean == pytest.approx(0.10)
    # s = 0.0158114, n = 5, t_{0.975, 4} = 2.776 -> 0.019630
    assert iv.half == pytest.approx(2.776 * statistics.stdev(values) / math.sqrt(5), rel=1e-12)
    assert iv.half == pytest.approx(0.019630, abs=1e-6)
    assert (iv.low, iv.high) == pytest.approx((0.10 - iv.half, 0.10 + iv.half))
    assert bench.t_interval([0.3]).half == math.inf and bench.t_interval([None]) == (None, None)
    assert bench.t_interval([0.2, None, 0.4]).mean == pytest.approx(0.3)  # missing seeds are skipped


@pytest.mark.parametrize("df,t", [(1, 12.706), (2, 4.303), (9, 2.262), (30, 2.042), (40, 2.021), (60, 2.000),
                                  (120, 1.980), (10000, 1.960)])
def test_t_quantiles(df, t):
    assert bench.t975(df) == pytest.approx(t, abs=1.5e-3)


def test_verdict_is_called_only_when_the_intervals_separate():
    lora = bench.t_interval([0.20, 0.22, 0.18, 0.21, 0.19])        # 20 ± 2 points
    less = bench.t_interval([0.05, 0.06, 0.04, 0.05, 0.05])        # well below
    more = bench.t_interval([0.40, 0.42, 0.38, 0.41, 0.39])        # well above
    overlap = bench.t_interval([0.10, 0.30, 0.15, 0.25, 0.20])     # same mean, wide
    close = bench.t_interval([0.17, 0.19, 0.15, 0.18, 0.16])       # 3 points lower, intervals touch
    assert bench.forgetting_verdict(less, lora) == "CLoRA forgets less"
    assert bench.forgetting_verdict(more, lora) == "CLoRA forgets more"
    assert bench.forgetting_verdict(overlap, lora) == bench.NO_DIFFERENCE == "no difference within the interval"
    assert close.high > lora.low and bench.forgetting_verdict(close, lora) == bench.NO_DIFFERENCE
    assert bench.gain_verdict(less, lora, "B") == "CLoRA learns B less"
    assert bench.gain_verdict(more, lora, "B") == "CLoRA learns B more"
    one_seed = bench.t_interval([0.05])  # no interval from one seed: no call, however far apart
    assert bench.forgetting_verdict(one_seed, lora) == bench.NO_DIFFERENCE


def test_summary_table_and_verdicts_from_per_seed_results(tmp_path, monkeypatch):
    """summarize() on evaluation results of a known shape: LoRA forgets 20 points of A, CLoRA 5, over 4 seeds."""
    monkeypatch.setattr(bench, "plot", lambda *a, **k: None)

    def model(a, b):
        return {"tasks": {"A": {"accuracy": a, "n": 160}, "B": {"accuracy": b, "n": 80}},
                "weights": {"delta_w_fro": 1.0, "F": 0.5, "leakage_in": 0.1}}

    results = {seed: {"base": model(1.0, 0.5), "lora": model(0.80 + d, 0.9), "k4": model(0.95 + d, 0.9 + d)}
               for seed, d in enumerate([0.0, 0.01, -0.01, 0.005])}
    table = bench.summarize(results, ["lora", "k4"], {"lora": (4, 0.0), "k4": (4, 1.0)}, tmp_path, "B",
                            [("forgetting on A (base − adapter, %)", bench.accuracy_drop("A"), True)])
    assert "| lora | - | 0 | 40.0 ± 0.0 | 19.9 ±" in table
    assert "over 4 seed(s)" in table and "A 160, B 80" in table
    assert "k4 vs lora: forgetting on A: CLoRA forgets less" in table
    assert "gain on B: no difference within the interval" in table  # 40.1 ± 1.0 vs 40.0 ± 0.0: they overlap
    saved = json.loads((tmp_path / "forgetting.json").read_text())
    assert saved["per_seed"]["k4"]["0"]["forgetting"] == [pytest.approx(0.05)]


def test_forgetting_is_interpolated_where_a_trajectory_reaches_the_gain():
    traj = [(0.0, 0.0), (1.0, 0.2), (3.0, 1.0), (2.5, 1.5)]  # gain may fall late in training; the first crossing counts
    assert bench.forgetting_at_gain(traj, 0.5) == pytest.approx(0.1)
    assert bench.forgetting_at_gain(traj, 1.0) == pytest.approx(0.2)
    assert bench.forgetting_at_gain(traj, 2.0) == pytest.approx(0.6)
    assert bench.forgetting_at_gain(traj, 3.0) == pytest.approx(1.0)
    assert bench.forgetting_at_gain(traj, 3.1) is None  # never reached: no extrapolation


def test_matched_gain_difference_and_paired_bootstrap_on_known_trajectories():
    """LoRA forgets 0.5 per unit of gain, CLoRA 0.2, each seed with its own offset shared by the pair: the
    difference at gain g is -0.3·g exactly, and pairing removes the seed offsets, so the interval is a point."""
    gains = [0.0, 1.0, 2.0, 3.0, 4.0]
    offsets = {0: 0.0, 1: 0.4, 2: -0.3, 3: 0.1}
    lora = {s: [(g, 0.5 * g + o * (g > 0)) for g in gains] for s, o in offsets.items()}
    clora = {s: [(g * 0.9, 0.2 * g * 0.9 + o * (g > 0)) for g in gains] for s, o in offsets.items()}  # best gain 3.6
    result = bench.matched_gain_differences(clora, lora, fractions=(0.5, 0.75, 0.95), resamples=2000)
    assert [m.gain for m in result] == pytest.approx([2.0, 3.0, 3.8])
    for m, g in zip(result[:2], (2.0, 3.0)):
        assert m.difference == pytest.approx(-0.3 * g) and m.low == pytest.approx(m.high) == pytest.approx(-0.3 * g)
        assert m.pairs == 4 and bench.matched_gain_verdict(m) == "CLoRA forgets less"
    assert result[2].difference is None and "not reached" in bench.matched_gain_verdict(result[2])
    # independent noise per run: the interval holds the true difference and the verdict needs it to exclude 0
    rnd = __import__("random").Random(1)
    noisy = {s: [(g, f + rnd.gauss(0, 0.2) * (g > 0)) for g, f in traj] for s, traj in clora.items()}
    m = bench.matched_gain_differences(noisy, lora, fractions=(0.5,), resamples=4000)[0]
    assert m.low < m.difference < m.high and m.high - m.low > 0.05
    same = bench.matched_gain_differences(lora, lora, fractions=(0.5,))[0]
    assert same.difference == 0 and bench.matched_gain_verdict(same) == bench.NO_DIFFERENCE
