"""Mixed precision under a size budget: searched bit allocations against uniform W3 and random allocations.

    flock /tmp/saq-cpu.lock python benchmarks/mixed.py --jobs 2 --modes qat,saq   # 5 seeds, ~20 min on 2 cores
    python benchmarks/mixed.py --jobs 2 --modes qat,saq --qat_epochs 2   # the same with short training, ~5 min
    python benchmarks/mixed.py --quick --jobs 1                     # seconds: tiny models, 1 seed (CI smoke test)
    python benchmarks/mixed.py --report --modes qat,saq             # tables and figure from the journal, no runs

The regime map's long-QAT setting (``benchmarks/regimes.py``): 8x8 digits, a ViT (width 64, 2 layers) and a
ConvNeXt (width 64), each seed with its own FP model trained to a plateau (40 epochs), then 20 epochs of QAT. Per
seed, ``saq_hf.search_bits`` measures every layer's sensitivity at 2, 3, 4 and 8 bits (``a_bits = w_bits``) on two
batches of 32 training images (``saq-hf search``'s default) of that seed's FP model, with both measures
(``sharpness``: loss with the layer alone quantized and moved by SAQ's ε at the training radius; ``hessian``:
Hutchinson trace × quantization error), and allocates at an average of 2.5 and of 3 weight bits over the searched
layers. ``random`` is the same solver on random scores (the seed's own draw): a random allocation that fills the
same budget. Every allocation and the uniform W2A2, W3A3 and W4A4 models then get the same QAT schedule;
``--modes qat,saq`` adds the same schedule with SAQ (the library's defaults) for uniform W3A3 and the allocations at
3 bits. The patch embedding and classifier stay at 8 bits in every model (the architecture rule). The search's cost
is timed alone after the runs (:func:`cost_one`).

Reported: test top-1 with the validation top-1 beside it; no choice is made on test (the search sees training
batches only, and nothing is tuned). Differences are seed-paired with 95 % t-intervals. Bytes are the packed weight
codes as ``saq-hf export`` writes them (the same count for W3A3 and an average of 3 bits, up to byte rounding).
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_RESULTS,
    _common_args,
    accuracy,
    batches_of,
    in_parallel,
    journaled,
    machine,
    pyplot,
    quiet,
    read_journal,
    settings_key,
    train_timed,
)
from digits import Arch, Schedule, data_for, fp_dir, fp_model  # noqa: E402
from regime_run import FIXED_RHO  # noqa: E402
from stats import mean_std, t_interval  # noqa: E402

MEASURES = ("sharpness", "hessian")
# Label -> SAQTrainingArguments fields of the training schedule every allocation gets.
MODES = {"qat": {"saq_mode": "qat"}, "saq": {"saq_mode": "saq"}}


@dataclass(frozen=True)
class Plan:
    archs: tuple = (Arch("vit", 64, 2), Arch("convnext", 64))
    seeds: tuple = (0, 1, 2, 3, 4)
    fp_schedule: Schedule = Schedule(40, 1e-3, 64)  # the regime map's FP stage (its cache is shared)
    qat_schedule: Schedule = Schedule(20, 5e-4, 128)  # the regime map's long QAT
    targets: tuple = (2.5, 3.0)
    uniform_bits: tuple = (2, 3, 4)
    candidates: tuple = (2, 3, 4, 8)
    search_batches: int = 2
    search_batch_size: int = 32  # 64 images: what `saq-hf search` measures on by default
    modes: tuple = ("qat",)
    # With --modes qat,saq: the allocations that also get the SAQ schedule (the 2-core budget covers these).
    saq_labels: tuple = ("uniform_W3", "sharpness@3", "hessian@3", "random@3")
    limit: int | None = None


FULL = Plan()
QUICK = Plan(archs=(Arch("vit", 16, 1), Arch("convnext", 16)), seeds=(0,), fp_schedule=Schedule(1, 1e-3, 64),
             qat_schedule=Schedule(1, 5e-4, 64), uniform_bits=(2, 3), search_batches=1, search_batch_size=32,
             limit=256)


# ------------------------------------------------------------------------------------------------------ search
@dataclass(frozen=True)
class Search:
    arch: Arch
    seed: int
    fp_path: str
    plan: Plan

    def key(self) -> str:
        fields = {"arch": asdict(self.arch), "seed": self.seed, "fp": Path(self.fp_path).name,
                  "targets": self.plan.targets, "candidates": self.plan.candidates,
                  "batches": (self.plan.search_batches, self.plan.search_batch_size), "limit": self.plan.limit}
        return "search-" + settings_key(fields)


def _search_setup(plan: Plan, fp_path: str, threads: int) -> tuple:
    """The FP model and the search batches, after an untimed warm-up search: the first call of a process compiles
    the fused LSQ kernels (QAT pays that too, once)."""
    from saq_hf import search_bits
    from transformers import AutoModelForImageClassification

    quiet()
    torch.set_num_threads(threads)
    splits = data_for("long_qat", plan.limit)
    model = AutoModelForImageClassification.from_pretrained(fp_path)
    batches = batches_of(splits.train_x, splits.train_y, plan.search_batch_size,
                         plan.search_batches * plan.search_batch_size)
    search_bits(model, batches[:1], target_bits=max(plan.candidates), candidates=(8,), measure="sharpness")
    return model, batches


def search_one(spec: Search, threads: int, scratch: Path) -> dict:
    """Both measures at every target for one seed's FP model, the random allocations, and the search's time."""
    from saq_hf import search_bits
    from saq_hf.search import reallocate

    plan = spec.plan
    model, batches = _search_setup(plan, spec.fp_path, threads)
    plans, seconds = {}, {}
    for measure in MEASURES:
        start = time.perf_counter()
        found = search_bits(model, batches, target_bits=plan.targets[-1], measure=measure,
                            candidates=plan.candidates)
        seconds[measure] = time.perf_counter() - start
        for target in plan.targets:
            plans[f"{measure}@{target:g}"] = reallocate(found, target_bits=target)
    rng = np.random.default_rng(20_000 + spec.seed)
    names = [row["name"] for row in found.layers if not row["pinned"]]
    scores = {name: {bits: float(rng.random()) for bits in plan.candidates} for name in names}
    for target in plan.targets:
        plans[f"random@{target:g}"] = reallocate(found, target_bits=target, sensitivity=scores)
    pinned_bytes = sum(row["bytes"] for row in found.layers if row["pinned"])
    from saq_hf.packing import packed_size

    uniform_bytes = {bits: pinned_bytes + sum(packed_size(row["weights"], bits) for row in found.layers
                                              if not row["pinned"]) for bits in plan.uniform_bits}
    return {"key": spec.key(), "model": spec.arch.kind, "seed": spec.seed, "search_seconds": seconds,
            "search_images": plan.search_batches * plan.search_batch_size,
            "searched_layers": len(names), "uniform_bytes": {str(b): n for b, n in uniform_bytes.items()},
            "plans": {label: {"bits_overrides": p.bits_overrides, "average_bits": p.average_bits,
                              "weight_bytes": p.weight_bytes,
                              "layers": [{k: row[k] for k in ("name", "weights", "w_bits", "pinned")}
                                         | ({"sensitivity": row["sensitivity"]} if "sensitivity" in row else {})
                                         for row in p.layers]}
                      for label, p in plans.items()}}


@dataclass(frozen=True)
class Cost:
    """The search's time against QAT's, timed alone (one process, nothing beside it): parallel workers share the
    memory bandwidth of 2 cores unevenly, and the machine's speed drifts between runs, so a ratio of times taken in
    different runs is not the search's cost."""

    arch: Arch
    fp_path: str
    plan: Plan
    repeats: int = 3

    def key(self) -> str:
        fields = {"arch": asdict(self.arch), "fp": Path(self.fp_path).name, "candidates": self.plan.candidates,
                  "batches": (self.plan.search_batches, self.plan.search_batch_size), "limit": self.plan.limit,
                  "qat": asdict(self.plan.qat_schedule), "repeats": self.repeats}
        return "cost-" + settings_key(fields, "rounds")


