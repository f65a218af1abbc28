"""``SAQTrainer``: ``transformers.Trainer`` whose training step is docs/METHOD.md's two-pass SAQ update.

The strategies that choose which steps run it, and their costs, are in ``strategies.py``.
"""

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import CONFIG_NAME, logging

from .compat import check_trainer_internals, create_optimizer_takes_model
from .distill import Distiller, check_distill_fields, check_resume_teacher
from .quant import LSQQuantizer, quantized_layers
from .sharpness import (
    CASES,
    LossDrivenRadius,
    PERTURB_CHOICES,
    RADII,
    SharpnessPerturbation,
    frozen_running_stats,
)
from .strategies import STRATEGIES

logger = logging.get_logger(__name__)

SAQ_MODES = CASES + ("qat",)
SAQ_STRATEGIES = tuple(STRATEGIES)
# The torch releases benchmarks/compile_check.py passes on (compiled gradients equal eager ones), on a CPU:
# benchmarks/results/compile_check_torch*_cpu.txt (2.6 is the declared floor, 2.15 the newest release).
COMPILE_VERIFIED_TORCH = ("2.6", "2.11", "2.12", "2.13", "2.14", "2.15")
# A checkpoint's per-process file of what saq_strategy keeps between steps.
SAQ_STATE_NAME = "saq_strategy_state"


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


# saq_start_ratio="auto" on a model that starts untrained: plain QAT until the mean training loss over FIT_WINDOW
# optimizer steps falls below FIT_SHARE * ln(num_classes), i.e. until the model fits its training data.
FIT_SHARE, FIT_WINDOW = 0.25, 10
WAITING = -1  # logged as saq_start_step while SAQ waits for the fit
# The collapse guard: warn when the perturbed loss stays this many times the unperturbed one over this many
# consecutive SAQ steps (docs/METHOD.md, "When SAQ stops a model from learning").
GUARD_RATIO, GUARD_STEPS = 1.5, 50
# Mean prediction entropy above this share of ln(num_classes) marks an untrained model (a quantization-damaged
# one has a high loss too, but confident predictions): SAQ there only costs, and rho="auto" takes its smallest radius.
UNTRAINED_SHARE = 0.9


def _train_step_sizes_in_log_form(model) -> None:
    """Convert the step sizes of a model loaded in the linear layout (an export, or a checkpoint of an earlier
    saq-hf) to the log form training uses, and say so in its ``quantization_config``."""
    quantizers = [(name, q) for name, q in model.named_modules() if isinstance(q, LSQQuantizer)]
    if not any(q.step_size_format == "linear" for _, q in quantizers):
        return
    for name, quantizer in quantizers:
        quantizer.to_log_step_size(f"{name}.step_size")
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        config["step_size_format"] = "log"
    elif config is not None:
        config.step_size_format = "log"
    logger.info("LSQ step sizes converted to log form for training (the checkpoint stored them linearly).")


