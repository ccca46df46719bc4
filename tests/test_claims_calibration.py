"""Every kind of claim test, run on data simulated under the null hypothesis (numpy, seeded):
the chance that it says `reproduced` must be at most 5%, up to the Monte-Carlo error of the
simulation. The same tests must also detect a real effect (else "never reproduced" would pass).

The old rules these replace would fail here: two standard errors with normal quantiles at
n = 3 passes 9% of the time, and "Spearman < 0 over 4 points" 46% (asserted below for the record).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from cmkd.experiments.analysis import band_ratio_bootstrap
from cmkd.reporting.claims import compare

DRAWS = 2000
# Monte-Carlo margin: 3 standard errors of a 5% rate estimated from DRAWS draws (~0.015)
LIMIT = 0.05 + 3 * np.sqrt(0.05 * 0.95 / DRAWS)


def sample(values):
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "n": len(v), "values": v.tolist()}


def rate(draw, verdict="reproduced", draws=DRAWS, seed=0):
    rng = np.random.default_rng(seed)
    return np.mean([draw(rng) == verdict for _ in range(draws)])


def test_one_sample_threshold_is_calibrated():
    # the true mean is exactly the threshold; n = 3 (the smallest), 5 and 7 seeds
    for n in (3, 5, 7):
        r = rate(lambda rng: compare(">", sample(0.10 + rng.normal(0, 0.02, n)), 0.10, 0.0)[0], seed=n)
        assert r <= LIMIT, (n, r)
    assert rate(lambda rng: compare(">", sample(0.13 + rng.normal(0, 0.02, 5)), 0.10, 0.0)[0], draws=300) > 0.5


def test_paired_comparison_is_calibrated():
    # two runs of the same seeds share each seed's luck (a large common term) but not its effect
    def draw(rng, effect=0.0):
        seed_luck = rng.normal(0, 0.05, 5)
        a, b = seed_luck + effect + rng.normal(0, 0.01, 5), seed_luck + rng.normal(0, 0.01, 5)
        return compare(">", sample(a), None, 0.0, sample(b))[0]

    assert rate(draw) <= LIMIT
    assert rate(lambda rng: draw(rng, 0.02), draws=300) > 0.5  # pairing removes the seed's luck


def test_welch_comparison_is_calibrated_with_unequal_spreads():
    def draw(rng):
        return compare(">", sample(rng.normal(0.5, 0.05, 4)), None, 0.0,
                       sample(rng.normal(0.5, 0.005, 9)), paired=False)[0]

    assert rate(draw) <= LIMIT


def test_all_points_is_an_intersection_union_test():
    # least favourable null for "all >": one point exactly at the null, the others far above it
    def draw(rng):
        points = [sample(0.3 + rng.normal(0, 0.01, 5)), sample(rng.normal(0, 0.01, 5)),
                  sample(0.3 + rng.normal(0, 0.01, 5))]
        return compare("all >", points, 0.0, 0.0)[0]

    assert rate(draw) <= LIMIT
    # "any >" under the null at every point: Bonferroni keeps it at most 5%
    assert rate(lambda rng: compare("any >", [sample(rng.normal(0, 0.01, 5)) for _ in range(3)], 0.0, 0.0)[0]) <= LIMIT


def test_trends_are_calibrated_even_with_seed_effects():
    x = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]

    def draw(rng, slope=0.0):
        luck = rng.normal(0, 0.02, 5)  # each seed's level, shared by all its points
        points = [sample(luck + slope * xi + rng.normal(0, 0.005, 5)) for xi in x]
        return compare("decreasing", points, None, 0.0, x=x)[0]

    assert rate(draw) <= LIMIT
    assert rate(lambda rng: draw(rng, -0.01), draws=300) > 0.5


def test_trend_on_a_per_seed_x_is_calibrated():
    # NTDH's "KD gain falls where the non-target divergence is high" over 4 noise levels, when
    # the KD gain is unrelated to the divergence; the divergence itself rises with the level
    levels = np.array([0.0, 0.25, 0.5, 1.0])

    def draw(rng):
        div = [sample(0.2 + 0.3 * lv + rng.normal(0, 0.02, 24)) for lv in levels]
        gain = [sample(rng.normal(0, 0.01, 24)) for _ in levels]
        return compare("decreasing", gain, None, 0.0, x=div)[0]

    assert rate(draw) <= LIMIT


def test_old_spearman_rule_was_not_a_test():
    """For the record: rho(means) < 0 over 4 points, the old digits-noise rule, under the null."""
    rng = np.random.default_rng(0)
    hits = [stats.spearmanr(rng.normal(size=4), rng.normal(size=4)).statistic < 0 for _ in range(DRAWS)]
    assert np.mean(hits) > 0.4


def test_equivalence_is_calibrated_at_its_bounds():
    r = rate(lambda rng: compare("between", sample(0.6 + rng.normal(0, 0.05, 5)), [0.4, 0.6], 0.0)[0])
    assert r <= LIMIT


def test_band_ratio_threshold_is_conservative():
    """mfh-alpha-student-gain-flat: band of the KD gain over the teacher's gain < 0.25, decided
    with a bootstrap standard error. At a true ratio of exactly 0.25 it is reproduced at most 5%."""
    points = 5
    teacher_true = np.linspace(0.55, 0.85, points)                 # teacher gains 0.30
    gain_true = np.linspace(0.0, 0.25 * 0.30, points)              # band exactly 0.25 of it

    def draw(rng):
        teacher = teacher_true[:, None] + rng.normal(0, 0.02, (points, 8))
        gain = gain_true[:, None] + rng.normal(0, 0.01, (points, 8))
        ratio = band_ratio_bootstrap(gain, teacher, n_boot=200, seed=int(rng.integers(1 << 31)))
        return compare("<", ratio, 0.25, 0.0)[0]

    assert rate(draw, draws=600) <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 600)


def test_normal_two_se_rule_at_n3_was_miscalibrated():
    """For the record: |diff| > 2 s.e. with n = 3 (the old `significance: 2`) under the null."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (DRAWS, 3))
    t = x.mean(1) / (x.std(1, ddof=1) / np.sqrt(3))
    assert np.mean(t > 2) > 0.07


