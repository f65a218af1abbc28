"""The benchmarks' statistics: mean ± std, the 95 % t-interval of a mean, and seed-paired differences to a
baseline mode per cell (``summarize``, ``paired_deltas``)."""

import math
from collections import defaultdict

import numpy as np

BASELINE = "qat"  # the mode every seed-paired difference is taken against unless told otherwise


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % t-interval of the mean (half width 0 for fewer than two values)."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def accuracy_by_seed(rows: list[dict], group_keys: tuple) -> dict:
    """``{(cell, mode): {seed: test accuracy}}``, the cell being the values of ``group_keys``."""
    by = defaultdict(dict)
    for r in rows:
        by[(tuple(r[k] for k in group_keys), r["mode"])][r["seed"]] = r["accuracy"]
    return by


def seed_paired(runs: dict, base: dict) -> list[float]:
    """``runs[seed] - base[seed]`` for every seed of ``runs`` (in its order) that ``base`` has too."""
    return [runs[seed] - base[seed] for seed in runs if seed in base]


def paired_deltas(rows: list[dict], group_keys: tuple, mode: str, baseline: str) -> dict:
    """``{cell: (mean, low, high)}``: seed-paired test-accuracy difference ``mode - baseline`` per cell, 95 % CI."""
    by = accuracy_by_seed(rows, group_keys)
    out = {}
    for (cell, m), runs in by.items():
        base = by.get((cell, baseline))
        if m == mode and base:
            paired = seed_paired(runs, base)
            if paired:
                out[cell] = t_interval(paired)
    return out


def summarize(rows: list[dict], group_keys: tuple, baseline: str = BASELINE) -> list[dict]:
    """Per cell and mode: accuracy mean ± std over seeds, and the seed-paired difference to ``baseline`` with its
    95 % t-interval and the training-time ratio."""
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in group_keys) + (r["mode"],)].append(r)
    summary = []
    for key, runs in groups.items():
        base = {r["seed"]: r for r in groups.get(key[:-1] + (baseline,), [])}
        paired = [r["accuracy"] - base[r["seed"]]["accuracy"] for r in runs if r["seed"] in base]
        delta, low, high = t_interval(paired) if paired else (None, None, None)
        mean, std = mean_std([r["accuracy"] for r in runs])
        seconds = np.mean([r["train_seconds"] for r in runs])
        base_seconds = np.mean([r["train_seconds"] for r in base.values()]) if base else None
        summary.append({**dict(zip(group_keys, key[:-1])), "mode": key[-1], "n_seeds": len(runs),
                        "accuracy_mean": mean, "accuracy_std": std,
                        "val_accuracy_mean": float(np.mean([r["val_accuracy"] for r in runs])),
                        "rho_mean": float(np.mean([r["rho"] for r in runs])),
                        "delta_vs_qat": delta, "delta_ci95": [low, high] if paired else None,
                        "cost_vs_qat": float(seconds / base_seconds) if base_seconds else None})
    return summary
