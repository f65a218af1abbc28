"""Does SAQ beat plain QAT? Test accuracy of small ViT / ConvNeXt models at W2A2, W3A3, W4A4, every mode.

    python benchmarks/accuracy.py            # the full run (~40 min on 2 cores), writes benchmarks/results/
    python benchmarks/accuracy.py --quick    # seconds: tiny models, 256 images (the CI smoke test)

Stage 1 trains each model in floating point until test accuracy has plateaued (cached under
benchmarks/cache/fp/, reused by later runs). Stage 2 quantizes the FP weights and fine-tunes them with
``SAQTrainer`` in every mode (qat, case1, case2, saq, and SAQ's efficient strategies) with the same
epochs, learning rate, schedule and seeds; each run's final model is tested once on the test split. ρ is
chosen on the validation split (carved from train), never on test. Finished runs are journaled under
the cache, so an interrupted run resumes where it stopped.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_RESULTS,
    MODES,
    FPRecipe,
    ModelSize,
    QATRecipe,
    RunSpec,
    in_parallel,
    load_splits,
    machine,
    plateau,
    pyplot,
    run_all,
    save_figure,
    train_fp,
)
from stats import mean_std  # noqa: E402

BASELINE, METHOD = "qat", "saq"
EFFICIENT = ("saq_every_k", "saq_reuse_grad")


@dataclass(frozen=True)
class Plan:
    """Which runs make up one benchmark invocation."""

    models: tuple = ("vit", "convnext")
    dataset: str = "mnist"
    bits: tuple = (2, 3, 4)
    modes: tuple = tuple(MODES)
    seeds: tuple = (0, 1, 2)
    # The cross-check on scikit-learn's digits: fewer modes, same bits and seeds.
    cross_dataset: str | None = "digits"
    cross_modes: tuple = ("qat", "saq")
    cross_bits: tuple = (2,)
    # Case 1 / Case 2 are ablations of where ε lives: run at the bit-widths where the cases differ most.
    ablation_modes: tuple = ("case1", "case2")
    ablation_bits: tuple = (2,)
    # ρ chosen per architecture on the validation split: SAQ at these bit-widths and seeds, best mean.
    rho_grid: dict = field(default_factory=lambda: {"vit": (0.001, 0.002, 0.005), "convnext": (0.001, 0.002, 0.005)})  # relative radii
    sweep_bits: tuple = (2, 3)
    sweep_seeds: tuple = (0,)
    size: ModelSize = ModelSize()
    fp: FPRecipe = FPRecipe()
    qat: QATRecipe = QATRecipe()
    limit: int | None = None


FULL = Plan()
QUICK = Plan(
    bits=(2,), seeds=(0,), cross_modes=("qat", "saq"), rho_grid={"vit": (0.002, 0.005), "convnext": (0.002, 0.005)},
    sweep_bits=(2,),
    size=ModelSize(vit_layers=1, vit_width=16, vit_heads=2, vit_mlp=32, convnext_widths=(8, 16),
                   convnext_depths=(1, 1)),
    fp=FPRecipe(epochs=2, batch_size=64), qat=QATRecipe(epochs=1, batch_size=64, calibration_batches=1), limit=256,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test in seconds")
    parser.add_argument("--models", help="comma list, subset of vit,convnext")
    parser.add_argument("--bits", help="comma list of bit-widths (WbAb), e.g. 2,3")
    parser.add_argument("--modes", help=f"comma list, subset of {','.join(MODES)}")
    parser.add_argument("--seeds", help="comma list of seeds")
    parser.add_argument("--qat-epochs", type=int, help="stage-2 epochs (every mode)")
    parser.add_argument("--rho", type=float, help="use this ρ for every model instead of the validation sweep")
    parser.add_argument("--adaptive", action="store_true", help="ASAM-style adaptive ε (saq_adaptive)")
    parser.add_argument("--perturb", default="bias_norm", choices=("none", "bias_norm", "bias_norm_step_size"),
                        help="saq_perturb: parameters perturbed besides the weights (default bias_norm)")
    parser.add_argument("--no-cross-check", action="store_true", help="skip the digits cross-check")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="FP models, journal, final models")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="where accuracy.json/.png go")
    return parser.parse_args(argv)


def _csv(text, cast=str):
    return tuple(cast(v) for v in text.split(",")) if text else None


def plan_from(args) -> Plan:
    plan = QUICK if args.quick else FULL
    changes = {"models": _csv(args.models), "bits": _csv(args.bits, int), "modes": _csv(args.modes),
               "seeds": _csv(args.seeds, int)}
    plan = replace(plan, **{k: v for k, v in changes.items() if v is not None})
    if args.qat_epochs:
        plan = replace(plan, qat=replace(plan.qat, epochs=args.qat_epochs))
    if args.no_cross_check:
        plan = replace(plan, cross_dataset=None)
    unknown = set(plan.modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s) {sorted(unknown)}: choose from {', '.join(MODES)}")
    return plan


# ------------------------------------------------------------------------------------------------ stages
def fp_stage(plan: Plan, args) -> dict:
    datasets = [plan.dataset] + ([plan.cross_dataset] if plan.cross_dataset else [])
    calls = [(arch, ds, plan.size, plan.fp, args.cache, plan.limit, args.threads)
             for arch in plan.models for ds in datasets]
    records = {}
    for record in in_parallel(train_fp, calls, min(args.jobs, len(calls)), args.threads):
        records[(record["model"], record["dataset"])] = {**record, "plateau": plateau(record["curve"])}
    print("\nStage 1, full precision (cached; test accuracy of the last epochs shows the plateau)")
    print(f"{'model':10s}{'dataset':8s}{'params':>8s}{'epochs':>7s}{'val':>8s}{'test':>8s}"
          f"{'last-5 spread':>15s}{'last-10 gain':>14s}{'seconds':>9s}")
    for (arch, ds), r in records.items():
        print(f"{arch:10s}{ds:8s}{r['params']:8d}{len(r['curve']):7d}{r['val_accuracy']:8.2f}"
              f"{r['test_accuracy']:8.2f}{r['plateau']['last5_spread']:12.2f} pt{r['plateau']['last10_gain']:+11.2f} pt"
              f"{r['train_seconds']:9.0f}")
    return records


def spec(plan, fp, args, arch, dataset, bits, mode, rho, seed, save_dir=None) -> RunSpec:
    run = RunSpec(model=arch, dataset=dataset, w_bits=bits, a_bits=bits, mode=mode, rho=rho, seed=seed,
                  fp_path=fp[(arch, dataset)]["path"], recipe=plan.qat, limit=plan.limit, adaptive=args.adaptive,
                  perturb=args.perturb)
    if save_dir is not None:
        run = replace(run, save_to=str(save_dir / f"{arch}_{dataset}_W{bits}A{bits}_{mode}_seed{seed}_{run.key()}"))
    return run


def rho_stage(plan: Plan, fp: dict, args) -> tuple[dict, list]:
    """ρ per architecture: the grid value with the best mean validation accuracy of full SAQ."""
    if args.rho is not None:
        return {arch: args.rho for arch in plan.models}, []
    # Saved like the main grid's runs, so the main grid reuses the qat runs and the chosen ρ's saq runs.
    specs = [spec(plan, fp, args, arch, plan.dataset, bits, mode, rho, seed, args.cache / "final")
             for arch in plan.models for bits in plan.sweep_bits for seed in plan.sweep_seeds
             for mode, grid in ((BASELINE, (0.0,)), (METHOD, plan.rho_grid[arch])) for rho in grid]
    print(f"\nρ sweep on the validation split ({len(specs)} runs)")
    rows = run_all(specs, args.jobs, args.threads, args.cache / "journal.jsonl", args.cache / "scratch")
    chosen = {}
    print(f"{'model':10s}{'rho':>7s}" + "".join(f"{'val W%dA%d' % (b, b):>11s}" for b in plan.sweep_bits)
          + f"{'mean':>8s}")
    for arch in plan.models:
        scores = {}
        for mode, rho in [(BASELINE, 0.0)] + [(METHOD, r) for r in plan.rho_grid[arch]]:
            by_bits = [mean_std([r["val_accuracy"] for r in rows if r["model"] == arch and r["mode"] == mode
                                 and r["rho"] == rho and r["w_bits"] == b])[0] for b in plan.sweep_bits]
            label = "qat" if mode == BASELINE else f"{rho:g}"
            print(f"{arch:10s}{label:>7s}" + "".join(f"{v:11.2f}" for v in by_bits)
                  + f"{sum(by_bits) / len(by_bits):8.2f}")
            if mode == METHOD:
                scores[rho] = sum(by_bits) / len(by_bits)
        chosen[arch] = max(scores, key=scores.get)
        print(f"{arch}: rho = {chosen[arch]:g}")
    return chosen, rows


def main_specs(plan: Plan, fp: dict, rho: dict, args) -> list[RunSpec]:
    """The stage-2 runs, most important first (qat and saq everywhere, then the efficient strategies, the
    case ablations, the cross-check), so a run cut short still answers the main question."""
    save_dir = args.cache / "final"
    specs = [spec(plan, fp, args, arch, plan.dataset, bits, mode, rho[arch], seed, save_dir)
             for arch in plan.models for bits in plan.bits for mode in plan.modes for seed in plan.seeds
             if mode not in plan.ablation_modes or bits in plan.ablation_bits]
    if plan.cross_dataset:
        specs += [spec(plan, fp, args, arch, plan.cross_dataset, bits, mode, rho[arch], seed, save_dir)
                  for arch in plan.models for bits in plan.cross_bits for mode in plan.cross_modes
                  if mode in plan.modes for seed in plan.seeds]
    priority = {mode: i for i, mode in enumerate((BASELINE, METHOD) + EFFICIENT + plan.ablation_modes)}
    return sorted(specs, key=lambda s: (s.dataset != plan.dataset, priority.get(s.mode, len(priority)), s.seed))


# ------------------------------------------------------------------------------------------------ report
def summarize(rows: list[dict]) -> list[dict]:
    """Mean ± std per (model, dataset, bits, mode), with the seed-paired difference to plain QAT."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["dataset"], r["w_bits"], r["mode"])].append(r)
    summary = []
    for (arch, ds, bits, mode), runs in groups.items():
        mean, std = mean_std([r["accuracy"] for r in runs])
        baseline = {r["seed"]: r["accuracy"] for r in groups.get((arch, ds, bits, BASELINE), [])}
        paired = [r["accuracy"] - baseline[r["seed"]] for r in runs if r["seed"] in baseline]
        delta, delta_std = mean_std(paired) if paired else (None, None)
        seconds = mean_std([r["train_seconds"] for r in runs])[0]
        base_seconds = mean_std([r["train_seconds"] for r in groups[(arch, ds, bits, BASELINE)]])[0] \
            if (arch, ds, bits, BASELINE) in groups else None
        summary.append({"model": arch, "dataset": ds, "w_bits": bits, "a_bits": bits, "mode": mode,
                        "rho": runs[0]["rho"], "n_seeds": len(runs), "accuracy_mean": mean, "accuracy_std": std,
                        "val_accuracy_mean": mean_std([r["val_accuracy"] for r in runs])[0],
                        "delta_vs_qat_mean": delta, "delta_vs_qat_std": delta_std, "train_seconds_mean": seconds,
                        "cost_vs_qat": seconds / base_seconds if base_seconds else None})
    return summary