def cost_one(spec: Cost, threads: int, scratch: Path) -> dict:
    """``repeats`` rounds in this process, each a search with each measure and a QAT run of uniform W3A3 (the same
    run each time); the share is the median search time over the median QAT training time, so the machine's drift
    between rounds moves both."""
    from saq_hf import search_bits

    plan = spec.plan
    model, batches = _search_setup(plan, spec.fp_path, threads)
    seconds = {measure: [] for measure in MEASURES}
    qat = []
    for _ in range(spec.repeats):
        for measure in MEASURES:
            start = time.perf_counter()
            search_bits(model, batches, target_bits=plan.targets[-1], measure=measure, candidates=plan.candidates)
            seconds[measure].append(time.perf_counter() - start)
        qat.append(run_one(Run(spec.arch, 0, "uniform_W3", "qat", spec.fp_path, plan.qat_schedule, uniform_bits=3,
                               limit=plan.limit), threads, scratch)["train_seconds"])
    return {"key": spec.key(), "model": spec.arch.kind, "search_seconds": seconds, "qat_seconds_all": qat,
            "qat_seconds": float(np.median(qat)), "threads": threads}


# -------------------------------------------------------------------------------------------------- QAT runs
@dataclass(frozen=True)
class Run:
    arch: Arch
    seed: int
    label: str  # uniform_W3, sharpness@3, hessian@2.5, random@2.5, ...
    mode: str
    fp_path: str
    schedule: Schedule
    overrides: tuple = ()  # ((layer, w_bits, a_bits), ...); empty: uniform
    uniform_bits: int | None = None
    weight_bytes: int = 0
    average_bits: float = 0.0
    limit: int | None = None

    def key(self) -> str:
        fields = asdict(self)
        fields["fp_path"] = Path(self.fp_path).name
        return "run-" + settings_key(fields)


