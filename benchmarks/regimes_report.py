"""The regime map's tables and figures: the Markdown summary, distillation and radius-goal tables, and the map,
noisy-label, distillation and safety plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common import pyplot
from regime_run import MODES
from stats import BASELINE, accuracy_by_seed, paired_deltas, seed_paired, t_interval

if TYPE_CHECKING:
    from regimes import Plan

# The distillation comparisons (mode, baseline), seed-paired: what KD buys, what SAQ adds on top of KD, SAQ alone.
KD_PAIRS = (("qat_kd", "qat"), ("saq_kd", "qat_kd"), ("saq", "qat"), ("saq_fixed_kd", "qat_kd"), ("saq_fixed", "qat"))

MAP_COLOURS = {"qat_kd": "tab:cyan", "saq_kd": "tab:gray",
               "saq": "tab:green", "saq_fixed": "tab:red", "saq_val": "tab:purple", "saq_at_once": "tab:olive",
               "case1_val": "tab:blue", "case2_val": "tab:orange", "saq_looksam_k10": "tab:brown",
               "saq_reuse_grad": "tab:pink", "fp": "black"}


def map_columns(summary: list[dict], plan: Plan) -> list[tuple]:
    """The map's ``(regime, noise)`` columns: the noisy-label cells first (most noise first), then the clean regimes
    in the plan's order."""
    present = {(s["regime"], s.get("noise", 0.0)) for s in summary}
    noisy = sorted((c for c in present if c[1]), key=lambda c: -c[1])
    clean = [c for c in ((r, 0.0) for r in plan.regimes) if c in present]
    return noisy + clean + sorted(present - set(noisy) - set(clean))


def distill_pairs(rows: list[dict], group_keys: tuple) -> list[dict]:
    """Per cell with a distillation mode: QAT's mean accuracy and the seed-paired differences of ``KD_PAIRS``
    (``"qat_kd-qat"``: ``{"delta", "ci95", "n"}``), each with its 95 % t-interval and number of paired seeds."""
    by = accuracy_by_seed(rows, group_keys)
    table = []
    for cell in sorted({cell for cell, mode in by if MODES[mode].get("teacher")}):
        qat = by.get((cell, BASELINE), {})
        entry = {**dict(zip(group_keys, cell)), "qat_accuracy": float(np.mean(list(qat.values()))) if qat else None,
                 "qat_n": len(qat)}
        for mode, base in KD_PAIRS:
            runs, base_runs = by.get((cell, mode), {}), by.get((cell, base), {})
            paired = seed_paired(runs, base_runs)
            if paired:
                delta, low, high = t_interval(paired)
                entry[f"{mode}-{base}"] = {"delta": delta, "ci95": [low, high], "n": len(paired)}
        table.append(entry)
    if table:
        print("\nDistillation (test top-1 %; Δ seed-paired with 95 % CI and the number of seeds)")
        print("| " + " | ".join(group_keys) + " | QAT | " + " | ".join(f"{m} − {b}" for m, b in KD_PAIRS) + " |")
        print("|" + "---|" * (len(group_keys) + 1 + len(KD_PAIRS)))
        for t in table:
            pairs = [t.get(f"{m}-{b}") for m, b in KD_PAIRS]
            print("| " + " | ".join(str(t[k]) for k in group_keys) + f" | {t['qat_accuracy'] or float('nan'):.1f} | "
                  + " | ".join(f"{p['delta']:+.1f} [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}] (n {p['n']})" if p
                               else "" for p in pairs) + " |")
    return table