def goals(summary: list[dict]) -> list[dict]:
    """The targets, checked per model and dataset: SAQ − QAT ≥ +1.0 pt at W2A2 and W3A3, ≥ 0 at
    W4A4; each efficient strategy keeps ≥ 80% of full SAQ's gain."""
    index = {(s["model"], s["dataset"], s["w_bits"], s["mode"]): s for s in summary}
    checks = []
    for (arch, ds, bits, mode), s in index.items():
        if mode != METHOD or s["delta_vs_qat_mean"] is None:
            continue
        target = 1.0 if bits <= 3 else 0.0
        checks.append({"model": arch, "dataset": ds, "bits": bits, "check": "saq - qat (pt)",
                       "value": s["delta_vs_qat_mean"], "target": f">= {target:+.1f}",
                       "met": s["delta_vs_qat_mean"] >= target})
        for eff in EFFICIENT:
            e = index.get((arch, ds, bits, eff))
            if e is None or e["delta_vs_qat_mean"] is None:
                continue
            gain = s["delta_vs_qat_mean"]
            kept = e["delta_vs_qat_mean"] / gain if gain > 0 else None
            checks.append({"model": arch, "dataset": ds, "bits": bits, "check": f"{eff} share of saq gain",
                           "value": kept, "target": ">= 0.80 (needs saq gain > 0)",
                           "met": kept is not None and kept >= 0.8})
    return checks


