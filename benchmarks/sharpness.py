"""Are SAQ's minima flatter? Sharpness of the final quantized models of the accuracy run, SAQ vs QAT.

    python benchmarks/accuracy.py && python benchmarks/sharpness.py
    python benchmarks/sharpness.py --quick --results /tmp/quick   # after accuracy.py --quick --out /tmp/quick

Reads ``accuracy.json`` (the final models it saved under benchmarks/cache/final/) and measures each with
:func:`saq_hf.landscape.sharpness_report` on a fixed sample of the training (fit) split: the top Hessian
eigenvalue w.r.t. ``Q(w)``, and the loss increase under random and adversarial perturbations of radius ρ
(the ρ the model was trained with). It also draws the 1-D loss along one random filter-normalised
direction around ``Q(w)``, SAQ vs QAT (landscape.png). Writes sharpness.json/.png, landscape.json/.png.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    DEFAULT_RESULTS,
    batches_of,
    in_parallel,
    load_pretrained,
    load_splits,
    machine,
    pyplot,
    quiet,
    save_figure,
)

BASELINE, METHOD = "qat", "saq"
TARGET_RATIO = 0.7


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples and iterations (smoke test)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="folder with accuracy.json; sharpness/landscape outputs go there too")
    parser.add_argument("--modes", default="qat,case2,saq,saq_reuse_grad",
                        help="comma list of modes to measure (default qat,case2,saq,saq_reuse_grad)")
    parser.add_argument("--all-seeds", action="store_true", help="measure every seed, not only the first")
    parser.add_argument("--samples", type=int, help="fit-split samples to measure on (default 512; quick 64)")
    parser.add_argument("--n-iter", type=int, help="power-iteration steps (default 20; quick 5)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def measure(row: dict, samples: int, n_iter: int, limit: int | None, alphas: list[float], threads: int) -> dict:
    """Sharpness report and 1-D loss curve of one saved final model (runs in a worker)."""
    from saq_hf.landscape import loss_curve, sharpness_report

    quiet()
    torch.set_num_threads(threads)
    splits = load_splits(row["dataset"], limit)
    batches = batches_of(splits.train_x, splits.train_y, 128, samples)
    model = load_pretrained(row["model"], Path(row["saved_to"]))
    start = time.perf_counter()
    # ρ = 0 for a QAT model would measure nothing: every model is probed at the same radius, the SAQ one.
    report = sharpness_report(model, batches, rho=row["probe_rho"], n_iter=n_iter, n_random=5, seed=0)
    curve = loss_curve(model, batches, alphas=alphas, seed=0)
    keep = ("model", "dataset", "w_bits", "a_bits", "mode", "seed", "accuracy", "saved_to")
    # "rho" below is the probe radius of the report; the radius the model was trained with is kept apart.
    return {**{k: row[k] for k in keep}, "trained_rho": row["rho"], **report, "curve": curve,
            "measure_seconds": time.perf_counter() - start}


def ratios(rows: list[dict]) -> list[dict]:
    """Per (model, dataset, bits): each mode's mean top eigenvalue over seeds divided by QAT's."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["dataset"], r["w_bits"], r["mode"])].append(r)
    out = []
    for (arch, ds, bits, mode), runs in sorted(groups.items()):
        base = groups.get((arch, ds, bits, BASELINE))
        if mode == BASELINE or not base:
            continue

        def mean(key, group):
            return sum(r[key] for r in group) / len(group)

        ratio = mean("top_eigenvalue", runs) / mean("top_eigenvalue", base)
        out.append({"model": arch, "dataset": ds, "w_bits": bits, "mode": mode, "n_seeds": len(runs),
                    "eigenvalue_ratio_vs_qat": ratio,
                    "adversarial_increase_ratio_vs_qat": mean("adversarial_loss_increase", runs)
                    / mean("adversarial_loss_increase", base),
                    "random_increase_ratio_vs_qat": mean("random_loss_increase", runs)
                    / mean("random_loss_increase", base) if mean("random_loss_increase", base) else None,
                    "goal_met": ratio <= TARGET_RATIO if mode == METHOD else None})
    return out


def print_table(rows: list[dict], ratio_rows: list[dict]) -> None:
    print("\nSharpness w.r.t. Q(w) on the fit split (ρ = the SAQ radius of that model; mean over seeds measured)")
    print(f"{'model':9s}{'data':7s}{'bits':6s}{'mode':16s}{'test acc':>9s}{'loss':>8s}{'λ_max':>10s}"
          f"{'Δloss rand':>12s}{'Δloss adv':>11s}{'||Q(w)||':>10s}")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["dataset"], r["w_bits"], r["mode"])].append(r)
    for (arch, ds, bits, mode), runs in sorted(groups.items()):
        def mean(key):
            return sum(r[key] for r in runs) / len(runs)

        print(f"{arch:9s}{ds:7s}{'W%dA%d' % (bits, bits):6s}{mode:16s}{mean('accuracy'):9.2f}{mean('loss'):8.4f}"
              f"{mean('top_eigenvalue'):10.3f}{mean('random_loss_increase'):12.5f}"
              f"{mean('adversarial_loss_increase'):11.5f}{mean('quantized_weight_norm'):10.2f}")
    print(f"\nλ_max ratio to qat (goal for saq: <= {TARGET_RATIO})")
    for r in ratio_rows:
        verdict = "" if r["goal_met"] is None else ("  met" if r["goal_met"] else "  MISSED")
        print(f"{r['model']:9s}{r['dataset']:7s}W{r['w_bits']}A{r['w_bits']} {r['mode']:16s}"
              f"λ {r['eigenvalue_ratio_vs_qat']:.2f}x   adv Δloss {r['adversarial_increase_ratio_vs_qat']:.2f}x"
              f"{verdict}")


