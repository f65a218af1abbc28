"""One run of the regime map: its modes (label -> ``SAQTrainingArguments`` fields), the journal key of a run
(``Run.key``), and its training and evaluation (``run_one``, ``fp_row``)."""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import Splits, _common_args, accuracy, batches_of, journaled, quiet, settings_key, train_timed
from digits import Arch, Schedule, build, data_for, fp_source, train_fp

FIXED_RHO = 0.002  # the fixed relative radius of ``saq_fixed`` (the library's default before rho="auto")
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
    if not _LIBRARY_RULE:  # read once, before use_radius_rule sets a variant's constants
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


def use_radius_rule(mode: str) -> None:
    """Sets ``rho="auto"``'s constants on the class ``LossDrivenRadius`` in this (worker) process: the mode's
    validation variant (its ``rule``), else the library's. Every later run of the process sees them."""
    from saq_hf.sharpness import LossDrivenRadius

    for name, value in radius_rule(mode).items():
        setattr(LossDrivenRadius, name, value)


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
    use_radius_rule(run.mode)  # a validation variant's constants, else the library's
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
