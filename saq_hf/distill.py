"""Distillation from a frozen teacher (usually the student's own full-precision model) for ``SAQTrainer``.

The training loss of a micro-batch becomes ``(1 - alpha) * CE(z_s, y) + alpha * T² * KL(softmax(z_t / T) ||
softmax(z_s / T))`` with ``z_s`` the student's logits, ``z_t`` the teacher's and ``y`` the labels. The teacher's
logits do not depend on the student's weights nor on SAQ's perturbation ε, so ``Distiller`` computes them once per
micro-batch and hands the same tensor to every pass over it (SAQ's ascent and descent pass, the first-batch look, the
compiled run's eager initialisation): see docs/METHOD.md, "Distillation".
"""

import contextlib
import hashlib
import json
import math
import os

import torch
from torch.nn import functional as F

TEACHER_FILE = "saq_teacher.json"  # in each checkpoint folder: which teacher taught the checkpoint's weights


def check_distill_fields(alpha, temperature) -> None:
    """One line naming the field for a bad ``distill_alpha`` or ``distill_temperature``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0 <= alpha <= 1:
        raise ValueError(f"distill_alpha must be a number from 0 to 1 (0: labels only, 1: the teacher only), got "
                         f"{alpha!r} (field: distill_alpha)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"distill_temperature must be a finite number > 0, got {temperature!r} "
                         "(field: distill_temperature)")


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """sha256 over the teacher's state_dict: each tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def teacher_name(teacher: torch.nn.Module) -> str:
    config = getattr(teacher, "config", None)
    return getattr(config, "_name_or_path", None) or type(teacher).__name__