def test_margin_is_calibrated_at_its_boundary_both_ways():
    """With a margin of half a point, a true paired effect of exactly the margin is an effect
    that counts: the chance of `not_reproduced` must be at most 5% (the paper holds practically),
    and the chance of `reproduced` at most 5% (no evidence it is beyond the margin). A true
    effect of 0 inside the margin is declared `not_reproduced` when the seeds are precise enough,
    and never `reproduced`."""
    margin = 0.005

    def draw(rng, effect, noise=0.004, n=5):
        luck = rng.normal(0, 0.05, n)
        a, b = luck + effect + rng.normal(0, noise, n), luck + rng.normal(0, noise, n)
        return compare(">", sample(a), None, 0.0, sample(b), margin=margin)[0]

    assert rate(lambda rng: draw(rng, margin), "not_reproduced") <= LIMIT
    assert rate(lambda rng: draw(rng, margin), "reproduced", seed=1) <= LIMIT
    assert rate(lambda rng: draw(rng, 0.0), "reproduced", seed=2) == 0.0
    assert rate(lambda rng: draw(rng, 0.0, noise=0.001, n=20), "not_reproduced", draws=300, seed=3) > 0.9
    assert rate(lambda rng: draw(rng, 0.03), "reproduced", draws=300, seed=4) > 0.9


def test_not_reproduced_is_not_declared_on_a_null_effect_the_seeds_cannot_place():
    """A null effect (true difference 0) whose interval is wider than the margin is not
    evidence of anything: `not_reproduced` at most 5% (only when significantly the wrong way)."""
    def draw(rng):
        luck = rng.normal(0, 0.05, 5)
        a, b = luck + rng.normal(0, 0.02, 5), luck + rng.normal(0, 0.02, 5)
        return compare(">", sample(a), None, 0.0, sample(b), margin=0.005)[0]

    assert rate(draw, "not_reproduced") <= LIMIT


def test_trend_margin_is_calibrated_at_its_boundary():
    x = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    margin = 0.005

    def draw(rng):  # the true change over the sweep is exactly the margin
        luck = rng.normal(0, 0.02, 5)
        points = [sample(luck - margin * xi + rng.normal(0, 0.002, 5)) for xi in x]
        return compare("decreasing", points, None, 0.0, x=x, margin=margin)[0]

    assert rate(draw, "reproduced") <= LIMIT
    assert rate(draw, "not_reproduced", seed=1) <= LIMIT
