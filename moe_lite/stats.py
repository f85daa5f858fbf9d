"""Paired comparisons over seeds, the noise of an accuracy, and sentences generated from the numbers.

Two variants trained with the same seed share their initial weights' random stream, data order
and sampling noise, so they are compared **paired by seed**: the per-seed differences ``a - b``
get a mean and a Student-t interval over seeds, and a comparison whose interval covers 0 is
"not separable".

    >>> r = paired_difference({0: 0.82, 1: 0.80, 2: 0.81}, {0: 0.80, 1: 0.77, 2: 0.785})
    >>> r.verdict
    'A better'
    >>> compare_sentence("vimoe", "dense", r, metric="accuracy")
    'vimoe beats dense on accuracy by 0.025 (95% CI [0.0126, 0.0374], 3 seeds)'

Pure Python (no SciPy): the Student-t quantile comes from the exact finite series of the t
distribution for integer degrees of freedom, inverted by bisection.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence

DIRECTIONS = ("higher", "lower")
VERDICTS = ("A better", "B better", "not separable")


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (a positive integer) degrees of freedom.

    Exact finite series (Abramowitz & Stegun 26.7.3-4) in ``theta = atan(t / sqrt(df))``: for even
    ``df`` ``A = sin(theta) * sum_j c_j cos(theta)^(2j)``, for odd ``df``
    ``A = 2/pi * (theta + sin(theta) * sum_j d_j cos(theta)^(2j+1))``, where ``A = P(|T| <= |t|)``.
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(1, df // 2):  # c_j = (1*3*...*(2j-1)) / (2*4*...*2j)
            term *= (2 * j - 1) / (2 * j) * c * c
            total += term
        a = s * total
    else:
        total = 0.0
        if df > 1:
            term = c
            total = term
            for j in range(1, (df - 1) // 2):  # d_j = (2*4*...*2j) / (3*5*...*(2j+1))
                term *= (2 * j) / (2 * j + 1) * c * c
                total += term
        a = 2.0 / math.pi * (theta + s * total)
    a = min(max(a, 0.0), 1.0)
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 2)``
    is 4.303), by bisection on :func:`t_cdf` to about 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def by_seed(values: Sequence[float], seeds: Sequence[Hashable]) -> Dict[Hashable, float]:
    """``{seed: value}`` from aligned lists; ValueError when their lengths differ or a seed repeats."""
    values, seeds = list(values), list(seeds)
    if len(values) != len(seeds):
        raise ValueError(f"{len(values)} values but {len(seeds)} seeds ({seeds}): they must align")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    return dict(zip(seeds, values))


@dataclass(frozen=True)
class PairedDifference:
    """The per-seed differences ``a - b`` summarised: ``mean`` and its ``confidence`` interval
    ``[low, high]`` (Student t over ``n`` seeds), ``std`` of the differences, the ``seeds`` paired,
    the metric's ``direction`` ("higher" or "lower" is better) and the ``verdict``: "A better",
    "B better" or "not separable" (the interval covers 0)."""

    mean: float
    low: float
    high: float
    std: float
    n: int
    seeds: List[Any]
    confidence: float
    direction: str
    verdict: str

    def as_dict(self) -> Dict[str, Any]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "std": self.std, "n": self.n,
                "seeds": list(self.seeds), "confidence": self.confidence, "direction": self.direction,
                "verdict": self.verdict}


def paired_difference(a_by_seed: Mapping[Hashable, float], b_by_seed: Mapping[Hashable, float],
                      confidence: float = 0.95, direction: str = "higher") -> PairedDifference:
    """Compare A and B paired by seed: ``a_by_seed`` and ``b_by_seed`` map seed id -> value (see
    :func:`by_seed` for aligned lists). ``direction``: "higher" or "lower" is better.

    ValueError when the seeds differ, fewer than 2 are shared, a value is not finite, or an
    argument is out of range.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if set(a_by_seed) != set(b_by_seed):
        raise ValueError(f"seeds do not match: only A has {sorted(set(a_by_seed) - set(b_by_seed), key=str)}, "
                         f"only B has {sorted(set(b_by_seed) - set(a_by_seed), key=str)}")
    seeds = list(a_by_seed)
    if len(seeds) < 2:
        raise ValueError(f"a paired interval needs at least 2 seeds, got {len(seeds)} ({seeds})")
    diffs = []
    for seed in seeds:
        a, b = a_by_seed[seed], b_by_seed[seed]
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError(f"seed {seed!r}: values must be finite numbers, got A={a!r}, B={b!r}")
        diffs.append(float(a) - float(b))
    n = len(diffs)
    mean = math.fsum(diffs) / n
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if low > 0:
        verdict = "A better" if direction == "higher" else "B better"
    elif high < 0:
        verdict = "B better" if direction == "higher" else "A better"
    else:
        verdict = "not separable"
    return PairedDifference(mean, low, high, std, n, seeds, confidence, direction, verdict)