def _class_logits(outputs) -> torch.Tensor | None:
    """A classifier's ``(batch, classes)`` logits from a model output, or ``None``."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[-1] < 2:
        return None
    return logits


def _predicts_uniformly(outputs) -> bool:
    logits = _class_logits(outputs)
    if logits is None:
        return False
    with torch.no_grad():
        probs = logits.detach().float().softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return bool(entropy > UNTRAINED_SHARE * math.log(logits.shape[-1]))


@contextmanager
def _recording(params):
    """The gradient each of ``params`` gets from the backward inside the block (before it is accumulated into
    ``.grad`` or all-reduced), left unchanged."""
    found = [None] * len(params)

    def keep(i):
        # Summed: under reentrant activation checkpointing a tensor's gradient can arrive in parts.
        def hook(grad):
            found[i] = grad if found[i] is None else found[i] + grad

        return hook

    handles = [p.register_hook(keep(i)) for i, p in enumerate(params)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class SAQTrainer(Trainer):
    """``Trainer`` with the sharpness-aware training step; everything else is the stock Trainer.

    Per micro-batch (``saq_strategy="full"``):

    1. ascent pass under ``accelerator.no_sync`` (no all-reduce: each worker builds its own ε): gradients
       w.r.t. ``Q(w)`` / ``w`` and ``θ`` by ``torch.autograd.grad``, so ``.grad`` keeps what earlier
       micro-batches accumulated; it updates batch-norm running statistics;
    2. ε with one global norm; a zero or non-finite norm skips the perturbation (logged as ``saq_skipped``);
    3. descent pass at the perturbed point through the stock ``Trainer.training_step``: same loss scaling
       (``num_items_in_batch`` / gradient accumulation), autocast, fp16 grad scaler and all-reduce as
       plain training; running statistics restored afterwards, so they are updated once;
    4. the perturbed tensors are restored exactly; the Trainer then clips and steps the optimizer as usual.

    ``self.strategy`` (``strategies.py``) decides which optimizer steps take this step (``saq_step``) and what
    the others do.

    Logged with the training loss: ``saq_ascent_grad_norm`` and ``saq_eps_norm`` (means since the last log,
    this process) and ``saq_skipped`` (perturbations skipped since training started). The returned loss
    is the descent pass's, i.e. the sharpness-aware objective. Data parallelism means DDP; FSDP, DeepSpeed and
    ``torch.nn.DataParallel`` are refused when the trainer is built (docs/METHOD.md, "Trainer switches").
    """

    def __init__(self, *args, teacher_model: torch.nn.Module | None = None, **kwargs):
        check_trainer_internals()
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SAQTrainingArguments):
            raise TypeError(
                f"SAQTrainer needs SAQTrainingArguments, got {type(self.args).__name__}: "
                "build the arguments with saq_hf.SAQTrainingArguments(output_dir=..., saq_mode=..., rho=...)"
            )
        self._refuse_unsupported_switches()
        # Distillation (docs/METHOD.md, "Distillation"): the frozen, unwrapped teacher and its per-micro-batch logits.
        self.distiller: Distiller | None = self._distiller_for(teacher_model)
        _train_step_sizes_in_log_form(self.model)
        self.sharpness: SharpnessPerturbation | None = None
        self._lsq_step_sizes: list[torch.nn.Parameter] = []
        self._lsq_quantizers: list[LSQQuantizer] = []
        # rho="auto": ``radius_rule`` sets the radius of every SAQ step from the training loss; ``rho`` is then its
        # latest value (None before the first SAQ step).
        self.rho: float | None = None if self.args.rho == "auto" else self.args.rho
        self.radius_rule: LossDrivenRadius | None = None
        if self.args.rho == "auto" and self.args.saq_mode != "qat":
            classes = getattr(getattr(self.model, "config", None), "num_labels", None)
            if not isinstance(classes, int) or classes < 2:
                raise ValueError(f"rho='auto' sets the radius from a classifier's loss and needs the model's "
                                 f"config.num_labels >= 2 (got {classes!r}): give rho a number")
            self.radius_rule = LossDrivenRadius(classes, self.args.rho_auto_max, self.args.rho_auto_loss_share)
        # Sums of the radius over the SAQ steps since the last log (a tensor: no device sync per step) and over the run.
        self._rho_sum, self._rho_count = 0.0, 0
        self._loss_observed = False
        self.strategy = STRATEGIES[self.args.saq_strategy](self.args)
        self._saq_sums = self._empty_sums()
        self._guard_run, self._guard_warned, self._start_checked, self._untrained = 0, False, False, False
        self._compiled_gradients_checked = False
        # The first SAQ step (saq_start_ratio): None until the first training step decides, WAITING while an
        # untrained model is fitting.
        self.saq_start_step: int | None = None
        self._fit_threshold: float | None = None
        self._fit_losses: list[torch.Tensor] = []
        self._fit_checked_at: int | None = None

    def _refuse_unsupported_switches(self) -> None:
        """One line, before any training, for each setting under which SAQ's step would silently differ from its
        definition (docs/METHOD.md, "Trainer switches")."""
        args = self.args
        if args.fp16 and args.device.type == "cpu":
            raise ValueError("fp16 mixed precision needs a GPU (its grad scaler is CUDA's), and this run trains on the "
                             "CPU: drop fp16, or use bf16")
        if args.torch_compile and ".".join(torch.__version__.split(".")[:2]) not in COMPILE_VERIFIED_TORCH:
            logger.warning(f"compiled training is verified on torch {', '.join(COMPILE_VERIFIED_TORCH)} and this is "
                           f"{torch.__version__}: run benchmarks/compile_check.py here first, or train eagerly")
        if args.torch_compile and args.torch_compile_mode in ("reduce-overhead", "max-autotune") and \
                not args.dataloader_drop_last:
            logger.warning(f"torch_compile_mode={args.torch_compile_mode!r} records a CUDA graph per input shape: set "
                           "dataloader_drop_last=True so the last, smaller batch of each epoch does not record another")
        if args.saq_mode == "qat":
            return
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            engine = "FSDP" if self.is_fsdp_enabled else "DeepSpeed"
            raise ValueError(f"SAQ does not run under {engine}: it shards or partitions the parameters and gradients "
                             "that SAQ's step perturbs and reads whole; train with DDP (accelerate launch / torchrun, "
                             "no fsdp or deepspeed setting), or with saq_mode='qat'")
        if args.n_gpu > 1:
            raise ValueError(f"SAQ does not run under torch.nn.DataParallel ({args.n_gpu} GPUs in one process): its "
                             "replicas do not see the perturbation; launch one process per GPU (accelerate launch or "
                             "torchrun) for DDP, or make one GPU visible (CUDA_VISIBLE_DEVICES)")

    def _distiller_for(self, teacher) -> Distiller | None:
        args = self.args
        if teacher is None:
            if (args.distill_alpha, args.distill_temperature) != (1.0, 1.0):
                logger.warning("distill_alpha and distill_temperature have no effect without a teacher_model.")
            return None
        if args.distill_alpha == 0:
            logger.warning("distill_alpha=0 trains on the labels alone: the teacher_model is not used.")
            return None
        if self.compute_loss_func is not None:
            raise ValueError("a teacher_model sets the training loss (labels and distillation): drop compute_loss_func")
        if args.n_gpu > 1:
            raise ValueError(f"distillation does not run under torch.nn.DataParallel ({args.n_gpu} GPUs in one "
                             "process): launch one process per GPU (accelerate launch or torchrun) for DDP")
        student = getattr(getattr(self.model, "config", None), "num_labels", None)
        teacher_labels = getattr(getattr(teacher, "config", None), "num_labels", None)
        if student is not None and teacher_labels is not None and student != teacher_labels:
            raise ValueError(f"the teacher_model predicts {teacher_labels} classes and the model {student}: the "
                             "teacher must predict the student's classes")
        return Distiller(teacher, args.distill_alpha, args.distill_temperature, args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stock loss; in training with a teacher, the distillation loss of ``distill.py`` instead, normalised as
        the Trainer's rule (``_loss_is_scaled_for_ga``) takes the returned loss to be. Evaluation keeps the label loss."""
        if self.distiller is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        # The student's autocast is accelerate's wrapper of its forward: the unwrapped teacher needs its own.
        teacher_logits = self.distiller.teacher_logits(inputs, self.accelerator.autocast)
        outputs = model(**inputs)
        scaled = num_items_in_batch is not None and self._loss_is_scaled_for_ga(num_items_in_batch)
        # The stock compute_loss's factor for a loss normalised by a count taken over all processes.
        scale = self.accelerator.num_processes // self.get_tp_size() if scaled and \
            self.args.average_tokens_across_devices else 1
        loss = self.distiller.loss(_class_logits(outputs), teacher_logits, labels, self.args.label_smoothing_factor,
                                   num_items_in_batch if scaled else None, scale)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _empty_sums() -> dict:
        return {"grad_norm": 0.0, "eps_norm": 0.0, "count": 0, "ascent_loss": 0.0, "descent_loss": 0.0,
                "loss_count": 0}

    def _sharpness_for(self, model: torch.nn.Module) -> SharpnessPerturbation:
        unwrapped = self.accelerator.unwrap_model(model)
        if self.sharpness is None or self.sharpness.model is not unwrapped:
            args = self.args
            self.sharpness = SharpnessPerturbation(unwrapped, case=args.saq_mode, rho=self.rho or 0.0,
                                                   adaptive=args.saq_adaptive, perturb=args.saq_perturb,
                                                   radius=args.saq_radius)
            # Built with the perturbation, not per step: the clean-gradient hooks go on these every SAQ step.
            self._lsq_quantizers = [m for m in unwrapped.modules()
                                    if isinstance(m, LSQQuantizer) and m.step_size_parameter.requires_grad]
            self._lsq_step_sizes = [m.step_size_parameter for m in self._lsq_quantizers]
        if self.radius_rule is None:
            self.sharpness.rho = self.rho
        return self.sharpness

    def _look(self, model, inputs):
        """The model's outputs on prepared ``inputs`` with nothing changed: no gradients, batch-norm statistics
        restored, random draws forked (the training run's stream is untouched)."""
        with torch.no_grad(), frozen_running_stats(model), self._same_random_draws(), \
                self.compute_loss_context_manager():
            return self.compute_loss(model, inputs, return_outputs=True)[1]

    def _plain_loss(self, model, inputs):
        model.train()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean() if self.args.n_gpu > 1 else loss

    def _is_plain_step(self) -> bool:
        step = self.state.global_step
        return self.args.saq_mode == "qat" or self.saq_start_step == WAITING or step < self.saq_start_step or \
            self.strategy.is_plain_step(step)

    def _resolve_start_step(self, model, inputs) -> int:
        """The first SAQ step, or ``WAITING``: ``saq_start_ratio`` of ``max_steps``; with "auto", 0 unless the first
        batch shows an untrained model, which waits for its fit. A resumed run takes what its log recorded last
        (still waiting, it goes on waiting)."""
        if self.args.saq_mode == "qat":
            return 0
        logged = [entry["saq_start_step"] for entry in self.state.log_history if "saq_start_step" in entry]
        ratio = self.args.saq_start_ratio
        untrained = False
        if ratio == "auto" and not logged or logged and logged[-1] == WAITING:
            outputs = self._look(model, self._prepare_inputs(inputs))
            logits = _class_logits(outputs)
            if logits is not None:
                self._fit_threshold = FIT_SHARE * math.log(logits.shape[-1])
            # Every data-parallel worker must take the same decision: untrained only if all workers see it.
            untrained = bool(self.accelerator.reduce(torch.tensor(float(_predicts_uniformly(outputs)),
                                                                  device=self.args.device), reduction="mean") == 1)
        if logged:
            return int(logged[-1]) if logged[-1] != WAITING or self._fit_threshold is not None else 0
        if ratio == "auto":
            if not untrained:
                return 0
            logger.warning(f"The model starts untrained (near-uniform predictions): plain QAT until its mean "
                           f"training loss over {FIT_WINDOW} steps falls below {self._fit_threshold:.3g} "
                           f"({FIT_SHARE:g} x ln(num_classes)), then SAQ (saq_start_ratio='auto'; a number sets the "
                           "share of plain steps instead).")
            self.log({"saq_start_step": WAITING})
            return WAITING
        step = int(round(ratio * self.state.max_steps))
        if step > 0:
            logger.warning(f"SAQ starts at optimizer step {step} of {self.state.max_steps}: the steps before it "
                           f"are plain QAT (saq_start_ratio={ratio!r}).")
            self.log({"saq_start_step": step})
        return step

    def _watch_for_fit(self, loss: torch.Tensor, num_items_in_batch) -> None:
        """While SAQ waits: keep this micro-batch's training loss; once per ``FIT_WINDOW`` optimizer steps compare
        their mean (over data-parallel workers) with the threshold, and start SAQ at the next step when below."""
        loss = loss.detach().float()
        if self.distiller is not None:  # the threshold is in units of ln(num_classes): the label CE
            loss = self.distiller.last_label_loss.float()
        else:  # returned by training_step: a share 1/accumulation steps of the micro-batch mean, either way
            loss = loss * self.current_gradient_accumulation_steps
        self._fit_losses.append(loss)
        step = self.state.global_step + 1  # the step this micro-batch belongs to, once the optimizer has stepped
        if step % FIT_WINDOW or self._fit_checked_at == step:
            return
        self._fit_checked_at = step
        mean = self.accelerator.reduce(torch.stack(self._fit_losses).mean(), reduction="mean")
        self._fit_losses = []
        if float(mean) < self._fit_threshold:
            self.saq_start_step = step
            logger.warning(f"SAQ starts at optimizer step {step}: the mean training loss of the last {FIT_WINDOW} "
                           f"steps, {float(mean):.3g}, is below {self._fit_threshold:.3g}.")
            self.log({"saq_start_step": step})

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the stock refusal
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resume_teacher(str(resume_from_checkpoint), self.distiller)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self.saq_start_step == WAITING:
            from .console import warn  # one "[saq-hf] warning:" line, like the CLI's own warnings

            warn(f"SAQ never started: the training loss never fell below {self._fit_threshold:.3g} "
                 f"({FIT_SHARE:g} x ln(num_classes)), so this run trained with plain QAT. A model that starts "
                 "untrained gets SAQ once it fits (from scratch, SAQ cost accuracy before that in our "
                 "benchmarks); set saq_start_ratio to a number to start it anyway.")
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.distiller is None:
            return self._compiled_or_eager_training_step(model, inputs, num_items_in_batch)
        with self.distiller.micro_batch():  # one teacher forward, shared by every pass over the micro-batch
            return self._compiled_or_eager_training_step(model, inputs, num_items_in_batch)

    def _compiled_or_eager_training_step(self, model, inputs, num_items_in_batch):
        if not self.args.torch_compile:
            return self._training_step(model, inputs, num_items_in_batch)
        self._initialize_quantizers_eagerly(model, inputs, num_items_in_batch)
        loss = self._training_step(model, inputs, num_items_in_batch)
        if not self._compiled_gradients_checked:
            self._compiled_gradients_checked = True
            self._check_compiled_gradients(model)
        return loss

    def _check_compiled_gradients(self, model) -> None:
        """Fail loudly if the compiled model's first backward left every quantized weight without a gradient: a
        compiler that mistraces the LSQ op's backward (torch 2.11 did, while the op's forward returned a tensor
        modified in place) would otherwise train nothing but biases, silently."""
        weights = [layer.weight for _, layer in quantized_layers(self.accelerator.unwrap_model(model))
                   if layer.weight.requires_grad]
        if weights and not any(w.grad is not None and bool(w.grad.any()) for w in weights):
            raise RuntimeError(f"torch.compile gave every quantized weight a zero gradient on the first step (torch "
                               f"{torch.__version__}): the compiled backward is wrong; train with torch_compile=False "
                               "or another torch release")

    def _training_step(self, model, inputs, num_items_in_batch=None):
        if self.saq_start_step is None:
            self.saq_start_step = self._resolve_start_step(model, inputs)
        if self._is_plain_step():
            loss = self.qat_step(model, inputs, num_items_in_batch)
            self._observe_loss(loss, returned=True, num_items_in_batch=num_items_in_batch)
            if self.saq_start_step == WAITING:
                self._watch_for_fit(loss, num_items_in_batch)
            return loss
        self._sharpness_for(model)
        self._loss_observed = False
        loss = self.strategy.training_step(self, model, inputs, num_items_in_batch)
        if not self._loss_observed:  # a step without an ascent pass: its own (perturbed or plain) loss
            self._observe_loss(loss, returned=True, num_items_in_batch=num_items_in_batch)
        return loss

    def qat_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The stock ``Trainer.training_step``: one forward-backward, gradients accumulated into ``.grad``."""
        return super().training_step(model, inputs, num_items_in_batch)

    def saq_step(self, model, inputs, num_items_in_batch=None, compared=()):
        """The two-pass SAQ step on one micro-batch, with ``self.sharpness`` built for ``model``. Returns its loss
        and, for each tensor in ``compared``, its gradient at the unperturbed and at the perturbed point (this
        micro-batch's, before accumulation; ``None`` where it got none)."""
        sharpness, step_sizes, compared = self.sharpness, self.clean_step_sizes, list(compared)
        with self.accelerator.no_sync(model), self._same_random_draws():
            grads, clean = sharpness.ascent_gradients(
                lambda: self._ascent_loss(model, inputs, num_items_in_batch), extra=step_sizes + compared)
        clean, plain = clean[:len(step_sizes)], clean[len(step_sizes):]
        self._observe_loss(self._raw_ascent_loss, returned=False, num_items_in_batch=num_items_in_batch)
        self._loss_observed = True
        eps = self.epsilon(grads)
        del grads
        with sharpness.perturbed(eps), frozen_running_stats(model), \
                self._step_size_gradients_replaced(clean, num_items_in_batch), \
                _recording(compared) as perturbed:
            loss = self.qat_step(model, inputs, num_items_in_batch)
        self._record_losses(loss, num_items_in_batch)
        if not self._start_checked:
            self._start_checked = True
            self._warn_if_untrained(model)
        return loss, plain, perturbed

    @property
    def clean_step_sizes(self) -> list[torch.nn.Parameter]:
        """The LSQ step sizes trained on the loss at the unperturbed point (``saq_clean_step_sizes``)."""
        return self._lsq_step_sizes if self.args.saq_clean_step_sizes else []

    def _warn_if_untrained(self, model) -> None:
        """SAQ on a model that has not learned anything yet costs accuracy (README Results, "scratch"): say so."""
        if self._untrained:
            warnings.warn("SAQ starts on an untrained model (its predictions are near uniform). Trained from scratch, "
                          "SAQ from the first step trailed plain QAT by 1-3 points in our benchmarks at every radius "
                          "tried: keep saq_start_ratio='auto' (plain QAT until the model fits), or train in floating "
                          "point or with saq_mode='qat' first, then fine-tune with SAQ.", stacklevel=2)

    @contextmanager
    def _step_size_gradients_replaced(self, clean, num_items_in_batch):
        """With ``saq_clean_step_sizes``, the descent pass adds ``clean`` (the ascent pass's step-size gradients,
        scaled as the descent loss is) to the LSQ step sizes instead of their gradient at the perturbed point.
        Hooks replace the perturbed-point gradient before it is accumulated, so data-parallel all-reduce and
        gradient accumulation treat the clean gradient exactly like any other. The quantizers meanwhile skip
        computing the gradient that is replaced (a zero still reaches the hook)."""
        if not self.clean_step_sizes:
            yield
            return
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            clean = [g / self.current_gradient_accumulation_steps if g is not None else None for g in clean]
        def replace(c):
            # The clean gradient once; zeros for any further part (reentrant activation checkpointing can deliver
            # a tensor's gradient in parts, one per backward its recompute runs).
            delivered = []

            def hook(grad):
                if c is None or delivered:
                    return torch.zeros_like(grad)
                delivered.append(True)
                return c.to(grad.dtype)

            return hook

        handles = [p.register_hook(replace(c)) for p, c in zip(self._lsq_step_sizes, clean)]
        for quantizer in self._lsq_quantizers:
            quantizer.step_size_grad = False
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for quantizer in self._lsq_quantizers:
                quantizer.step_size_grad = True

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # The same rule as Trainer.training_step uses to decide whether to divide the loss by the accumulation steps:
        # the ``loss_is_scaled_for_ga`` attribute where the Trainer has one (transformers >= 5.19), else the rule
        # older releases apply, which is also the newer ones' rule when the attribute is unset.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return scaled
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            self.compute_loss_func is not None

    def _record_losses(self, descent_loss: torch.Tensor, num_items_in_batch) -> None:
        """Sum the unperturbed (ascent) and perturbed (descent) mean loss of this micro-batch for the log. The
        descent loss comes as ``training_step`` returns it, a share 1/accumulation steps of the mean (divided by the
        Trainer, or normalised over the whole step's samples); the ascent loss as ``compute_loss`` gave it, that share
        only when normalised over the step's samples."""
        steps = self.current_gradient_accumulation_steps
        descent = descent_loss.detach().float() * steps
        ascent = self._raw_ascent_loss.float()
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            ascent = ascent * steps
        sums = self._saq_sums
        sums["ascent_loss"] = sums["ascent_loss"] + ascent
        sums["descent_loss"] = sums["descent_loss"] + descent
        sums["loss_count"] += 1

    def _observe_loss(self, loss: torch.Tensor, returned: bool, num_items_in_batch) -> None:
        """Feed ``rho="auto"``'s rule one micro-batch's mean training loss: ``loss`` as ``compute_loss`` gave it
        (``returned=False``) or as ``training_step`` returned it (divided for gradient accumulation)."""
        if self.radius_rule is None:
            return
        if self.distiller is not None:  # the rule's thresholds are in units of ln(num_classes): the label CE
            self.radius_rule.observe(self.distiller.last_label_loss)
            return
        if returned or self._loss_is_scaled_for_ga(num_items_in_batch):
            loss = loss * self.current_gradient_accumulation_steps
        self.radius_rule.observe(loss)

    @property
    def rho_auto_measurement(self) -> dict | None:
        """``rho="auto"``: the rule's settings and the radius it took (mean of the logged radii, and the latest)."""
        if self.radius_rule is None:
            return None
        logged = [entry["saq_rho"] for entry in self.state.log_history if "saq_rho" in entry]
        if not logged and self._rho_count:
            logged = [float(self._rho_sum) / self._rho_count]
        rule = self.radius_rule
        seen = rule.fast is not None
        return {"rule": "rho = rho_auto_max * min(1, L_fast / (rho_auto_loss_share * ln C)) * "
                        "clamp((fall_zero - d) / (fall_zero - fall_full), 0, 1), d = (L_slow - L_fast) / L_slow",
                "rho_auto_max": rule.rho_max, "rho_auto_loss_share": self.args.rho_auto_loss_share,
                "fall_full": rule.FALL_FULL, "fall_zero": rule.FALL_ZERO, "warmup": rule.WARMUP,
                "num_classes": rule.num_classes, "mean_rho": sum(logged) / len(logged) if logged else None,
                "last_rho": float(rule.rho) if seen else None,
                "last_mean_loss": float(rule.fast) if seen else None,
                "last_fall": float(rule.fall) if seen else None}

    def epsilon(self, grads):
        """ε of ``self.sharpness`` for the ascent gradients ``grads`` (``None``: skipped), its norms summed for
        the log. Under ``rho="auto"`` the radius is set from the training loss first."""
        if self.radius_rule is not None:
            self.sharpness.rho = self.radius_rule.rho
            self._rho_sum, self._rho_count = self._rho_sum + self.sharpness.rho, self._rho_count + 1
        eps = self.sharpness.compute_epsilon(grads)
        if eps is not None:
            sums = self._saq_sums
            sums["grad_norm"] = sums["grad_norm"] + self.sharpness.last_grad_norm.detach()
            sums["eps_norm"] = sums["eps_norm"] + torch.linalg.vector_norm(
                torch.stack([n.float() for n in torch._foreach_norm([e for e in eps if e is not None])])
            )
            sums["count"] += 1
        return eps

    def _initialize_quantizers_eagerly(self, model, inputs, num_items_in_batch):
        """LSQ's first-batch initialisation reads the data and writes buffers, which a compiled graph should
        not do: run it once, eagerly, on the batch the compiled model is about to see (same dropout draws,
        running statistics untouched), so the step sizes are those an eager run would set."""
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        if all(q.ready() for q in unwrapped.modules() if isinstance(q, LSQQuantizer)):
            return
        with torch.no_grad(), self._same_random_draws(), frozen_running_stats(unwrapped):
            self._ascent_loss(unwrapped, inputs, num_items_in_batch)

    def _same_random_draws(self):
        """Fork the RNG for the ascent pass, so the descent pass draws the same dropout masks (and the
        random stream stays the one plain QAT would see)."""
        device = self.args.device
        if device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
        return torch.random.fork_rng(devices=[index], device_type=device.type)

    def _ascent_loss(self, model, inputs, num_items_in_batch):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch,
                                              return_outputs=True)
        if not self._start_checked:
            self._untrained = _predicts_uniformly(outputs)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        self._raw_ascent_loss = loss.detach()
        # The fp16 loss scale keeps small ascent gradients from underflowing, and puts the clean step-size
        # gradients on the scale of the descent pass's (which the Trainer backpropagates scaled).
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers 5.24 writes checkpoints with the Hub's key names (e.g. ViT's ``encoder.layer.N.attention``)
        # but resumes with a plain ``load_state_dict``, which then restores nothing (huggingface/transformers
        # #43701). ``from_pretrained`` applies the renaming, and rebuilds the quantized layers exactly.
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not isinstance(unwrapped, PreTrainedModel) or self.is_fsdp_enabled or not os.path.isfile(
            os.path.join(resume_from_checkpoint, CONFIG_NAME)
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        reloaded = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=unwrapped.dtype)
        if any(q.step_size_format == "linear" for q in reloaded.modules() if isinstance(q, LSQQuantizer)):
            raise ValueError(f"{resume_from_checkpoint} stores its step sizes linearly (an earlier saq-hf), so its "
                             "optimizer state does not fit this release's log step sizes: start a new run from it "
                             "(model_name_or_path: the checkpoint folder) instead of resuming")
        unwrapped.load_state_dict(reloaded.state_dict())

    def create_optimizer(self, model=None):
        """The stock optimizer, with the LSQ step sizes in a group of their own: no weight decay, and
        ``step_size_lr_scale`` times the learning rate (the scheduler scales every group alike)."""
        # transformers < 5.10: create_optimizer() builds the optimizer of self.model, the only model it is called for.
        optimizer = super().create_optimizer(model) if create_optimizer_takes_model() else super().create_optimizer()
        scale = self.args.step_size_lr_scale
        steps = {id(q.step_size_parameter) for q in (model or self.model).modules() if isinstance(q, LSQQuantizer)}
        if scale == 1 or not steps or not isinstance(optimizer, torch.optim.Optimizer) or optimizer.state:
            return optimizer
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in steps]
            group["params"] = [p for p in group["params"] if id(p) not in steps]
        if moved:
            base = optimizer.param_groups[0]
            optimizer.add_param_group({"params": moved, "lr": base["lr"] * scale, "weight_decay": 0.0})
        return optimizer

    def get_decay_parameter_names(self, model) -> list[str]:
        # Decoupled weight decay would pull each log step size toward 0, i.e. every step size toward 1.
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith("step_size")]

    def _strategy_state_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"{SAQ_STATE_NAME}_{self.args.process_index}.safetensors")

    def _save_rng_state(self, output_dir: str) -> None:
        # The strategies' kept tensors are per process (each worker's own gradients), saved next to its RNG state,
        # so a resumed run takes exactly the steps the uninterrupted one would.
        super()._save_rng_state(output_dir)
        if self.distiller is not None and self.args.should_save:
            self.distiller.save(output_dir)  # which teacher, not the teacher: a resume must bring the same one
        tensors, metadata = self.strategy.state_dict()
        if self.radius_rule is not None:
            tensors = {**tensors, **self.radius_rule.state_dict()}
        if tensors:
            os.makedirs(output_dir, exist_ok=True)
            save_file(tensors, self._strategy_state_file(output_dir), metadata=metadata)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        path = self._strategy_state_file(checkpoint) if checkpoint is not None else None
        if path is None or not os.path.isfile(path):
            first_step = self.strategy.resumes_without_state
            if checkpoint is not None and first_step is not None:
                logger.warning(f"{checkpoint} holds no {SAQ_STATE_NAME} file (written by an older saq-hf, or with "
                               f"save_only_model): the first step after resuming is a {first_step} step.")
            return
        with safe_open(path, framework="pt", device=str(self.args.device)) as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata()
        if self.radius_rule is not None:
            self.radius_rule.load_state_dict(tensors)  # pops its keys
        for key in [k for k in tensors if k.startswith("rho_auto.")]:
            tensors.pop(key)  # a rule state saved by a run without rho="auto"
        self.strategy.load_state_dict(tensors, metadata)

    def _load_best_model(self) -> None:
        # The stock best-model reload is the same plain ``load_state_dict`` of renamed keys as the resume path
        # above, so it keeps the last step's weights wherever a key was renamed: reload it the same way.
        best = self.state.best_model_checkpoint
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not isinstance(unwrapped, PreTrainedModel) or self.is_fsdp_enabled or self.is_deepspeed_enabled or \
                not os.path.isfile(os.path.join(best, CONFIG_NAME)):
            return super()._load_best_model()
        self._load_from_checkpoint(best)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.distiller is not None:
            logs.update(self.distiller.pop_log())  # label_loss, distill_loss
        if "loss" in logs and self.args.saq_mode != "qat":
            sums = self._saq_sums
            if sums["count"]:
                logs["saq_ascent_grad_norm"] = float(sums["grad_norm"]) / sums["count"]
                logs["saq_eps_norm"] = float(sums["eps_norm"]) / sums["count"]
            if sums["loss_count"]:
                ascent = float(sums["ascent_loss"]) / sums["loss_count"]
                descent = float(sums["descent_loss"]) / sums["loss_count"]
                logs["saq_ascent_loss"], logs["saq_descent_loss"] = ascent, descent
                self._watch_for_collapse(ascent, descent, sums["loss_count"])
            logs["saq_skipped"] = self.sharpness.skipped if self.sharpness is not None else 0
            if self.radius_rule is not None and self._rho_count:
                logs["saq_rho"] = float(self._rho_sum) / self._rho_count  # the mean radius since the last log
                self._rho_sum, self._rho_count = 0.0, 0
                self.rho = float(self.radius_rule.rho)
            elif self.rho is not None and self.radius_rule is None:
                logs["saq_rho"] = self.rho
            self._saq_sums = self._empty_sums()
        super().log(logs, start_time)

    def _watch_for_collapse(self, ascent: float, descent: float, steps: int) -> None:
        """Warn once when the perturbed loss has stayed ``GUARD_RATIO`` times the unperturbed one for
        ``GUARD_STEPS`` SAQ steps. (Step sizes cannot leave the positive numbers: they are trained as logarithms.)"""
        self._guard_run = self._guard_run + steps if descent > GUARD_RATIO * ascent else 0
        if self._guard_warned or self._guard_run < GUARD_STEPS:
            return
        self._guard_warned = True
        reason = (f"the perturbed loss has stayed above {GUARD_RATIO:g}x the unperturbed loss for "
                  f"{self._guard_run} steps ({descent:.3g} vs {ascent:.3g})")
        now = f"rho='auto', now {float(self.radius_rule.rho):.3g}" if self.radius_rule is not None else \
            f"now {self.rho:g}"
        warnings.warn(f"SAQ may be stopping this model from learning: {reason}. Use a smaller rho ({now}, "
                      f"saq_radius={self.args.saq_radius!r}), and keep saq_clean_step_sizes=True.", stacklevel=2)
