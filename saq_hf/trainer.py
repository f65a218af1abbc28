"""``SAQTrainer``: ``transformers.Trainer`` whose training step is docs/METHOD.md's two-pass SAQ update.

Around it: which steps run it in ``strategies.py``, its arguments in ``training_args.py``, when SAQ starts in
``start_rule.py``, the radius of ``rho="auto"`` in ``radius.py``, the LSQ step sizes' training in ``step_sizes.py``, the
log's sums in ``step_log.py``, checks and warnings in ``guards.py``, checkpoint files in ``checkpoint_state.py``.
"""

import os
from contextlib import nullcontext

import torch
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from . import checkpoint_state
from .compat import check_trainer_internals, create_optimizer_takes_model
from .distill import Distiller, check_resume_teacher
from .guards import Watch, distiller_for, initialize_quantizers_eagerly, refuse_unsupported_switches
from .quant import LSQQuantizer
from .radius import LossDrivenRadius, radius_rule_for
from .sharpness import SharpnessPerturbation, frozen_running_stats, recording, same_random_draws
from .start_rule import FIT_SHARE, FIT_WINDOW, UNTRAINED_SHARE, WAITING, StartRule, class_logits
from .step_log import StepLog
from .step_sizes import group_step_sizes, step_size_gradients_replaced, train_step_sizes_in_log_form, \
    trained_step_size_quantizers
from .strategies import STRATEGIES
from .training_args import SAQTrainingArguments

