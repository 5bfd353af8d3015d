import numpy as np
import pytest

from heart_lib.stats import bootstrap_ci, wilson_interval


def test_wilson_contains_the_proportion_and_narrows_with_n():
    lo, hi = wilson_interval(72, 100)
    assert lo < 0.72 < hi
    lo2, hi2 = wilson_interval(720, 1000)
    assert hi2 - lo2 < hi - lo
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_wilson_matches_a_known_value():
    # 95 % Wilson interval for 8/10: (0.4902, 0.9433), textbook value
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


@pytest.mark.parametrize("k, n", [(-1, 10), (11, 10), (1, 0)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_bootstrap_covers_the_mean():
    values = np.random.default_rng(1).normal(3.0, 1.0, 400)
    lo, hi = bootstrap_ci(values, seed=0)
    assert lo < values.mean() < hi and hi - lo < 0.3


def test_mean_interval_skips_nan_and_brackets_the_mean():
    import numpy as np

    from heart_lib.stats import mean_interval, paired_difference

    values = np.array([0.1, 0.4, np.nan, 0.3, 0.9, 0.2])
    mean, lo, hi = mean_interval(values, 500, seed=3)
    assert mean == np.nanmean(values) and lo <= mean <= hi and lo < hi
    assert all(np.isnan(mean_interval(np.array([np.nan]))))
    # a paired difference is the bootstrap mean of the differences, resampled together
    after, before = np.array([1, 1, 0, 1.0]), np.array([0, 1, 0, 0.0])
    assert paired_difference(after, before, 500, seed=3) == mean_interval(after - before, 500, seed=3)


def test_pooled_rank_correlation_of_a_perfect_score():
    import numpy as np

    from heart_lib.stats import pooled_rank_correlation

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(20, 3, 4))
    out = pooled_rank_correlation(truth * 2 + 1, truth, n_boot=50)
    assert out["spearman"] == 1.0 and out["kendall"] == 1.0 and out["spearman_lo"] == 1.0
