"""Statistics of differences paired by seed: mean and spread, Student's t intervals and tests, and Holm's correction
for a family of comparisons declared in advance.

Plain ``math``: four small functions do not justify SciPy as a dependency. The t distribution's tail is the
regularized incomplete beta function, evaluated by its continued fraction (Numerical Recipes, 3rd ed., 6.4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05  # the family-wise error rate of the declared comparisons, and 1 - the coverage of every interval

# Student's t at 97.5% for 1 to 30 degrees of freedom (two-sided 95%; standard tables); the normal 1.96 beyond.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is NaN for a single value, both are NaN when a
    value is (an undefined relative CE, for instance)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std


def ci95(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of ``n`` paired differences (Student's t); NaN below
    two."""
    if n < 2 or math.isnan(std):
        return math.nan
    return (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * std / math.sqrt(n)


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast below this point: I_x(a, b) = 1 - I_1-x(b, a)
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny = 1e-300  # keeps a vanishing denominator finite

    def clamp(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 1000):  # converges in O(sqrt(max(a, b))) terms
        for term in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                     -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / clamp(1.0 + term * d)
            c = clamp(1.0 + term / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def t_test_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic ``t`` with ``df`` degrees of freedom: P(|T| >= |t|)."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


@dataclass(frozen=True)
class Paired:
    """Differences paired by seed, summarised: mean, sample deviation, the 95% interval's half-width and the
    two-sided paired t-test's p-value (NaN where fewer than two seeds pair up)."""

    seeds: dict[int, float]
    mean: float
    std: float
    ci95: float
    p: float


def paired(differences: dict[int, float]) -> Paired:
    """Summarise per-seed differences ``{seed: A - B}``."""
    n = len(differences)
    if n == 0:
        return Paired({}, math.nan, math.nan, math.nan, math.nan)
    mean, std = mean_std(list(differences.values()))
    if n < 2 or math.isnan(std):
        p = math.nan
    elif std == 0.0:  # every seed the same difference: certain unless it is zero
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = t_test_p(mean / (std / math.sqrt(n)), n - 1)
    return Paired(dict(differences), mean, std, ci95(std, n), p)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest of m is multiplied by m - k + 1,
    capped at 1 and never below the one before it; rejecting where the adjusted value is below alpha holds the
    family-wise error at alpha. A NaN (a comparison not testable yet) ranks last and stays NaN: it still counts in
    m, since the family is what was declared, not what happens to have run."""
    m = len(pvalues)
    adjusted = [math.nan] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: math.inf if math.isnan(pvalues[i]) else pvalues[i])):
        if math.isnan(pvalues[i]):
            break
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
