"""The checks around SAQ's step: Trainer switches refused before training, the torch.compile checks, and the warnings
for a model that starts untrained and for a perturbation that stops the model from learning."""

import warnings

import torch
from transformers.utils import logging

from .distill import Distiller
from .quant import LSQQuantizer, quantized_layers
from .sharpness import frozen_running_stats, same_random_draws
from .start_rule import predicts_uniformly

logger = logging.get_logger(__name__)

# The torch releases benchmarks/compile_check.py passes on (compiled gradients equal eager ones), on a CPU:
# benchmarks/results/compile_check_torch*_cpu.txt (2.6 is the declared floor, 2.15 the newest release).
COMPILE_VERIFIED_TORCH = ("2.6", "2.11", "2.12", "2.13", "2.14", "2.15")
# The collapse guard: warn when the perturbed loss stays this many times the unperturbed one over this many
# consecutive SAQ steps (docs/METHOD.md, "When SAQ stops a model from learning").
GUARD_RATIO, GUARD_STEPS = 1.5, 50


def refuse_unsupported_switches(trainer) -> None:
    """One line, before any training, for each setting under which SAQ's step would silently differ from its
    definition (docs/METHOD.md, "Trainer switches")."""
    args = trainer.args
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
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        engine = "FSDP" if trainer.is_fsdp_enabled else "DeepSpeed"
        raise ValueError(f"SAQ does not run under {engine}: it shards or partitions the parameters and gradients "
                         "that SAQ's step perturbs and reads whole; train with DDP (accelerate launch / torchrun, "
                         "no fsdp or deepspeed setting), or with saq_mode='qat'")
    if args.n_gpu > 1:
        raise ValueError(f"SAQ does not run under torch.nn.DataParallel ({args.n_gpu} GPUs in one process): its "
                         "replicas do not see the perturbation; launch one process per GPU (accelerate launch or "
                         "torchrun) for DDP, or make one GPU visible (CUDA_VISIBLE_DEVICES)")


def distiller_for(trainer, teacher) -> Distiller | None:
    """The trainer's ``Distiller`` for ``teacher_model`` (None: no distillation), refusing settings it cannot serve."""
    args = trainer.args
    if teacher is None:
        if (args.distill_alpha, args.distill_temperature) != (1.0, 1.0):
            logger.warning("distill_alpha and distill_temperature have no effect without a teacher_model.")
        return None
    if args.distill_alpha == 0:
        logger.warning("distill_alpha=0 trains on the labels alone: the teacher_model is not used.")
        return None
    if trainer.compute_loss_func is not None:
        raise ValueError("a teacher_model sets the training loss (labels and distillation): drop compute_loss_func")
    if args.n_gpu > 1:
        raise ValueError(f"distillation does not run under torch.nn.DataParallel ({args.n_gpu} GPUs in one "
                         "process): launch one process per GPU (accelerate launch or torchrun) for DDP")
    student = getattr(getattr(trainer.model, "config", None), "num_labels", None)
    teacher_labels = getattr(getattr(teacher, "config", None), "num_labels", None)
    if student is not None and teacher_labels is not None and student != teacher_labels:
        raise ValueError(f"the teacher_model predicts {teacher_labels} classes and the model {student}: the "
                         "teacher must predict the student's classes")
    return Distiller(teacher, args.distill_alpha, args.distill_temperature, args.device)


def initialize_quantizers_eagerly(trainer, model, inputs, num_items_in_batch) -> None:
    """LSQ's first-batch initialisation reads the data and writes buffers, which a compiled graph should
    not do: run it once, eagerly, on the batch the compiled model is about to see (same dropout draws,
    running statistics untouched), so the step sizes are those an eager run would set."""
    unwrapped = trainer.accelerator.unwrap_model(model, keep_torch_compile=False)
    if all(q.ready() for q in unwrapped.modules() if isinstance(q, LSQQuantizer)):
        return
    with torch.no_grad(), same_random_draws(trainer.args.device), frozen_running_stats(unwrapped):
        trainer._ascent_loss(unwrapped, inputs, num_items_in_batch)


def check_compiled_gradients(model) -> None:
    """Fail loudly if the compiled model's first backward left every quantized weight without a gradient: a
    compiler that mistraces the LSQ op's backward (torch 2.11 did, while the op's forward returned a tensor
    modified in place) would otherwise train nothing but biases, silently. ``model``: the unwrapped model."""
    weights = [layer.weight for _, layer in quantized_layers(model) if layer.weight.requires_grad]
    if weights and not any(w.grad is not None and bool(w.grad.any()) for w in weights):
        raise RuntimeError(f"torch.compile gave every quantized weight a zero gradient on the first step (torch "
                           f"{torch.__version__}): the compiled backward is wrong; train with torch_compile=False "
                           "or another torch release")


class Watch:
    """What SAQ checks once per trainer while it trains: a model that starts untrained (its first batch's predictions
    are near uniform), a perturbed loss that stays far above the unperturbed one, the first compiled gradients."""

    def __init__(self):
        self.start_checked, self.untrained = False, False
        self.collapse_run, self.collapse_warned = 0, False
        self.compiled_checked = False

    def check_compiled(self, model) -> None:
        """After the first compiled training step: :func:`check_compiled_gradients` of the unwrapped ``model``."""
        self.compiled_checked = True
        check_compiled_gradients(model)

    def look_at_first_batch(self, outputs) -> None:
        """The ascent pass's outputs: until the first SAQ step is done, whether they show an untrained model."""
        if not self.start_checked:
            self.untrained = predicts_uniformly(outputs)

    def first_saq_step_done(self) -> None:
        """SAQ on a model that has not learned anything yet costs accuracy (README Results, "scratch"): say so."""
        if self.start_checked:
            return
        self.start_checked = True
        if self.untrained:
            warnings.warn("SAQ starts on an untrained model (its predictions are near uniform). Trained from scratch, "
                          "SAQ from the first step trailed plain QAT by 1-3 points in our benchmarks at every radius "
                          "tried: keep saq_start_ratio='auto' (plain QAT until the model fits), or train in floating "
                          "point or with saq_mode='qat' first, then fine-tune with SAQ.", stacklevel=2)

    def collapse(self, trainer, ascent: float, descent: float, steps: int) -> None:
        """Warn once when the perturbed loss has stayed ``GUARD_RATIO`` times the unperturbed one for
        ``GUARD_STEPS`` SAQ steps. (Step sizes cannot leave the positive numbers: they are trained as logarithms.)"""
        self.collapse_run = self.collapse_run + steps if descent > GUARD_RATIO * ascent else 0
        if self.collapse_warned or self.collapse_run < GUARD_STEPS:
            return
        self.collapse_warned = True
        reason = (f"the perturbed loss has stayed above {GUARD_RATIO:g}x the unperturbed loss for "
                  f"{self.collapse_run} steps ({descent:.3g} vs {ascent:.3g})")
        now = f"rho='auto', now {float(trainer.radius_rule.rho):.3g}" if trainer.radius_rule is not None else \
            f"now {trainer.rho:g}"
        warnings.warn(f"SAQ may be stopping this model from learning: {reason}. Use a smaller rho ({now}, "
                      f"saq_radius={trainer.args.saq_radius!r}), and keep saq_clean_step_sizes=True.", stacklevel=2)