def accuracy_se(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy ``acc`` measured on ``n`` test images:
    ``sqrt(acc (1 - acc) / n)`` (0.0089 at 80% on 2,000 images)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (test images), got {n!r}")
    if acc is None or not 0.0 <= acc <= 1.0:
        raise ValueError(f"acc must be an accuracy in [0, 1], got {acc!r}")
    return math.sqrt(acc * (1.0 - acc) / n)


def _num(x: float, digits: int) -> str:
    return f"{x:.{digits}g}"


def compare_sentence(name_a: str, name_b: str, result: PairedDifference, metric: Optional[str] = None,
                     digits: int = 3) -> str:
    """The sentence a comparison supports, numbers to ``digits`` significant figures:

    - "A beats B on metric by x (95% CI [l, u], n seeds)": x and the interval are the winner's
      gain in the metric's good direction (so a lower FD gives a positive x);
    - "A and B are not separable on metric (A - B = d, 95% CI [l, u], n seeds)".
    """
    on = f" on {metric}" if metric else ""
    level = f"{result.confidence * 100:g}% CI"
    tail = f"{result.n} seeds"
    if result.verdict == "not separable":
        return (f"{name_a} and {name_b} are not separable{on} ({name_a} − {name_b} = {_num(result.mean, digits)}, "
                f"{level} [{_num(result.low, digits)}, {_num(result.high, digits)}], {tail})")
    a_wins = result.verdict == "A better"
    winner, loser = (name_a, name_b) if a_wins else (name_b, name_a)
    # the winner's gain: (winner - loser) when higher is better, (loser - winner) when lower is
    sign = 1.0 if (result.direction == "higher") == a_wins else -1.0
    gain, lo, hi = sign * result.mean, *sorted((sign * result.low, sign * result.high))
    return (f"{winner} beats {loser}{on} by {_num(gain, digits)} "
            f"({level} [{_num(lo, digits)}, {_num(hi, digits)}], {tail})")


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def check_sentence(sentence: str, name_a: str, name_b: str, result: PairedDifference,
                   metric: Optional[str] = None) -> None:
    """AssertionError unless ``sentence`` states the comparison ``result`` supports: the same
    verdict (who beats whom, or not separable) and, where it quotes them, the same numbers at the
    precision it prints. For a test that a sentence on the page still agrees with the JSON."""
    expected = compare_sentence(name_a, name_b, result, metric)
    verdicts = {
        "A better": f"{re.escape(name_a)} beats {re.escape(name_b)}\\b",
        "B better": f"{re.escape(name_b)} beats {re.escape(name_a)}\\b",
        "not separable": (f"(?:{re.escape(name_a)} and {re.escape(name_b)}|{re.escape(name_b)} and "
                          f"{re.escape(name_a)}) are not separable"),
    }
    claimed = [v for v, pattern in verdicts.items() if re.search(pattern, sentence)]
    if claimed != [result.verdict]:
        said = claimed[0] if len(claimed) == 1 else ("no comparison" if not claimed else "several verdicts")
        raise AssertionError(f"the sentence claims {said!r} but the numbers give {result.verdict!r}:\n"
                             f"  sentence: {sentence}\n  numbers:  {expected}")
    # the numbers the sentence quotes must agree with the generated ones at the sentence's precision
    # (a number printed with d decimals may be off by half a unit in its last place)
    said, true = _quoted_numbers(sentence), _quoted_numbers(expected)
    for key in said.keys() & true.keys():
        for s, t in zip(said[key], true[key]):
            decimals = len(s.split(".")[1]) if "." in s and "e" not in s.lower() else 0
            if abs(float(s) - float(t)) > 0.5 * 10 ** -decimals + 1e-12 * abs(float(t)):
                raise AssertionError(f"the sentence quotes {key} {s} where the numbers give {t}:\n"
                                     f"  sentence: {sentence}\n  numbers:  {expected}")


def _quoted_numbers(sentence: str) -> Dict[str, List[str]]:
    """The numbers of a comparison sentence as printed: the gain ("by x"), the difference ("= d"),
    the interval ("CI [l, u]") and the seed count ("n seeds")."""
    patterns = {"gain": rf" by ({_NUMBER})", "difference": rf" = ({_NUMBER})",
                "interval": rf"CI \[({_NUMBER}), ({_NUMBER})\]", "seeds": r"(\d+) seeds"}
    found = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, sentence)
        if match:
            found[key] = list(match.groups())
    return found


__all__ = ["PairedDifference", "paired_difference", "by_seed", "accuracy_se", "compare_sentence",
           "check_sentence", "t_cdf", "t_quantile"]