# Re-exported where they were before their modules existed (saq_hf.run, benchmarks/regimes.py read them here).
__all__ = ["SAQTrainer", "SAQTrainingArguments", "FIT_SHARE", "FIT_WINDOW", "UNTRAINED_SHARE", "WAITING"]


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
        refuse_unsupported_switches(self)
        # Distillation (docs/METHOD.md, "Distillation"): the frozen, unwrapped teacher and its per-micro-batch logits.
        self.distiller: Distiller | None = distiller_for(self, teacher_model)
        train_step_sizes_in_log_form(self.model)
        self.sharpness: SharpnessPerturbation | None = None
        self._lsq_step_sizes: list[torch.nn.Parameter] = []
        self._lsq_quantizers: list[LSQQuantizer] = []
        # rho="auto": ``radius_rule`` sets the radius of every SAQ step from the training loss; ``rho`` is then its
        # latest value (None before the first SAQ step).
        self.rho: float | None = None if self.args.rho == "auto" else self.args.rho
        self.radius_rule: LossDrivenRadius | None = radius_rule_for(self.model, self.args)
        self._loss_observed = False
        self.strategy = STRATEGIES[self.args.saq_strategy](self.args)
        self.step_log = StepLog()  # the saq_* entries of the log (with the radius sums of rho="auto")
        self.watch = Watch()  # the untrained-model and collapse warnings, the compiled-gradient check
        self.start_rule = StartRule()  # the first SAQ step (saq_start_ratio)

    @property
    def saq_start_step(self) -> int | None:
        """The first SAQ step (None: not decided yet; ``WAITING``: an untrained model is fitting)."""
        return self.start_rule.step

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
        loss = self.distiller.loss(class_logits(outputs), teacher_logits, labels, self.args.label_smoothing_factor,
                                   num_items_in_batch if scaled else None, scale)
        return (loss, outputs) if return_outputs else loss

    def _sharpness_for(self, model: torch.nn.Module) -> SharpnessPerturbation:
        unwrapped = self.accelerator.unwrap_model(model)
        if self.sharpness is None or self.sharpness.model is not unwrapped:
            args = self.args
            self.sharpness = SharpnessPerturbation(unwrapped, case=args.saq_mode, rho=self.rho or 0.0,
                                                   adaptive=args.saq_adaptive, perturb=args.saq_perturb,
                                                   radius=args.saq_radius)
            # Built with the perturbation, not per step: the clean-gradient hooks go on these every SAQ step.
            self._lsq_quantizers = trained_step_size_quantizers(unwrapped)
            self._lsq_step_sizes = [m.step_size_parameter for m in self._lsq_quantizers]
        if self.radius_rule is None:
            self.sharpness.rho = self.rho
        return self.sharpness

    def _is_plain_step(self) -> bool:
        step = self.state.global_step
        return self.args.saq_mode == "qat" or self.saq_start_step == WAITING or step < self.saq_start_step or \
            self.strategy.is_plain_step(step)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the stock refusal
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resume_teacher(str(resume_from_checkpoint), self.distiller)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self.start_rule.warn_if_never_started()
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.distiller is None:
            return self._compiled_or_eager_training_step(model, inputs, num_items_in_batch)
        with self.distiller.micro_batch():  # one teacher forward, shared by every pass over the micro-batch
            return self._compiled_or_eager_training_step(model, inputs, num_items_in_batch)

    def _compiled_or_eager_training_step(self, model, inputs, num_items_in_batch):
        if not self.args.torch_compile:
            return self._training_step(model, inputs, num_items_in_batch)
        initialize_quantizers_eagerly(self, model, inputs, num_items_in_batch)
        loss = self._training_step(model, inputs, num_items_in_batch)
        if not self.watch.compiled_checked:
            self.watch.check_compiled(self.accelerator.unwrap_model(model))
        return loss

    def _training_step(self, model, inputs, num_items_in_batch=None):
        if self.start_rule.step is None:
            self.start_rule.step = self.start_rule.resolve(self, model, inputs)
        if self._is_plain_step():
            loss = self.qat_step(model, inputs, num_items_in_batch)
            self._observe_loss(loss, returned=True, num_items_in_batch=num_items_in_batch)
            if self.saq_start_step == WAITING:
                self.start_rule.watch_for_fit(self, loss)
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
        with self.accelerator.no_sync(model), same_random_draws(self.args.device):
            grads, clean = sharpness.ascent_gradients(
                lambda: self._ascent_loss(model, inputs, num_items_in_batch), extra=step_sizes + compared)
        clean, plain = clean[:len(step_sizes)], clean[len(step_sizes):]
        self._observe_loss(self._raw_ascent_loss, returned=False, num_items_in_batch=num_items_in_batch)
        self._loss_observed = True
        eps = self.epsilon(grads)
        del grads
        with sharpness.perturbed(eps), frozen_running_stats(model), \
                self._step_size_gradients_replaced(clean, num_items_in_batch), \
                recording(compared) as perturbed:
            loss = self.qat_step(model, inputs, num_items_in_batch)
        self._record_losses(loss, num_items_in_batch)
        self.watch.first_saq_step_done()
        return loss, plain, perturbed

    @property
    def clean_step_sizes(self) -> list[torch.nn.Parameter]:
        """The LSQ step sizes trained on the loss at the unperturbed point (``saq_clean_step_sizes``)."""
        return self._lsq_step_sizes if self.args.saq_clean_step_sizes else []

    def _step_size_gradients_replaced(self, clean, num_items_in_batch):
        """With ``saq_clean_step_sizes``, the descent pass adds ``clean`` (the ascent pass's step-size gradients,
        scaled as the descent loss is) to the LSQ step sizes instead of their gradient at the perturbed point."""
        if not self.clean_step_sizes:
            return nullcontext()
        if not self._loss_is_scaled_for_ga(num_items_in_batch):
            clean = [g / self.current_gradient_accumulation_steps if g is not None else None for g in clean]
        return step_size_gradients_replaced(self._lsq_quantizers, clean)

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
        self.step_log.add_losses(ascent, descent)

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
        if not logged and self.step_log.rho_count:
            logged = [self.step_log.mean_radius()]
        return self.radius_rule.measurement(logged)

    def epsilon(self, grads):
        """ε of ``self.sharpness`` for the ascent gradients ``grads`` (``None``: skipped), its norms summed for
        the log. Under ``rho="auto"`` the radius is set from the training loss first."""
        if self.radius_rule is not None:
            self.sharpness.rho = self.radius_rule.rho
            self.step_log.add_radius(self.sharpness.rho)
        eps = self.sharpness.compute_epsilon(grads)
        if eps is not None:
            self.step_log.add_epsilon(self.sharpness.last_grad_norm, eps)
        return eps

    def _ascent_loss(self, model, inputs, num_items_in_batch):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch,
                                              return_outputs=True)
        self.watch.look_at_first_batch(outputs)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        self._raw_ascent_loss = loss.detach()
        # The fp16 loss scale keeps small ascent gradients from underflowing, and puts the clean step-size
        # gradients on the scale of the descent pass's (which the Trainer backpropagates scaled).
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Every save of the model (save_model, each checkpoint) ends here: its arguments as JSON, not a pickle.
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            checkpoint_state.save_arguments_as_json(self.args, output_dir if output_dir is not None else
                                                    self.args.output_dir)

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        checkpoint_state.save_strategy_state(self, output_dir)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        checkpoint_state.load_strategy_state(self, checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # transformers 5.24 writes checkpoints with the Hub's key names (e.g. ViT's ``encoder.layer.N.attention``)
        # but resumes with a plain ``load_state_dict``, which then restores nothing (huggingface/transformers
        # #43701). ``from_pretrained`` applies the renaming, and rebuilds the quantized layers exactly.
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_fsdp_enabled or not checkpoint_state.reloads_by_name(unwrapped, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        checkpoint_state.reload_weights(unwrapped, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        # The stock best-model reload is the same plain ``load_state_dict`` of renamed keys as the resume path
        # above, so it keeps the last step's weights wherever a key was renamed: reload it the same way.
        best = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or \
                not checkpoint_state.reloads_by_name(self.accelerator.unwrap_model(self.model), best):
            return super()._load_best_model()
        self._load_from_checkpoint(best)

    def create_optimizer(self, model=None):
        """The stock optimizer, with the LSQ step sizes in a group of their own (``step_sizes.group_step_sizes``)."""
        # transformers < 5.10: create_optimizer() builds the optimizer of self.model, the only model it is called for.
        optimizer = super().create_optimizer(model) if create_optimizer_takes_model() else super().create_optimizer()
        return group_step_sizes(optimizer, model or self.model, self.args.step_size_lr_scale)

    def get_decay_parameter_names(self, model) -> list[str]:
        # Decoupled weight decay would pull each log step size toward 0, i.e. every step size toward 1.
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith("step_size")]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.distiller is not None:
            logs.update(self.distiller.pop_log())  # label_loss, distill_loss
        if "loss" in logs and self.args.saq_mode != "qat":
            losses = self.step_log.write(logs)  # saq_ascent_grad_norm, saq_eps_norm, saq_ascent/descent_loss
            if losses is not None:
                self.watch.collapse(self, *losses)
            logs["saq_skipped"] = self.sharpness.skipped if self.sharpness is not None else 0
            if self.radius_rule is not None and self.step_log.rho_count:
                logs["saq_rho"] = self.step_log.pop_radius()  # the mean radius since the last log
                self.rho = float(self.radius_rule.rho)
            elif self.rho is not None and self.radius_rule is None:
                logs["saq_rho"] = self.rho
            self.step_log.clear()
        super().log(logs, start_time)
