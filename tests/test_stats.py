"""moe_lite.stats: Student-t quantiles, paired differences over seeds, accuracy noise, and the
comparison sentences generated from (and checked against) the numbers."""
import math

import pytest

from moe_lite.stats import (
    accuracy_se,
    by_seed,
    check_sentence,
    compare_sentence,
    paired_difference,
    t_cdf,
    t_quantile,
)


# ---- Student t ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 3, 3.1824), (0.975, 4, 2.7764), (0.975, 10, 2.2281),
    (0.975, 30, 2.0423), (0.95, 5, 2.0150), (0.995, 3, 5.8409), (0.9, 7, 1.4149),
])
def test_t_quantile_matches_the_printed_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-4)


def test_t_cdf_closed_forms_and_symmetry():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(t^2 + 2))
    for t in (-3.0, -0.5, 0.0, 0.7, 10.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-14)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(t * t + 2)), abs=1e-14)
        assert t_cdf(t, 9) + t_cdf(-t, 9) == pytest.approx(1.0, abs=1e-14)
    # a large df approaches the normal distribution
    assert t_cdf(1.959964, 2000) == pytest.approx(0.975, abs=1e-4)
    with pytest.raises(ValueError, match="df"):
        t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)


# ---- paired differences ---------------------------------------------------------------------------------
def test_paired_difference_is_a_t_interval_over_seed_differences():
    a = {0: 0.82, 1: 0.80, 2: 0.81}
    b = {2: 0.785, 0: 0.80, 1: 0.77}  # order does not matter: pairing is by seed id
    r = paired_difference(a, b)
    # differences 0.02, 0.03, 0.025: mean 0.025, std 0.005, half width t(0.975, 2) * 0.005 / sqrt(3)
    half = 4.302653 * 0.005 / math.sqrt(3)
    assert r.mean == pytest.approx(0.025) and r.std == pytest.approx(0.005) and r.n == 3
    assert (r.low, r.high) == (pytest.approx(0.025 - half), pytest.approx(0.025 + half))
    assert r.verdict == "A better" and r.seeds == [0, 1, 2]
    # the same numbers where lower is better: A's larger value makes B the better one
    assert paired_difference(a, b, direction="lower").verdict == "B better"
    assert paired_difference(b, a).verdict == "B better"
    # a wider confidence makes a wider interval
    assert paired_difference(a, b, confidence=0.99).low < r.low


def test_paired_difference_says_not_separable_when_the_interval_covers_zero():
    # each variant wins in some seed: a mean gap, but no paired evidence
    r = paired_difference({0: 40.0, 1: 45.0, 2: 35.0}, {0: 39.0, 1: 46.0, 2: 33.0}, direction="lower")
    assert r.low < 0 < r.high and r.verdict == "not separable"
    # a gap that is small against the seed spread of each variant, but the same in every seed, separates
    r = paired_difference({0: 36.0, 1: 42.0, 2: 31.0}, {0: 39.0, 1: 45.6, 2: 35.0}, direction="lower")
    assert r.high < 0 and r.verdict == "A better"


def test_paired_difference_rejects_mismatched_or_bad_input():
    with pytest.raises(ValueError, match=r"only A has \[2\], only B has \[3\]"):
        paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 3: 3.0})
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_difference({0: 1.0}, {0: 2.0})
    with pytest.raises(ValueError, match="seed 1: values must be finite"):
        paired_difference({0: 1.0, 1: float("nan")}, {0: 1.0, 1: 2.0})
    with pytest.raises(ValueError, match="seed 1: values must be finite"):
        paired_difference({0: 1.0, 1: None}, {0: 1.0, 1: 2.0})
    with pytest.raises(ValueError, match="direction"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}, direction="up")
    with pytest.raises(ValueError, match="confidence"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}, confidence=95)


def test_by_seed_aligns_values_with_seed_ids():
    assert by_seed([0.5, 0.6], [3, 7]) == {3: 0.5, 7: 0.6}
    with pytest.raises(ValueError, match="2 values but 3 seeds"):
        by_seed([0.5, 0.6], [0, 1, 2])
    with pytest.raises(ValueError, match="seeds repeat"):
        by_seed([0.5, 0.6], [1, 1])


def test_accuracy_se_is_binomial():
    assert accuracy_se(0.8, 2000) == pytest.approx(math.sqrt(0.8 * 0.2 / 2000))  # 0.0089: the 0.9 points
    assert accuracy_se(1.0, 10) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        accuracy_se(0.8, 0)
    with pytest.raises(ValueError, match="acc must be"):
        accuracy_se(80.0, 2000)