def print_table(summary: list[dict], modes: tuple) -> None:
    index = {(s["model"], s["dataset"], s["w_bits"], s["mode"]): s for s in summary}
    configs = sorted({(s["model"], s["dataset"], s["w_bits"]) for s in summary}, key=lambda c: (c[1] != "mnist", c))
    present = [m for m in modes if any((*c, m) in index for c in configs)]
    print("\nTest accuracy (%), mean ± std over seeds; Δ = seed-paired difference to qat (pt)")
    print(f"{'model':9s}{'data':7s}{'bits':6s}" + "".join(f"{m:>16s}" for m in present))
    for config in configs:
        cells = []
        for m in present:
            s = index.get((*config, m))
            cells.append(f"{s['accuracy_mean']:7.2f} ± {s['accuracy_std']:4.2f}" if s else "")
        print(f"{config[0]:9s}{config[1]:7s}{'W%dA%d' % (config[2], config[2]):6s}" + "".join(f"{c:>16s}" for c in cells))
        deltas = []
        for m in present:
            s = index.get((*config, m))
            deltas.append(f"Δ {s['delta_vs_qat_mean']:+5.2f} ± {s['delta_vs_qat_std']:4.2f}"
                          if s and m != BASELINE and s["delta_vs_qat_mean"] is not None else "")
        print(f"{'':22s}" + "".join(f"{d:>16s}" for d in deltas))
    costs = defaultdict(list)
    for s in summary:
        if s["cost_vs_qat"] is not None:
            costs[s["mode"]].append(s["cost_vs_qat"])
    print("training time relative to qat (mean over configs): "
          + ", ".join(f"{m} {sum(costs[m]) / len(costs[m]):.2f}x" for m in present if costs[m]))


