"""Distributions of a bundle's scores and inputs, and how far a site's recent window has drifted from them.

One binning for everything (the ``stats/v1`` message, the manifest's ``reference``, ``/metrics``): 20 equal bins
over [0, 1] with the 21 edges :data:`EDGES`, left-closed, the last bin closed (``numpy.histogram``'s rule); values
outside [0, 1] are clipped into the first or last bin. Used by the box (``appliance.models.stats``) and by whoever
builds a bundle's reference (:func:`reference_distributions`), so both bin alike.

Two measures per distribution, both on the binned counts:

- **Population stability index** (Siddiqi, *Credit Risk Scorecards*, Wiley 2006, ch. 8; Yurdakul,
  "Statistical properties of population stability index", Western Michigan University 2018)::

      PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

  with ``e_i`` the reference proportion and ``a_i`` the site's proportion in bin i, each bin's proportion first
  floored at :data:`PSI_EPSILON` (an empty bin would make the logarithm infinite) and the proportions
  renormalised. Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift.
- **Two-sample Kolmogorov-Smirnov test on the binned CDFs**: ``D = max_k |F_ref(k) - F_site(k)|`` over the bin
  edges, and the asymptotic p-value ``Q_KS(lambda)`` with ``lambda = (sqrt(Ne) + 0.12 + 0.11 / sqrt(Ne)) * D``,
  ``Ne = n1 n2 / (n1 + n2)`` (Stephens 1970; Press et al., *Numerical Recipes* 3rd ed., section 14.3.3,
  ``kstwo``), ``Q_KS(x) = 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 x^2)``. Binning can only lower D (ties), so on binned
  data the test is conservative: it flags a shift no more often than the exact test would.
  (SciPy is not a dependency of the box; this is the textbook asymptotic form, checked against tabulated values.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

N_BINS = 20
EDGES: tuple[float, ...] = tuple(round(i / N_BINS, 10) for i in range(N_BINS + 1))
PSI_EPSILON = 1e-4  # floor of a bin's proportion in the PSI (an empty bin would give ln(0))


def histogram(values: Iterable[float] | np.ndarray) -> list[int]:
    """20 counts (ints) of ``values`` over :data:`EDGES`; values are clipped into [0, 1]. Raises ValueError on a
    NaN or infinite value (a score that is not a number must be caught before it is counted)."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if arr.size and not np.isfinite(arr).all():
        raise ValueError("histogram of non-finite values")
    counts, _ = np.histogram(np.clip(arr, 0.0, 1.0), bins=np.asarray(EDGES))
    return [int(c) for c in counts]


def bin_index(value: float) -> int:
    """The bin (0..19) of one value, as :func:`histogram` would count it."""
    return int(np.argmax(histogram([value])))


def _proportions(counts: Sequence[int]) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (N_BINS,) or (c < 0).any():
        raise ValueError(f"a histogram is {N_BINS} non-negative counts")
    total = c.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    return c / total


def psi(expected: Sequence[int], actual: Sequence[int], epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of ``actual`` against ``expected`` (20 counts each; see the module doc).
    0 for identical proportions, grows without bound as they part. Raises ValueError for an empty histogram."""
    e = np.maximum(_proportions(expected), epsilon)
    a = np.maximum(_proportions(actual), epsilon)
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def kolmogorov_q(x: float) -> float:
    """Q_KS(x) = 2 sum_{j>=1} (-1)^(j-1) exp(-2 j^2 x^2): the probability that the Kolmogorov statistic
    sqrt(n) D exceeds x under the null hypothesis, asymptotically (Numerical Recipes 3rd ed. 6.14.56). 1 at 0."""
    if x < 0.2:  # the series converges slowly near 0, where Q is 1 to better than 1e-9
        return 1.0
    total, sign = 0.0, 1.0
    for j in range(1, 101):
        term = sign * math.exp(-2.0 * j * j * x * x)
        total += term
        if abs(term) < 1e-12:
            break
        sign = -sign
    return min(1.0, max(0.0, 2.0 * total))


def ks_binned(expected: Sequence[int], actual: Sequence[int]) -> tuple[float, float]:
    """(D, p-value) of the two-sample KS test on binned counts (module doc). Raises ValueError if empty."""
    fe = np.cumsum(_proportions(expected))
    fa = np.cumsum(_proportions(actual))
    d = float(np.max(np.abs(fe - fa)))
    return d, ks_p_value(d, float(np.sum(expected)), float(np.sum(actual)))


def ks_p_value(d: float, n1: float, n2: float) -> float:
    """The asymptotic p-value of a two-sample KS statistic ``d`` of samples of ``n1`` and ``n2`` values (module doc:
    ``Q_KS((sqrt(Ne) + 0.12 + 0.11 / sqrt(Ne)) d)``, ``Ne = n1 n2 / (n1 + n2)``). Raises ValueError when a sample
    is empty."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError("a KS test needs two non-empty samples")
    ne = n1 * n2 / (n1 + n2)
    return kolmogorov_q((math.sqrt(ne) + 0.12 + 0.11 / math.sqrt(ne)) * d)


def compare(expected: Sequence[int], actual: Sequence[int], psi_alert: float, p_alert: float) -> dict[str, Any]:
    """``{"psi", "p_value", "test": "ks", "alert"}`` for one distribution: ``alert`` when the shift is both large
    (PSI >= ``psi_alert``) and not sampling noise (p < ``p_alert``). With a big window a KS test alone flags
    differences too small to matter, and with a small one PSI alone flags noise; together they need both."""
    value = psi(expected, actual)
    _, p = ks_binned(expected, actual)
    alert = value >= psi_alert and p < p_alert
    return {"psi": round(value, 6), "p_value": float(f"{p:.6g}"), "test": "ks", "alert": alert}


def reference_distributions(
    scores: Mapping[str, Sequence[float] | np.ndarray],
    study_scores: Sequence[float] | np.ndarray,
    input_means: Sequence[float] | np.ndarray,
    input_p95s: Sequence[float] | np.ndarray,
) -> dict[str, Any]:
    """A manifest's ``reference`` block from a validation set's outputs, binned as the box bins them.

    ``scores``: label -> one score per image (after the output's activation, in [0, 1]); ``study_scores``: one
    per study (the pipeline's study score); ``input_means`` / ``input_p95s``: per image, the mean and the 95th
    percentile of the preprocessed input in [0, 1] before mean/std (``appliance.pipeline.observe.input_summary``
    computes them from a ``Prepared``). Returns ``{"n": studies, "score_edges", "scores", "study_score",
    "input_edges", "input_mean", "input_p95"}`` (lists of ints), ready for ``Manifest(reference=...)``. Raises
    ValueError on a NaN or an empty list."""
    if len(study_scores) == 0 or len(input_means) == 0:
        raise ValueError("a reference needs at least one study and one image")
    return {
        "n": len(study_scores),
        "score_edges": list(EDGES),
        "scores": {label: histogram(np.asarray(v, dtype=np.float64)) for label, v in scores.items()},
        "study_score": histogram(np.asarray(study_scores, dtype=np.float64)),
        "input_edges": list(EDGES),
        "input_mean": histogram(np.asarray(input_means, dtype=np.float64)),
        "input_p95": histogram(np.asarray(input_p95s, dtype=np.float64)),
    }
