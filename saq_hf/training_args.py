"""``SAQTrainingArguments``: ``transformers.TrainingArguments`` plus the SAQ fields, and their parsing and checks.

Kept apart from the trainer as transformers keeps ``TrainingArguments`` apart from ``Trainer``.
"""

import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .distill import check_distill_fields
from .sharpness import CASES, PERTURB_CHOICES, RADII
from .strategies import STRATEGIES

SAQ_MODES = CASES + ("qat",)
SAQ_STRATEGIES = tuple(STRATEGIES)


@dataclass
class SAQTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the SAQ fields; every field is also a recipe / command-line key."""

    saq_mode: str = field(
        default="saq",
        metadata={
            "help": "Which objective to train. 'saq': Case 3, L(Q(w) + ε(Q(w))), the paper's method; "
            "'case1': L(Q(w) + ε(w)); 'case2': L(Q(w + ε(w))), i.e. plain SAM on a quantized model; "
            "'qat': one forward-backward per step: the stock Trainer's step (with the LSQ step sizes in their own "
            "optimizer group, see step_size_lr_scale).",
            "choices": list(SAQ_MODES),
        },
    )
    # ``| None``: HfArgumentParser keeps only ``float`` of ``float | str`` (so ``--rho auto`` would fail) but parses
    # ``float | str | None`` as a string; __post_init__ turns it into a float or "auto" and rejects None.
    rho: float | str | None = field(
        default="auto",
        metadata={
            "help": "Perturbation radius ρ: 'auto' (default) or a number. 'auto' reads the training loss: ρ = 0 while "
            "it still falls (the model is fitting its labels, where a radius only costs), and once it has stopped "
            "falling ρ = rho_auto_max · min(1, L / (rho_auto_loss_share · ln(num_classes))): up to 0.02 where the "
            "labels cannot be fitted (noisy labels, where SAQ gains most), near 0 where they were (docs/METHOD.md, "
            "\"The radius ρ\"). A number with saq_radius='relative' is a fraction of each perturbed tensor's "
            "norm (0.002: every tensor moves by 0.2 % of its norm); with 'absolute' it is the global L2 norm of ε "
            "(the paper's ρ)."
        },
    )
    saq_radius: str = field(
        default="relative",
        metadata={
            "help": "How ρ is measured. 'relative': each perturbed tensor x moves by ρ·||x|| along its own "
            "gradient, so one ρ means the same on any model size and bit-width; 'absolute': ε = ρ·g/||g|| with one global "
            "norm, exactly the paper's formula (its size per element shrinks as the model grows).",
            "choices": list(RADII),
        },
    )
    rho_auto_max: float = field(
        default=0.02,
        metadata={"help": "rho='auto': the largest relative radius it takes (> 0; 0.02, the largest radius of the "
                          "grid the results were validated on)."},
    )
    rho_auto_loss_share: float = field(
        default=0.5,
        metadata={"help": "rho='auto': the training loss, as a share of ln(num_classes), at and above which ρ is "
                          "rho_auto_max (> 0); below it ρ shrinks in proportion to the loss."},
    )
    saq_start_ratio: float | str | None = field(  # ``| None``: see rho
        default="auto",
        metadata={
            "help": "Share of the optimizer steps trained with plain QAT before SAQ starts (0 <= ratio <= 1), or "
            "'auto': SAQ from the first step on a model that starts trained; on one whose first batch gets "
            "near-uniform predictions, plain QAT until its mean training loss over 10 optimizer steps falls "
            "below 0.25 x ln(num_classes), i.e. until it fits its data (from scratch, SAQ from the first step cost "
            "accuracy while the model was still fitting)."
        },
    )
    saq_clean_step_sizes: bool = field(
        default=True,
        metadata={
            "help": "Train the LSQ step sizes on the loss at the unperturbed point (from the ascent pass) instead "
            "of the perturbed one. Without it, SAQ can 'flatten' the loss by shrinking an activation range "
            "until every input is clipped, and the model stops learning (docs/METHOD.md)."
        },
    )
    saq_adaptive: bool = field(
        default=False,
        metadata={
            "help": "ASAM-style adaptive ε: scale the ascent direction element-wise by |Q(w)| (saq), |w| "
            "(case1, case2) and |θ|, so ε = ρ·T²g/||Tg||."
        },
    )
    saq_perturb: str = field(
        default="bias_norm",
        metadata={
            "help": "Parameters perturbed besides the weights: 'none'; 'bias_norm' (biases and normalization "
            "affine parameters); 'bias_norm_step_size' (also the LSQ step sizes). Quantized weights are "
            "perturbed as saq_mode says; weights kept in full precision (embeddings, layer scales, unconverted "
            "layers) are always perturbed, as in plain SAM.",
            "choices": list(PERTURB_CHOICES),
        },
    )
    saq_strategy: str = field(
        default="full",
        metadata={
            "help": "'full': ascent + descent pass every step (2x cost); 'every_k': full SAQ on every "
            "saq_interval-th optimizer step, plain QAT otherwise ((k+1)/k cost); 'looksam': as every_k, but "
            "the steps in between add back, per tensor, the part of the last full step's SAQ gradient that is "
            "orthogonal to its plain gradient (LookSAM; (k+1)/k cost); 'reuse_grad': one "
            "forward-backward per step, ε built from the previous step's descent gradient (~1x cost).",
            "choices": list(SAQ_STRATEGIES),
        },
    )
    saq_interval: int = field(
        default=5,
        metadata={"help": "k for saq_strategy='every_k' and 'looksam': optimizer steps 0, k, 2k, ... are full SAQ "
                          "steps (>= 1; the LookSAM paper uses 5)."},
    )
    saq_looksam_alpha: float = field(
        default=0.5,
        metadata={"help": "saq_strategy='looksam': on the steps between full ones each tensor's gradient g gets "
                          "alpha·||g||·v added, v = g_v/||g_full|| the sharpness component kept from the last full "
                          "step relative to that step's gradient (>= 0; 1 re-adds it at the size it had; 0 is "
                          "every_k; 0.5 was best on validation data among 0, 0.25, 0.5, 1 and 2)."},
    )
    step_size_lr_scale: float = field(
        default=30.0,
        metadata={"help": "Learning rate of the LSQ step sizes (trained as log(s), without weight decay) as a multiple "
                          "of learning_rate (> 0). Adam-type optimizers then change each step size by about "
                          "step_size_lr_scale x learning_rate of itself per step (30: best validation accuracy of "
                          "1, 10 and 30 for plain QAT of a W2A2 ViT and ConvNeXt on digits)."},
    )
    distill_alpha: float = field(
        default=1.0,
        metadata={"help": "With a teacher (SAQTrainer(teacher_model=...); saq-hf train: distill): the weight of the "
                          "distillation term, the loss being (1 - alpha)·CE(labels) + alpha·T²·KL(teacher || student) "
                          "(0 to 1; 0 trains on the labels alone and leaves the teacher unused). Default 1, "
                          "distillation only: the teacher, a full-precision model fitted to the same labels, already "
                          "carries them, and a label term adds back their noise (docs/METHOD.md, \"Distillation\")."},
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "With a teacher: the softmax temperature T of both models' logits in the distillation "
                          "term (> 0; the term is multiplied by T² so its gradient keeps its size). Default 1: the "
                          "student matches the teacher's own predicted probabilities."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished run in output_dir (transformers 4's field, dropped from "
                          "TrainingArguments in 5.x); without it saq-hf train refuses a non-empty output_dir."},
    )

    def __post_init__(self):
        if self.saq_mode not in SAQ_MODES:
            raise ValueError(f"saq_mode must be one of {SAQ_MODES}, got {self.saq_mode!r} (field: saq_mode)")
        self.rho = _parse_rho(self.rho)
        if self.saq_radius not in RADII:
            raise ValueError(f"saq_radius must be one of {RADII}, got {self.saq_radius!r} (field: saq_radius)")
        for name in ("rho_auto_max", "rho_auto_loss_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r} (field: {name})")
        if self.rho == "auto" and self.saq_radius != "relative":
            raise ValueError("rho='auto' sets a relative radius (a share of each tensor's norm): drop "
                             "saq_radius='absolute', or give rho a number")
        self.saq_start_ratio = _parse_start_ratio(self.saq_start_ratio)
        if self.saq_perturb not in PERTURB_CHOICES:
            raise ValueError(
                f"saq_perturb must be one of {PERTURB_CHOICES}, got {self.saq_perturb!r} (field: saq_perturb)"
            )
        if self.saq_strategy not in STRATEGIES:
            raise ValueError(
                f"saq_strategy must be one of {tuple(STRATEGIES)}, got {self.saq_strategy!r} (field: saq_strategy)"
            )
        if isinstance(self.saq_interval, bool) or not isinstance(self.saq_interval, int) or self.saq_interval < 1:
            raise ValueError(f"saq_interval must be an integer >= 1, got {self.saq_interval!r} (field: saq_interval)")
        if isinstance(self.saq_looksam_alpha, bool) or not isinstance(self.saq_looksam_alpha, (int, float)) \
                or not math.isfinite(self.saq_looksam_alpha) or self.saq_looksam_alpha < 0:
            raise ValueError(f"saq_looksam_alpha must be a finite number >= 0, got {self.saq_looksam_alpha!r} "
                             "(field: saq_looksam_alpha)")
        if isinstance(self.step_size_lr_scale, bool) or not isinstance(self.step_size_lr_scale, (int, float)) \
                or not math.isfinite(self.step_size_lr_scale) or self.step_size_lr_scale <= 0:
            raise ValueError(f"step_size_lr_scale must be a finite number > 0, got {self.step_size_lr_scale!r} "
                             "(field: step_size_lr_scale)")
        check_distill_fields(self.distill_alpha, self.distill_temperature)
        super().__post_init__()
        # Pinned memory needs an accelerator: without one, torch 2.13 warns on every DataLoader the Trainer builds.
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
        if not (accelerator.is_available() if accelerator is not None else torch.cuda.is_available()):
            self.dataloader_pin_memory = False


def _parse_rho(value) -> float | str:
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"rho must be 'auto' or a finite number >= 0, got {value!r} (field: rho)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"rho must be 'auto' or a finite number >= 0, got {value!r} (field: rho)")
    return float(value)


def _parse_start_ratio(value) -> float | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number <= 1:
        raise ValueError(f"saq_start_ratio must be 'auto' or a number from 0 to 1, got {value!r} "
                         "(field: saq_start_ratio)")
    return float(number)