def run_one(run: Run, threads: int, scratch: Path) -> dict:
    from saq_hf import QuantConfig, SAQTrainingArguments, calibrate, quantize_model
    from transformers import AutoModelForImageClassification

    quiet()
    torch.set_num_threads(threads)
    splits = data_for("long_qat", run.limit)
    model = AutoModelForImageClassification.from_pretrained(run.fp_path)
    if run.overrides:
        config = QuantConfig(w_bits=4, a_bits=4, bits_overrides={n: {"w_bits": w, "a_bits": a}
                                                                 for n, w, a in run.overrides})
    else:
        config = QuantConfig(w_bits=run.uniform_bits, a_bits=run.uniform_bits)
    quantize_model(model, config)
    torch.manual_seed(run.seed)
    sched = run.schedule
    calibrate(model, batches_of(splits.train_x, splits.train_y, sched.batch_size, 4 * sched.batch_size))
    fields = MODES[run.mode]
    output_dir = scratch / run.key()
    args = SAQTrainingArguments(rho=0.0 if fields["saq_mode"] == "qat" else FIXED_RHO,
                                num_train_epochs=sched.epochs, learning_rate=sched.lr, weight_decay=sched.weight_decay,
                                per_device_train_batch_size=sched.batch_size, **fields,
                                **_common_args(output_dir, run.seed, threads))
    trainer, seconds = train_timed(model, args, splits)
    return {"key": run.key(), "model": run.arch.kind, "seed": run.seed, "label": run.label, "mode": run.mode,
            "weight_bytes": run.weight_bytes, "average_bits": run.average_bits,
            "accuracy": accuracy(model, splits.test_x, splits.test_y),
            "val_accuracy": accuracy(model, splits.val_x, splits.val_y), "train_seconds": seconds,
            "steps": trainer.state.global_step}


