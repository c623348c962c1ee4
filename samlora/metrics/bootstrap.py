"""The one bootstrap of the project: mean, spread and a confidence interval that resamples groups."""
from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import numpy as np


def summarize(
    values: Iterable[float], n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, float | int]:
    """Mean, standard deviation and a percentile-bootstrap confidence interval of the mean.

    The bootstrap resamples whole ``groups`` (a cluster bootstrap): patches of one image or
    neighbouring sections of one volume are nearly the same picture, and resampling them one by
    one would treat them as independent and make the interval too narrow. Every interval and
    verdict of the project comes from here, with the fold grouping (folds.Grouping) as groups.

    Args:
        values: per-image scores (finite numbers).
        n_boot: bootstrap resamples (with replacement, as many groups as there are).
        confidence: interval coverage, e.g. 0.95 -> 2.5th and 97.5th percentiles.
        seed: seed of the resampling generator; equal inputs give equal intervals.
        groups: the group of each value (same length); None: each value is its own group.

    Returns:
        ``{"mean", "std", "ci_low", "ci_high", "n", "n_groups"}``. ``std`` is the sample
        standard deviation of the values (ddof=1); each resample's statistic is the mean of the
        values of the groups drawn. Conventions, never NaN: no values -> every float 0.0 and
        ``n == 0`` (check ``n``); one value or one group -> ``std`` of the values and the
        interval is the mean.

    Raises:
        ValueError: a value is NaN or infinite, ``groups`` has another length, or ``n_boot`` /
            ``confidence`` is invalid.
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    x = x.ravel()
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values contain {np.count_nonzero(~np.isfinite(x))} NaN/inf entries")
    n = len(x)
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups must give one group per value: {len(groups)} groups for {n} values")
    if n == 0:
        return {"mean": 0.0, "std": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 0, "n_groups": 0}
    if groups is None:  # each value its own group: the same draws as an ungrouped bootstrap
        sums, counts = x, np.ones(n)
    else:
        _, member = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
        sums, counts = np.bincount(member, weights=x), np.bincount(member).astype(float)
    k, mean = len(sums), float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    if k == 1:
        return {"mean": mean, "std": std, "ci_low": mean, "ci_high": mean, "n": n, "n_groups": 1}
    rng = np.random.default_rng(seed)
    # Resample in chunks so memory stays ~8M indices whatever the number of groups.
    chunk = max(1, (1 << 23) // k)
    draws = [rng.integers(0, k, size=(min(chunk, n_boot - start), k)) for start in range(0, n_boot, chunk)]
    means = np.concatenate([sums[d].sum(axis=1) / counts[d].sum(axis=1) for d in draws])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean": mean, "std": std, "ci_low": float(low), "ci_high": float(high), "n": n, "n_groups": k}