def plot_distill(table: list[dict], group_keys: tuple, path: Path) -> None:
    """The ``KD_PAIRS`` differences per cell, side by side, with their 95 % intervals."""
    plt = pyplot()
    labels = [" ".join(f"{t[k]:.0%} noise" if k == "noise" and t[k] else f"W{t[k]}A{t[k]}" if k == "w_bits"
                       else str(t[k]) for k in group_keys if not (k == "noise" and not t[k]) and k != "regime")
              for t in table]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(table) + 1.5), 3.4))
    for k, ((mode, base), colour) in enumerate(zip(KD_PAIRS, ("tab:green", "tab:red", "tab:gray", "tab:purple", "tab:orange"))):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(table):
            pair = t.get(f"{mode}-{base}")
            if pair:
                xs.append(i + (k - (len(KD_PAIRS) - 1) / 2) * 0.15)
                ys.append(pair["delta"])
                lo.append(pair["delta"] - pair["ci95"][0])
                hi.append(pair["ci95"][1] - pair["delta"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, color=colour, label=f"{mode} − {base}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(table)), labels, fontsize=8)
    ax.set_ylabel("Δ test top-1 (pt)", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("Distillation from the run's own FP model: seed-paired differences (95 % CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def radius_goal(rows: list[dict], group_keys: tuple, user: str = "saq") -> list[dict]:
    """Per cell: the radius a user gets without tuning (``user``) against the validation-chosen radius of the grid
    (``saq_val``) and against plain QAT, seed-paired. Met where the first is > -1 pt and the second > -1 pt."""
    vs_best, vs_qat = paired_deltas(rows, group_keys, user, "saq_val"), paired_deltas(rows, group_keys, user, BASELINE)
    table = []
    for cell in sorted(set(vs_best) & set(vs_qat)):
        (best, best_lo, best_hi), (qat, qat_lo, qat_hi) = vs_best[cell], vs_qat[cell]
        table.append({**dict(zip(group_keys, cell)), "user_mode": user, "vs_val_best": best,
                      "vs_val_best_ci95": [best_lo, best_hi], "vs_qat": qat, "vs_qat_ci95": [qat_lo, qat_hi],
                      "met": best > -1 and qat > -1})
    if table:
        print(f"\nRadius goal: {user} vs the validation-chosen radius (saq_val) and vs QAT (pt, seed-paired, 95 % CI)")
        print("| " + " | ".join(group_keys) + " | vs best radius | vs QAT | within 1 pt of both |")
        print("|" + "---|" * (len(group_keys) + 3))
        for t in table:
            print("| " + " | ".join(str(t[k]) for k in group_keys) +
                  f" | {t['vs_val_best']:+.1f} [{t['vs_val_best_ci95'][0]:+.1f}, {t['vs_val_best_ci95'][1]:+.1f}]"
                  f" | {t['vs_qat']:+.1f} [{t['vs_qat_ci95'][0]:+.1f}, {t['vs_qat_ci95'][1]:+.1f}]"
                  f" | {'yes' if t['met'] else 'no'} |")
    return table


def print_table(summary: list[dict], group_keys: tuple, modes: tuple, title: str) -> None:
    print(f"\n{title}\n(test accuracy %, mean ± std; Δ = seed-paired SAQ − QAT with 95 % CI)")
    keys = sorted({tuple(s[k] for k in group_keys) for s in summary})
    index = {tuple(s[k] for k in group_keys) + (s["mode"],): s for s in summary}
    print("| " + " | ".join(group_keys) + " | " + " | ".join(modes) + " |")
    print("|" + "---|" * (len(group_keys) + len(modes)))
    for key in keys:
        cells = []
        for mode in modes:
            s = index.get(key + (mode,))
            if s is None:
                cells.append("")
            elif mode == BASELINE or s["delta_vs_qat"] is None:
                cells.append(f"{s['accuracy_mean']:.1f} ± {s['accuracy_std']:.1f}")
            else:
                low, high = s["delta_ci95"]
                cells.append(f"{s['accuracy_mean']:.1f} (Δ {s['delta_vs_qat']:+.1f} [{low:+.1f}, {high:+.1f}])")
        print("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")


def plot_map(summary: list[dict], plan: Plan, path: Path) -> None:
    plt = pyplot()
    present = {s["mode"] for s in summary}
    modes = [m for m in dict.fromkeys(plan.modes + plan.noisy_modes) if m != BASELINE and m in present]
    columns = map_columns(summary, plan)
    bits = sorted({s["w_bits"] for s in summary})
    fig, axes = plt.subplots(len(plan.archs), len(columns), figsize=(3.6 * len(columns) + 0.6,
                             3.2 * len(plan.archs) + 0.4), squeeze=False, sharey=True)
    index = {(s["regime"], s.get("noise", 0.0), s["model"], s["w_bits"], s["mode"]): s for s in summary}
    for i, arch in enumerate(plan.archs):
        for j, (regime, noise) in enumerate(columns):
            ax = axes[i][j]
            for k, mode in enumerate(modes):
                xs, ys, lo, hi = [], [], [], []
                for b in bits:
                    s = index.get((regime, noise, arch.kind, b, mode))
                    if s and s["delta_vs_qat"] is not None:
                        xs.append(b + (k - len(modes) / 2) * 0.1)
                        ys.append(s["delta_vs_qat"])
                        lo.append(s["delta_vs_qat"] - s["delta_ci95"][0])
                        hi.append(s["delta_ci95"][1] - s["delta_vs_qat"])
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, color=MAP_COLOURS.get(mode), label=mode)
            ax.axhline(0, color="black", lw=0.8)
            ax.axhline(-1, color="black", lw=0.6, ls=":")
            ax.set_xticks(bits, [f"W{b}A{b}" for b in bits])
            where = f"{regime}, {noise:.0%} label noise" if noise else regime
            ax.set_title(f"{arch.kind}: {where}", fontsize=9)
            if j == 0:
                ax.set_ylabel("SAQ − QAT, test top-1 (pt)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(modes)), fontsize=8)
    fig.suptitle("Regime map: seed-paired difference to plain QAT (95 % CI); dotted: −1 pt", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_safety(summary: list[dict], plan: Plan, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(plan.safety_bits), figsize=(4 * len(plan.safety_bits), 3.2), squeeze=False,
                             sharey=True)
    colours = {"qat": "tab:blue", "saq": "tab:red", "saq_at_once": "tab:orange", "saq_paper": "tab:gray"}
    for j, bits in enumerate(plan.safety_bits):
        ax = axes[0][j]
        for mode in plan.safety_modes:
            rows = sorted((s for s in summary if s["w_bits"] == bits and s["mode"] == mode), key=lambda s: s["width"])
            ax.errorbar([s["width"] for s in rows], [s["accuracy_mean"] for s in rows],
                        yerr=[s["accuracy_std"] for s in rows], marker="o", capsize=3, color=colours[mode], label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ViT width")
        ax.set_title(f"W{bits}A{bits}, from scratch", fontsize=10)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_noisy(summary: list[dict], plan: Plan, path: Path) -> None:
    """One row of panels per noise rate; in each, every (model, bits) cell with its modes side by side."""
    plt = pyplot()
    present = {s["mode"] for s in summary}
    modes = [m for m in plan.noisy_modes if m != BASELINE and m in present]
    rates = sorted({s["noise"] for s in summary}, reverse=True)
    cells = sorted({(s["model"], s["w_bits"]) for s in summary})
    index = {(s["noise"], s["model"], s["w_bits"], s["mode"]): s for s in summary}
    fig, axes = plt.subplots(len(rates), 1, figsize=(min(16, 1.5 + 0.22 * len(cells) * len(modes)), 3.0 * len(rates)),
                             squeeze=False, sharey=True)
    for row, noise in enumerate(rates):
        ax = axes[row][0]
        for k, mode in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for i, cell in enumerate(cells):
                s = index.get((noise,) + cell + (mode,))
                if s and s["delta_vs_qat"] is not None:
                    xs.append(i + (k - (len(modes) - 1) / 2) * 0.1)
                    ys.append(s["delta_vs_qat"])
                    lo.append(s["delta_vs_qat"] - s["delta_ci95"][0])
                    hi.append(s["delta_ci95"][1] - s["delta_vs_qat"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, color=MAP_COLOURS.get(mode), label=mode)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(cells)), [f"{m} W{b}A{b}" for m, b in cells], fontsize=8)
        ax.set_ylabel("Δ to QAT, test top-1 (pt)", fontsize=8)
        ax.set_title(f"{noise:.0%} of the training and validation labels wrong (test labels clean)", fontsize=9)
    axes[-1][0].legend(fontsize=7, ncol=4, loc="upper right")
    fig.suptitle("Noisy labels, long QAT: seed-paired difference to plain QAT (95 % CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