def describe(row: dict) -> str:
    return (f"{row['model']:8s} seed={row['seed']} {row['label']:14s} {row['mode']:4s} "
            f"{row['average_bits']:.2f} bits {row['weight_bytes']:>7,} B test={row['accuracy']:6.2f} "
            f"val={row['val_accuracy']:6.2f} {row['train_seconds']:5.1f}s")


def runs_for(plan: Plan, searches: dict, fp: dict) -> list[Run]:
    runs = []
    for arch in plan.archs:
        for seed in plan.seeds:
            found = searches[(arch, seed)]
            common = {"arch": arch, "seed": seed, "fp_path": fp[(arch, seed)], "schedule": plan.qat_schedule,
                      "limit": plan.limit}
            for mode in plan.modes:
                for bits in plan.uniform_bits:
                    runs.append(Run(label=f"uniform_W{bits}", mode=mode, uniform_bits=bits, average_bits=float(bits),
                                    weight_bytes=found["uniform_bytes"][str(bits)], **common))
                for label, p in found["plans"].items():
                    overrides = tuple(sorted((n, b["w_bits"], b["a_bits"]) for n, b in p["bits_overrides"].items()))
                    runs.append(Run(label=label, mode=mode, overrides=overrides, average_bits=p["average_bits"],
                                    weight_bytes=p["weight_bytes"], **common))
    return [r for r in runs if r.mode == "qat" or r.label in plan.saq_labels]


# ---------------------------------------------------------------------------------------------------- report
COMPARISONS = [  # (label, baseline): seed-paired label - baseline
    ("sharpness@3", "uniform_W3"), ("hessian@3", "uniform_W3"), ("random@3", "uniform_W3"),
    ("sharpness@3", "random@3"), ("hessian@3", "random@3"), ("sharpness@3", "hessian@3"),
    ("sharpness@2.5", "uniform_W3"), ("hessian@2.5", "uniform_W3"), ("sharpness@2.5", "random@2.5"),
    ("hessian@2.5", "random@2.5"), ("sharpness@2.5", "hessian@2.5"), ("random@2.5", "uniform_W2"),
    ("uniform_W4", "uniform_W3"),  # the room a 3-bit allocation has: what a third more bytes buy
]