# ---- sentences ------------------------------------------------------------------------------------------
def test_compare_sentence_states_the_winner_and_its_gain():
    r = paired_difference({0: 36.0, 1: 42.0, 2: 31.0}, {0: 39.0, 1: 45.6, 2: 35.0}, direction="lower")
    # race's FD is lower: its gain is positive, the interval is of that gain
    gain, lo, hi = -r.mean, -r.high, -r.low
    assert compare_sentence("race", "dense", r, metric="FD") == (
        f"race beats dense on FD by {gain:.3g} (95% CI [{lo:.3g}, {hi:.3g}], 3 seeds)")
    assert 0 < lo < gain < hi
    # swapping the arguments swaps the verdict but not the sentence's meaning
    swapped = paired_difference({0: 39.0, 1: 45.6, 2: 35.0}, {0: 36.0, 1: 42.0, 2: 31.0}, direction="lower")
    assert swapped.verdict == "B better"
    assert compare_sentence("dense", "race", swapped, metric="FD") == compare_sentence("race", "dense", r, metric="FD")
    tie = paired_difference({0: 40.0, 1: 45.0, 2: 35.0}, {0: 39.0, 1: 46.0, 2: 33.0}, direction="lower")
    assert compare_sentence("BL", "dense", tie) == (
        f"BL and dense are not separable (BL − dense = {tie.mean:.3g}, 95% CI [{tie.low:.3g}, {tie.high:.3g}], 3 seeds)")


def test_check_sentence_fails_a_claim_the_numbers_do_not_support():
    r = paired_difference({0: 42.7, 1: 49.3, 2: 40.0}, {0: 39.0, 1: 45.6, 2: 35.0}, direction="lower")
    assert r.verdict == "B better"  # BL choice is worse than dense in every seed, by similar gaps
    check_sentence(compare_sentence("BL choice", "dense", r, "FD"), "BL choice", "dense", r, "FD")
    with pytest.raises(AssertionError, match="claims 'A better'"):
        check_sentence("BL choice beats dense on FD in every seed.", "BL choice", "dense", r, "FD")
    with pytest.raises(AssertionError, match="claims 'not separable'"):
        check_sentence("BL choice and dense are not separable on FD.", "BL choice", "dense", r, "FD")
    with pytest.raises(AssertionError, match="claims 'no comparison'"):
        check_sentence("All MoEs beat the dense DiT.", "BL choice", "dense", r, "FD")
    gain = r.mean  # BL choice minus dense: what dense gains
    with pytest.raises(AssertionError, match="quotes gain"):
        check_sentence(f"dense beats BL choice on FD by {gain + 0.5:.1f} (95% CI ...)", "BL choice", "dense", r)
    # the right number at a coarser precision passes
    check_sentence(f"dense beats BL choice on FD by {gain:.1f}.", "BL choice", "dense", r)
    with pytest.raises(AssertionError, match="quotes seeds 5"):
        check_sentence(f"dense beats BL choice on FD by {gain:.1f} (5 seeds).", "BL choice", "dense", r)


# ---- comparison sentences written by the numbers on the results page -------------------------------
def _dynamic_record(top_p, top_2):
    return {"name": "dynamic", "size": "quick", "tables": {}, "config": {"seeds": [0, 1, 2]},
            "metrics": {"top-p": {"accuracy": {"values": top_p, "seeds": [0, 1, 2]}},
                        "top-2": {"accuracy": {"values": top_2, "seeds": [0, 1, 2]}}}}


def test_compare_directives_are_written_by_the_numbers():
    from moe_lite.experiments.report import UsageError, expand_comparisons

    text = "Top-p: {compare dynamic: top-p vs top-2 on accuracy}. The rest stays."
    clear = expand_comparisons(text, [_dynamic_record([0.82, 0.83, 0.84], [0.80, 0.81, 0.82])])
    assert clear == ("Top-p: top-p beats top-2 on accuracy by 0.02 (95% CI [0.02, 0.02], 3 seeds). "
                     "The rest stays.")
    mixed = expand_comparisons(text, [_dynamic_record([0.82, 0.80, 0.84], [0.80, 0.81, 0.82])])
    assert "top-p and top-2 are not separable on accuracy" in mixed
    for bad in ("{compare dynamic: top-p vs top-9 on accuracy}", "{compare zoo: a vs b on accuracy}",
                "{compare dynamic: top-p vs top-2 on speed}"):
        with pytest.raises(UsageError, match="compare"):
            expand_comparisons(bad, [_dynamic_record([0.8, 0.8, 0.9], [0.8, 0.8, 0.8])])