def plot(summary: list[dict], fp: dict, modes: tuple, path: Path) -> None:
    plt = pyplot()
    configs = sorted({(s["model"], s["dataset"]) for s in summary}, key=lambda c: (c[1] != "mnist", c))
    fig, axes = plt.subplots(1, len(configs), figsize=(max(4.6 * len(configs), 8), 4), squeeze=False)
    for ax, (arch, ds) in zip(axes[0], configs):
        for i, mode in enumerate(m for m in modes if any(s["mode"] == m for s in summary)):
            points = sorted((s["w_bits"], s["accuracy_mean"], s["accuracy_std"]) for s in summary
                            if (s["model"], s["dataset"], s["mode"]) == (arch, ds, mode))
            if not points:
                continue
            bits, means, stds = zip(*points)
            offset = (i - len(modes) / 2) * 0.03
            ax.errorbar([b + offset for b in bits], means, yerr=stds, marker="o", capsize=3, label=mode,
                        color=f"C{list(modes).index(mode)}", linewidth=2.2 if mode in (BASELINE, METHOD) else 1.2)
        if (arch, ds) in fp:
            ax.axhline(fp[(arch, ds)]["test_accuracy"], color="grey", linestyle="--", label="FP32")
        ax.set_title(f"{arch} / {ds}")
        ax.set_xlabel("bits (W = A)")
        ax.set_xticks(sorted({s["w_bits"] for s in summary}))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    save_figure(fig, axes, "SAQ vs QAT: test accuracy vs bit-width (mean ± std over seeds)", path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = plan_from(args)
    start = time.perf_counter()
    splits = {ds: load_splits(ds, plan.limit).sizes() for ds in filter(None, (plan.dataset, plan.cross_dataset))}
    print(f"data: {splits}; models: {plan.models}; bits: {plan.bits}; modes: {plan.modes}; seeds: {plan.seeds}")
    fp = fp_stage(plan, args)
    rho, sweep_rows = rho_stage(plan, fp, args)
    specs = main_specs(plan, fp, rho, args)
    print(f"\nStage 2: {len(specs)} QAT runs ({args.jobs} jobs x {args.threads} thread(s))")
    rows = run_all(specs, args.jobs, args.threads, args.cache / "journal.jsonl", args.cache / "scratch")
    summary = summarize(rows)
    print_table(summary, plan.modes)
    checks = goals(summary)
    for c in checks:
        value = "n/a" if c["value"] is None else f"{c['value']:+.2f}"
        print(f"goal {c['model']:9s}{c['dataset']:7s}W{c['bits']}A{c['bits']} {c['check']:32s}{value:>7s} "
              f"(target {c['target']}): {'met' if c['met'] else 'MISSED'}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python benchmarks/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "jobs": args.jobs, "threads_per_job": args.threads,
        "total_seconds": time.perf_counter() - start,
        "plan": asdict(plan), "splits": splits, "rho": rho, "fp": list(fp.values()),
        "rho_sweep": sweep_rows, "rows": rows, "summary": summary, "goals": checks,
    }
    (args.out / "accuracy.json").write_text(json.dumps(result, indent=1))
    plot(summary, fp, plan.modes, args.out / "accuracy.png")
    print(f"\nwrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.png'} "
          f"({result['total_seconds']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