def summarize(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    cells, deltas = [], []
    for model in sorted({r["model"] for r in rows}):
        for mode in sorted({r["mode"] for r in rows}):
            mine = [r for r in rows if r["model"] == model and r["mode"] == mode]
            labels = sorted({r["label"] for r in mine}, key=lambda l: (np.mean([r["weight_bytes"] for r in mine
                                                                               if r["label"] == l]), l))
            by = {label: {r["seed"]: r for r in mine if r["label"] == label} for label in labels}
            for label in labels:
                group = list(by[label].values())
                mean, std = mean_std([r["accuracy"] for r in group])
                cells.append({"model": model, "mode": mode, "label": label, "n_seeds": len(group),
                              "accuracy_mean": mean, "accuracy_std": std,
                              "val_accuracy_mean": float(np.mean([r["val_accuracy"] for r in group])),
                              "weight_bytes_mean": float(np.mean([r["weight_bytes"] for r in group])),
                              "average_bits_mean": float(np.mean([r["average_bits"] for r in group])),
                              "train_seconds_mean": float(np.mean([r["train_seconds"] for r in group]))})
            for label, base in COMPARISONS:
                if label in by and base in by:
                    seeds = sorted(set(by[label]) & set(by[base]))
                    paired = [by[label][s]["accuracy"] - by[base][s]["accuracy"] for s in seeds]
                    val = [by[label][s]["val_accuracy"] - by[base][s]["val_accuracy"] for s in seeds]
                    delta, low, high = t_interval(paired)
                    deltas.append({"model": model, "mode": mode, "comparison": f"{label} - {base}",
                                   "n_seeds": len(seeds), "delta": delta, "ci95": [low, high],
                                   "val_delta": float(np.mean(val))})
        # What SAQ adds to the same allocation (trained from the same FP model and plan).
        by_mode = {(r["label"], r["mode"], r["seed"]): r for r in rows if r["model"] == model}
        for label in sorted({label for label, mode, _ in by_mode if mode == "saq"}):
            seeds = sorted(seed for lab, mode, seed in by_mode if lab == label and mode == "saq"
                           and (label, "qat", seed) in by_mode)
            if seeds:
                pairs = [(by_mode[(label, "saq", s)], by_mode[(label, "qat", s)]) for s in seeds]
                delta, low, high = t_interval([a["accuracy"] - b["accuracy"] for a, b in pairs])
                deltas.append({"model": model, "mode": "saq-qat", "comparison": f"{label}: SAQ - QAT",
                               "n_seeds": len(seeds), "delta": delta, "ci95": [low, high],
                               "val_delta": float(np.mean([a["val_accuracy"] - b["val_accuracy"] for a, b in pairs]))})
    return cells, deltas


def search_cost(costs: list[dict], searches: list[dict], rows: list[dict]) -> list[dict]:
    """Per model and measure: the alone-timed share (``share_of_qat``, the median search over the median QAT run in
    the same process) and, beside it, the same from the benchmark's parallel runs (means, for reference)."""
    out = []
    for cost in costs:
        model = cost["model"]
        qat = [r["train_seconds"] for r in rows if r["model"] == model and r["mode"] == "qat"]
        for measure in MEASURES:
            median = float(np.median(cost["search_seconds"][measure]))
            parallel = [s["search_seconds"][measure] for s in searches if s["model"] == model]
            out.append({"model": model, "measure": measure, "search_seconds_median": median,
                        "search_seconds_all": cost["search_seconds"][measure], "qat_seconds": cost["qat_seconds"],
                        "qat_seconds_all": cost["qat_seconds_all"],
                        "share_of_qat": median / cost["qat_seconds"],
                        "parallel_share_of_qat": float(np.mean(parallel) / np.mean(qat)) if parallel and qat else None,
                        "searched_layers": next((s["searched_layers"] for s in searches if s["model"] == model),
                                                None)})
    return out


def vit_b16_estimate(plan: Plan) -> dict:
    """Forward-pass equivalents of the sharpness search and of QAT at ViT-B/16 size (the repository's
    vit_b16_pets_w4a4 recipe), counting a backward as two forwards and only the linear layers' work (96 % of a
    ViT-B/16 forward at 197 tokens): one calibration forward on the first batch; per batch one ascent step, the
    8-bit loss and two recording forwards, then two forwards (``Q_b`` and its mirror) per searched layer and
    candidate, each starting at that layer (the modules before it return their recorded outputs)."""
    blocks, candidates = 12, len(plan.candidates)
    block = [1, 1, 1, 1, 4, 4]  # q, k, v, o, fc1, fc2: multiply-adds in units of d² per token, in forward order
    flops = block * blocks
    total = sum(flops)
    from_layer = [sum(flops[i:]) / total for i in range(len(flops))]  # share of a forward from layer i on
    batches, batch_size = plan.search_batches, plan.search_batch_size
    per_image = 3 + 1 + 2 + 2 * candidates * sum(from_layer)
    search_images = per_image * batches * batch_size + batch_size
    qat_images = 10 * 3680 * 3  # 10 epochs of Oxford-IIIT Pet trainval (3,680 images), forward + backward
    return {"searched_layers": len(flops), "candidates": candidates, "search_batches": batches,
            "search_batch_size": batch_size, "search_image_forwards": round(search_images),
            "qat_image_forwards_pets_10_epochs": qat_images, "share_of_qat": search_images / qat_images,
            "share_of_saq": search_images / (2 * qat_images)}


def print_tables(cells, deltas, costs, estimate) -> None:
    print("\nAccuracy at each size (test top-1 %, mean ± std over seeds; val beside)")
    print("| model | mode | allocation | avg weight bits | weight bytes | test top-1 | val top-1 |")
    print("|---|---|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['model']} | {c['mode']} | {c['label']} | {c['average_bits_mean']:.2f} | "
              f"{c['weight_bytes_mean']:,.0f} | {c['accuracy_mean']:.1f} ± {c['accuracy_std']:.1f} | "
              f"{c['val_accuracy_mean']:.1f} |")
    print("\nSeed-paired differences (test top-1 pt, 95 % t-interval; val Δ beside)")
    print("| model | mode | comparison | Δ test | 95 % CI | Δ val |")
    print("|---|---|---|---|---|---|")
    for d in deltas:
        print(f"| {d['model']} | {d['mode']} | {d['comparison']} | {d['delta']:+.2f} | "
              f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] | {d['val_delta']:+.2f} |")
    print("\nSearch cost, timed alone (both targets come from one measurement; parallel runs' ratio beside)")
    for c in costs:
        parallel = f"{100 * c['parallel_share_of_qat']:.1f} %" if c["parallel_share_of_qat"] is not None else "-"
        print(f"  {c['model']:8s} {c['measure']:9s} {c['search_seconds_median']:6.2f} s  = "
              f"{100 * c['share_of_qat']:.1f} % of one QAT run ({c['qat_seconds']:.1f} s); in parallel runs {parallel}")
    print(f"  ViT-B/16 estimate (sharpness, {estimate['search_batches']}x{estimate['search_batch_size']} images): "
          f"{estimate['search_image_forwards']:,} image-forwards = {100 * estimate['share_of_qat']:.0f} % of 10 QAT "
          f"epochs on Pets ({100 * estimate['share_of_saq']:.0f} % of SAQ)")


def plot(cells: list[dict], path: Path, qat_epochs: int) -> None:
    plt = pyplot()
    models = sorted({c["model"] for c in cells})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    styles = {"uniform": ("tab:blue", "o"), "sharpness": ("tab:red", "s"), "hessian": ("tab:green", "^"),
              "random": ("tab:gray", "x")}
    for ax, model in zip(axes[0], models):
        for mode in MODES:  # QAT filled; the same allocations trained with SAQ hollow
            for kind, (colour, marker) in styles.items():
                mine = sorted((c for c in cells if c["model"] == model and c["label"].startswith(kind)
                               and c["mode"] == mode), key=lambda c: c["weight_bytes_mean"])
                if not mine:
                    continue
                ax.errorbar([c["weight_bytes_mean"] for c in mine], [c["accuracy_mean"] for c in mine],
                            yerr=[c["accuracy_std"] for c in mine], marker=marker, color=colour, capsize=3,
                            ls=("-" if mode == "qat" else ":") if kind == "uniform" else "none",
                            mfc=colour if mode == "qat" else "none", label=f"{kind} ({mode.upper()})")
                for c in mine:
                    if mode == "qat":
                        ax.annotate(c["label"].replace("uniform_", ""), (c["weight_bytes_mean"], c["accuracy_mean"]),
                                    fontsize=6, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("packed weight bytes (as saq-hf export writes them)")
        ax.set_title(f"{model}: {qat_epochs} epochs of training on 8x8 digits", fontsize=10)
    axes[0][0].set_ylabel("test top-1 (%), mean ± std over seeds")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Mixed precision: accuracy vs size (a_bits = w_bits; 8-bit patch embedding and classifier)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 256 images, 1 seed: a smoke run")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    parser.add_argument("--modes", default="qat", help="comma-separated training schedules: qat, saq (default qat)")
    parser.add_argument("--qat_epochs", type=int, default=None,
                        help="epochs of the training every allocation gets (default 20, the long QAT); another value "
                             "writes mixed_qat<N>ep.json/.png")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--report", action="store_true", help="tables and figure from the journal only, no runs")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    modes = tuple(args.modes.split(","))
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"mixed.py: unknown mode(s) {sorted(unknown)}; choose from {sorted(MODES)}")
    plan = replace(plan, modes=modes)
    if args.seeds is not None:
        plan = replace(plan, seeds=tuple(range(args.seeds)))
    suffix = "_quick" if args.quick else ""
    journal = args.cache / f"mixed_journal{suffix}.jsonl"  # shared: the searches do not depend on the QAT epochs
    if args.qat_epochs is not None and args.qat_epochs != plan.qat_schedule.epochs:
        if args.qat_epochs < 1:
            raise SystemExit(f"mixed.py: --qat_epochs must be >= 1, got {args.qat_epochs}")
        plan = replace(plan, qat_schedule=replace(plan.qat_schedule, epochs=args.qat_epochs))
        suffix += f"_qat{args.qat_epochs}ep"
    scratch = args.cache / "mixed_scratch"
    start = time.perf_counter()
    fp = {(arch, seed): str(fp_dir(arch, "digits", plan.fp_schedule, args.cache, plan.limit, seed))
          for arch in plan.archs for seed in plan.seeds}
    specs = [Search(arch, seed, fp[(arch, seed)], plan) for arch in plan.archs for seed in plan.seeds]
    cost_specs = [Cost(arch, fp[(arch, plan.seeds[0])], plan, repeats=1 if args.quick else 3) for arch in plan.archs]
    if args.report:
        done = read_journal(journal)
        cost_rows = [done[c.key()] for c in cost_specs if c.key() in done]
        search_rows = [done[s.key()] for s in specs if s.key() in done]
        searches = {(s.arch, s.seed): done[s.key()] for s in specs if s.key() in done}
        runs = runs_for(plan, searches, fp) if len(searches) == len(specs) else []
        rows = [done[r.key()] for r in runs if r.key() in done]
    else:
        calls = [(arch, "digits", plan.fp_schedule, args.cache, plan.limit, args.threads, seed)
                 for arch in plan.archs for seed in plan.seeds]
        for _ in in_parallel(fp_model, calls, args.jobs, args.threads):
            pass
        fp_seconds = time.perf_counter() - start
        print(f"FP models ready ({fp_seconds:.0f} s)", flush=True)
        search_rows = journaled(search_one, specs, args.jobs, args.threads, journal, scratch,
                                lambda r: f"search {r['model']} seed={r['seed']} " + ", ".join(
                                    f"{m} {s:.1f}s" for m, s in r["search_seconds"].items()),
                                progress=lambda line: print(line, flush=True))
        searches = {(s.arch, s.seed): row for s, row in zip(specs, search_rows)}
        runs = runs_for(plan, searches, fp)
        rows = journaled(run_one, runs, args.jobs, args.threads, journal, scratch, describe,
                         progress=lambda line: print(line, flush=True))
        cost_rows = journaled(cost_one, cost_specs, 1, args.threads, journal, scratch,
                              lambda r: f"cost {r['model']}: QAT {r['qat_seconds']:.1f} s, " + ", ".join(
                                  f"{m} {np.median(v):.2f} s" for m, v in r["search_seconds"].items()),
                              progress=lambda line: print(line, flush=True))
    if not rows:
        print("no finished runs in the journal: run without --report first")
        return {}
    cells, deltas = summarize(rows)
    costs = search_cost(cost_rows, search_rows, rows)
    estimate = vit_b16_estimate(plan)
    print_tables(cells, deltas, costs, estimate)
    args.results.mkdir(parents=True, exist_ok=True)
    plot(cells, args.results / f"mixed{suffix}.png", plan.qat_schedule.epochs)
    command = "python benchmarks/mixed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": command.strip(), "machine": machine(), "plan": json.loads(json.dumps(asdict(plan), default=str)),
           "wall_seconds": time.perf_counter() - start, "missing_runs": len(runs) - len(rows),
           "summary": cells, "deltas": deltas, "search_cost": costs, "vit_b16_estimate": estimate,
           "searches": search_rows, "rows": rows}
    (args.results / f"mixed{suffix}.json").write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