def plot_sharpness(rows: list[dict], modes: list[str], path: Path) -> None:
    plt = pyplot()
    configs = sorted({(r["model"], r["dataset"]) for r in rows})
    metrics = [("top_eigenvalue", "top Hessian eigenvalue λ_max"),
               ("adversarial_loss_increase", "loss increase, adversarial ε")]
    fig, axes = plt.subplots(len(metrics), len(configs), figsize=(max(4.8 * len(configs), 8), 7), squeeze=False)
    for col, (arch, ds) in enumerate(configs):
        bits = sorted({r["w_bits"] for r in rows if (r["model"], r["dataset"]) == (arch, ds)})
        present = [m for m in modes if any(r["mode"] == m and r["model"] == arch for r in rows)]
        width = 0.8 / max(len(present), 1)
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for i, mode in enumerate(present):
                values = []
                for b in bits:
                    runs = [r[key] for r in rows if (r["model"], r["dataset"], r["w_bits"], r["mode"]) == (arch, ds, b, mode)]
                    values.append(sum(runs) / len(runs) if runs else float("nan"))
                ax.bar([j + (i - (len(present) - 1) / 2) * width for j in range(len(bits))], values, width, label=mode,
                       color=f"C{modes.index(mode)}")
            ax.set_xticks(range(len(bits)), [f"W{b}A{b}" for b in bits])
            ax.set_ylabel(label)
            ax.set_title(f"{arch} / {ds}")
            ax.grid(alpha=0.3, axis="y")
    save_figure(fig, axes, "Sharpness w.r.t. Q(w) of the final quantized models (lower = flatter)", path)


def plot_landscape(rows: list[dict], modes: list[str], path: Path) -> None:
    plt = pyplot()
    configs = sorted({(r["model"], r["dataset"]) for r in rows})
    bits = sorted({r["w_bits"] for r in rows})
    fig, axes = plt.subplots(len(configs), len(bits), figsize=(max(4.2 * len(bits), 8), 3.4 * len(configs)),
                             squeeze=False)
    for i, (arch, ds) in enumerate(configs):
        for j, b in enumerate(bits):
            ax = axes[i][j]
            for mode in modes:
                runs = [r for r in rows if (r["model"], r["dataset"], r["w_bits"], r["mode"]) == (arch, ds, b, mode)]
                if runs:
                    run = min(runs, key=lambda r: r["seed"])
                    ax.plot(run["curve"]["alphas"], run["curve"]["losses"], label=f"{mode} (seed {run['seed']})",
                            color=f"C{modes.index(mode)}", linewidth=2.2 if mode in (BASELINE, METHOD) else 1.2)
            ax.set_title(f"{arch} / {ds}  W{b}A{b}")
            ax.set_xlabel("α  (Q(w) + α·d, d filter-normalised)")
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
    save_figure(fig, axes, "1-D loss landscape around the final quantized weights, same random direction seed", path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    accuracy = json.loads((args.results / "accuracy.json").read_text())
    modes = args.modes.split(",")
    samples = args.samples or (64 if args.quick else 512)
    n_iter = args.n_iter or (5 if args.quick else 20)
    limit = accuracy["plan"]["limit"]
    points = 11 if args.quick else 21
    alphas = [round(-0.5 + i / (points - 1), 6) for i in range(points)]  # exactly 0.0 in the middle
    main_dataset = accuracy["plan"]["dataset"]
    first_seed = min(r["seed"] for r in accuracy["rows"])
    selected = [dict(r, probe_rho=accuracy["rho"][r["model"]]) for r in accuracy["rows"]
                if r["dataset"] == main_dataset and r["mode"] in modes and r.get("saved_to")
                and Path(r["saved_to"]).exists() and (args.all_seeds or r["seed"] == first_seed)]
    if not selected:
        raise SystemExit(f"no saved final models for modes {modes} in {args.results / 'accuracy.json'}: "
                         "run benchmarks/accuracy.py first")
    print(f"measuring {len(selected)} models on {samples} fit-split samples, {n_iter} power iterations")
    calls = [(row, samples, n_iter, limit, alphas, args.threads) for row in selected]
    rows = list(in_parallel(measure, calls, min(args.jobs, len(calls)), args.threads))
    order = {m: i for i, m in enumerate(modes)}
    rows.sort(key=lambda r: (r["model"], r["w_bits"], order[r["mode"]], r["seed"]))
    ratio_rows = ratios(rows)
    print_table(rows, ratio_rows)
    common = {"machine": machine(), "samples": samples, "n_iter": n_iter, "probe_rho": accuracy["rho"],
              "command": "python benchmarks/sharpness.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    sharp = {**common, "rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
             "ratios": ratio_rows, "total_seconds": time.perf_counter() - start}
    landscape = {**common, "direction": "filter-normalised Gaussian, seed 0, quantized weights only",
                 "curves": [{k: r[k] for k in ("model", "dataset", "w_bits", "mode", "seed", "curve")} for r in rows]}
    (args.results / "sharpness.json").write_text(json.dumps(sharp, indent=1))
    (args.results / "landscape.json").write_text(json.dumps(landscape, indent=1))
    plot_sharpness(rows, modes, args.results / "sharpness.png")
    plot_landscape(rows, modes, args.results / "landscape.png")
    print(f"\nwrote sharpness.json/.png and landscape.json/.png to {args.results} "
          f"({time.perf_counter() - start:.0f} s)")
    return sharp


if __name__ == "__main__":
    main()
