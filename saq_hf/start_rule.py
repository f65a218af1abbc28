"""When SAQ starts (``saq_start_ratio``): a share of the optimizer steps, or with "auto" the first step unless the first
batch shows an untrained model, which then trains with plain QAT until it fits its data (the fit watch)."""

import math

import torch
from transformers.utils import logging

from .sharpness import frozen_running_stats, same_random_draws

logger = logging.get_logger(__name__)

# saq_start_ratio="auto" on a model that starts untrained: plain QAT until the mean training loss over FIT_WINDOW
# optimizer steps falls below FIT_SHARE * ln(num_classes), i.e. until the model fits its training data.
FIT_SHARE, FIT_WINDOW = 0.25, 10
WAITING = -1  # logged as saq_start_step while SAQ waits for the fit
# Mean prediction entropy above this share of ln(num_classes) marks an untrained model (a quantization-damaged
# one has a high loss too, but confident predictions): SAQ there only costs, and rho="auto" takes its smallest radius.
UNTRAINED_SHARE = 0.9


def class_logits(outputs) -> torch.Tensor | None:
    """A classifier's ``(batch, classes)`` logits from a model output, or ``None``."""
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[-1] < 2:
        return None
    return logits


def predicts_uniformly(outputs) -> bool:
    logits = class_logits(outputs)
    if logits is None:
        return False
    with torch.no_grad():
        probs = logits.detach().float().softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return bool(entropy > UNTRAINED_SHARE * math.log(logits.shape[-1]))


class StartRule:
    """The first SAQ step of one ``SAQTrainer``: ``step`` is None until its first training step decides, ``WAITING``
    while an untrained model is fitting."""

    def __init__(self):
        self.step: int | None = None
        self.fit_threshold: float | None = None
        self.fit_losses: list[torch.Tensor] = []
        self._fit_checked_at: int | None = None

    def resolve(self, trainer, model, inputs) -> int:
        """The first SAQ step, or ``WAITING``: ``saq_start_ratio`` of ``max_steps``; with "auto", 0 unless the first
        batch shows an untrained model, which waits for its fit. A resumed run takes what its log recorded last
        (still waiting, it goes on waiting)."""
        args, state = trainer.args, trainer.state
        if args.saq_mode == "qat":
            return 0
        logged = [entry["saq_start_step"] for entry in state.log_history if "saq_start_step" in entry]
        ratio = args.saq_start_ratio
        untrained = False
        if ratio == "auto" and not logged or logged and logged[-1] == WAITING:
            outputs = _look(trainer, model, trainer._prepare_inputs(inputs))
            logits = class_logits(outputs)
            if logits is not None:
                self.fit_threshold = FIT_SHARE * math.log(logits.shape[-1])
            # Every data-parallel worker must take the same decision: untrained only if all workers see it.
            untrained = bool(trainer.accelerator.reduce(torch.tensor(float(predicts_uniformly(outputs)),
                                                                     device=args.device), reduction="mean") == 1)
        if logged:
            return int(logged[-1]) if logged[-1] != WAITING or self.fit_threshold is not None else 0
        if ratio == "auto":
            if not untrained:
                return 0
            logger.warning(f"The model starts untrained (near-uniform predictions): plain QAT until its mean "
                           f"training loss over {FIT_WINDOW} steps falls below {self.fit_threshold:.3g} "
                           f"({FIT_SHARE:g} x ln(num_classes)), then SAQ (saq_start_ratio='auto'; a number sets the "
                           "share of plain steps instead).")
            trainer.log({"saq_start_step": WAITING})
            return WAITING
        step = int(round(ratio * state.max_steps))
        if step > 0:
            logger.warning(f"SAQ starts at optimizer step {step} of {state.max_steps}: the steps before it "
                           f"are plain QAT (saq_start_ratio={ratio!r}).")
            trainer.log({"saq_start_step": step})
        return step

    def watch_for_fit(self, trainer, loss: torch.Tensor) -> None:
        """While SAQ waits: keep this micro-batch's training loss; once per ``FIT_WINDOW`` optimizer steps compare
        their mean (over data-parallel workers) with the threshold, and start SAQ at the next step when below."""
        loss = loss.detach().float()
        if trainer.distiller is not None:  # the threshold is in units of ln(num_classes): the label CE
            loss = trainer.distiller.last_label_loss.float()
        else:  # returned by training_step: a share 1/accumulation steps of the micro-batch mean, either way
            loss = loss * trainer.current_gradient_accumulation_steps
        self.fit_losses.append(loss)
        step = trainer.state.global_step + 1  # the step this micro-batch belongs to, once the optimizer has stepped
        if step % FIT_WINDOW or self._fit_checked_at == step:
            return
        self._fit_checked_at = step
        mean = trainer.accelerator.reduce(torch.stack(self.fit_losses).mean(), reduction="mean")
        self.fit_losses = []
        if float(mean) < self.fit_threshold:
            self.step = step
            logger.warning(f"SAQ starts at optimizer step {step}: the mean training loss of the last {FIT_WINDOW} "
                           f"steps, {float(mean):.3g}, is below {self.fit_threshold:.3g}.")
            trainer.log({"saq_start_step": step})

    def warn_if_never_started(self) -> None:
        """After training: one warning line if SAQ waited for a fit that never came."""
        if self.step == WAITING:
            from .console import warn  # one "[saq-hf] warning:" line, like the CLI's own warnings

            warn(f"SAQ never started: the training loss never fell below {self.fit_threshold:.3g} "
                 f"({FIT_SHARE:g} x ln(num_classes)), so this run trained with plain QAT. A model that starts "
                 "untrained gets SAQ once it fits (from scratch, SAQ cost accuracy before that in our "
                 "benchmarks); set saq_start_ratio to a number to start it anyway.")


def _look(trainer, model, inputs):
    """The model's outputs on prepared ``inputs`` with nothing changed: no gradients, batch-norm statistics
    restored, random draws forked (the training run's stream is untouched)."""
    with torch.no_grad(), frozen_running_stats(model), same_random_draws(trainer.args.device), \
            trainer.compute_loss_context_manager():
        return trainer.compute_loss(model, inputs, return_outputs=True)[1]