def _logits(outputs) -> torch.Tensor:
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)):
        logits = outputs[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("distillation needs models that return (batch, classes) logits: a teacher_model for an "
                         "image classifier")
    return logits


class Distiller:
    """The frozen teacher, its logits for the current micro-batch, and the distillation loss."""

    def __init__(self, teacher: torch.nn.Module, alpha: float, temperature: float, device):
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.name = teacher_name(teacher)
        self._fingerprint: str | None = None
        self._cached: tuple[list, torch.Tensor] | None = None  # (the micro-batch's input shapes, teacher logits)
        self._in_micro_batch = False
        self.forwards = 0  # teacher forward passes so far
        self._sums = {"label_loss": 0.0, "distill_loss": 0.0, "count": 0}
        self._last_terms: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_label_loss: torch.Tensor | None = None  # the mean label CE of the last training micro-batch

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:  # the teacher is frozen: hashed once
            self._fingerprint = teacher_fingerprint(self.teacher)
        return self._fingerprint

    @contextlib.contextmanager
    def micro_batch(self):
        """The scope of one micro-batch (``SAQTrainer.training_step``): the teacher's logits are computed on its first
        pass and handed to every later one (they do not depend on the student nor on ε); on leaving, forgotten and
        the terms of its last pass (SAQ's descent pass, whose loss the Trainer logs as ``loss``) logged."""
        self._in_micro_batch = True
        try:
            yield
        finally:
            self._in_micro_batch = False
            self._cached = None
            if self._last_terms is not None:
                sums = self._sums
                sums["label_loss"] = sums["label_loss"] + self._last_terms[0]
                sums["distill_loss"] = sums["distill_loss"] + self._last_terms[1]
                sums["count"] += 1
                self._last_terms = None

    def teacher_logits(self, inputs: dict, context) -> torch.Tensor:
        """The teacher's logits for ``inputs`` (the student's inputs without labels) under ``context`` (the student's
        autocast). Inside :meth:`micro_batch`, computed once and reused by every pass over the micro-batch; the
        passes may hold copies of the batch (the Trainer prepares the inputs for each pass, and ``.to("cpu:0")``
        copies), so a later pass is checked by the shapes of its tensors, never by a host-syncing comparison of
        values. Outside it (a direct ``compute_loss`` call) every call runs the teacher."""
        shapes = [(key, tuple(value.shape)) for key, value in inputs.items() if isinstance(value, torch.Tensor)]
        if self._in_micro_batch and self._cached is not None:
            if self._cached[0] != shapes:
                raise RuntimeError(f"one training step passed two different micro-batches to compute_loss "
                                   f"({self._cached[0]} and {shapes}): the teacher's logits are shared by the "
                                   "passes over one micro-batch")
            return self._cached[1]
        self.teacher.eval()  # a caller's model.train() on a module holding the teacher must not turn on its dropout
        with torch.no_grad(), context():
            logits = _logits(self.teacher(**inputs)).detach()
        self.forwards += 1
        if self._in_micro_batch:
            self._cached = (shapes, logits)
        return logits

    def loss(self, student_logits, teacher_logits, labels, label_smoothing: float, num_items_in_batch, scale: float):
        """The micro-batch's loss, normalised as the Trainer's rule expects the label loss to be: each sample's
        term summed and divided by ``num_items_in_batch`` (the accumulated step's count, then times ``scale``) where
        one is given, else the micro-batch's mean (the Trainer then divides by the accumulation steps)."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"the teacher gives logits of shape {tuple(teacher_logits.shape)} and the student "
                             f"{tuple(student_logits.shape)}: the teacher must predict the student's classes")
        s, T = student_logits.float(), self.temperature
        valid = labels.ne(-100)
        label = F.cross_entropy(s, labels, reduction="none", label_smoothing=label_smoothing)
        kl = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(teacher_logits.float() / T, dim=-1),
                      reduction="none", log_target=True).sum(-1) * (T * T)
        kl = torch.where(valid, kl, torch.zeros_like(kl))
        count = valid.sum().clamp_min(1)
        denominator = num_items_in_batch / scale if num_items_in_batch is not None else count
        # The micro-batch's means, whatever the normalisation: what rho="auto" reads and the log shows.
        self.last_label_loss = label.detach().sum() / count
        self._last_terms = (self.last_label_loss, kl.detach().sum() / count)
        return (1 - self.alpha) * (label.sum() / denominator) + self.alpha * (kl.sum() / denominator)

    def pop_log(self) -> dict[str, float]:
        """The label CE and the distillation term (T²·KL), each a mean over the micro-batches since the last log."""
        sums, self._sums = self._sums, {"label_loss": 0.0, "distill_loss": 0.0, "count": 0}
        if not sums["count"]:
            return {}
        return {name: float(sums[name]) / sums["count"] for name in ("label_loss", "distill_loss")}

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save(self, checkpoint: str) -> None:
        os.makedirs(checkpoint, exist_ok=True)
        info = {"teacher": self.name, "sha256": self.fingerprint, "distill_alpha": self.alpha,
                "distill_temperature": self.temperature}
        with open(os.path.join(checkpoint, TEACHER_FILE), "w") as f:
            json.dump(info, f, indent=2)


def check_resume_teacher(checkpoint: str, distiller: Distiller | None) -> None:
    """Refuse, in one line, resuming ``checkpoint`` with another teacher than the one that trained it (or with a
    teacher where it had none, or none where it had one): the teacher is not in checkpoints."""
    path = os.path.join(checkpoint, TEACHER_FILE)
    saved = None
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    if saved is None and distiller is None:
        return
    if saved is None:
        raise ValueError(f"{checkpoint} was trained without a teacher: resume it without teacher_model (or "
                         "distill_alpha=0), or start a new run from it")
    if distiller is None:
        raise ValueError(f"{checkpoint} was trained with teacher {saved.get('teacher')!r}: resume it with that "
                         "teacher_model, or start a new run from it")
    if saved.get("sha256") != distiller.fingerprint:
        raise ValueError(f"{checkpoint} was trained with teacher {saved.get('teacher')!r} (sha256 "
                         f"{str(saved.get('sha256'))[:12]}) and this run's teacher {distiller.name!r} differs "
                         f"(sha256 {distiller.fingerprint[:12]}): resume with the same teacher_model")
