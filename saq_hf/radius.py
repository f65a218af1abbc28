"""``LossDrivenRadius``: the rule of ``rho="auto"``, which sets SAQ's radius from the training loss (docs/METHOD.md,
"The radius ρ")."""

import math

import torch


class LossDrivenRadius:
    """``rho="auto"``: a relative radius for a training loss that is high *and* has stopped falling,

    ``ρ = rho_max · min(1, L_fast / (loss_share · ln C)) · clamp((FALL_ZERO − d) / (FALL_ZERO − FALL_FULL), 0, 1)``,
    ``d = (L_slow − L_fast) / L_slow``,

    with ``L_fast`` and ``L_slow`` a fast and a slow exponential mean of the unperturbed training loss (weights
    ``1 − FAST_DECAY`` and ``1 − SLOW_DECAY`` for the newest micro-batch) and ``C`` the number of classes.

    A high loss alone does not tell "cannot fit" from "not fitted yet": a small fine-tuning set starts with a
    high loss too, and sharpness-aware steps there only cost. ``d`` tells them apart: while the loss still falls
    (the fast mean more than ``FALL_FULL`` below the slow one) the model is fitting and ρ shrinks, to 0 at a fall of
    ``FALL_ZERO``; once the loss has stopped falling, ρ follows its level, the largest where the labels cannot be
    fitted (noisy labels, where SAQ gains most) and near 0 where they were fitted. ρ is 0 for the first
    ``WARMUP`` micro-batches, before the slow mean means anything. The means are tensors, so the rule never waits
    for the device; each data-parallel worker follows its own micro-batches.
    """

    FAST_DECAY, SLOW_DECAY, WARMUP = 0.9, 0.97, 30
    FALL_FULL, FALL_ZERO = 0.10, 0.25

    def __init__(self, num_classes: int, rho_max: float, loss_share: float):
        if num_classes < 2:
            raise ValueError(f"rho='auto' needs a classifier with >= 2 classes, got {num_classes}: set rho to a number")
        self.num_classes, self.scale = num_classes, loss_share * math.log(num_classes)
        self.rho_max, self.loss_share = rho_max, loss_share
        self.fast: torch.Tensor | None = None
        self.slow: torch.Tensor | None = None
        self.observed = 0

    def observe(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        if self.fast is None:
            self.fast, self.slow = loss, loss.clone()  # two tensors: a checkpoint saves both
        else:
            self.fast = torch.lerp(self.fast, loss, 1 - self.FAST_DECAY)
            self.slow = torch.lerp(self.slow, loss, 1 - self.SLOW_DECAY)
        self.observed += 1

    @property
    def fall(self) -> torch.Tensor | None:
        """``d``: how far the fast mean of the loss lies below the slow one, relative to the slow one."""
        if self.fast is None:
            return None
        return (self.slow - self.fast) / self.slow.clamp(min=torch.finfo(torch.float32).tiny)

    @property
    def rho(self) -> torch.Tensor | float:
        """The radius for the next step (a 0-dim tensor on the loss's device; 0 during the warm-up)."""
        if self.fast is None or self.observed < self.WARMUP:
            return 0.0
        level = torch.clamp(self.fast / self.scale, max=1.0)
        plateau = torch.clamp((self.FALL_ZERO - self.fall) / (self.FALL_ZERO - self.FALL_FULL), min=0.0, max=1.0)
        return self.rho_max * level * plateau

    def measurement(self, logged: list[float]) -> dict:
        """The rule's settings and the radius it took: the mean of ``logged`` (the radii a run logged), and the
        latest."""
        seen = self.fast is not None
        return {"rule": "rho = rho_auto_max * min(1, L_fast / (rho_auto_loss_share * ln C)) * "
                        "clamp((fall_zero - d) / (fall_zero - fall_full), 0, 1), d = (L_slow - L_fast) / L_slow",
                "rho_auto_max": self.rho_max, "rho_auto_loss_share": self.loss_share,
                "fall_full": self.FALL_FULL, "fall_zero": self.FALL_ZERO, "warmup": self.WARMUP,
                "num_classes": self.num_classes, "mean_rho": sum(logged) / len(logged) if logged else None,
                "last_rho": float(self.rho) if seen else None,
                "last_mean_loss": float(self.fast) if seen else None,
                "last_fall": float(self.fall) if seen else None}

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.fast is None:
            return {}
        return {"rho_auto.fast": self.fast.detach().clone().reshape(1),
                "rho_auto.slow": self.slow.detach().clone().reshape(1),
                "rho_auto.observed": torch.tensor([self.observed], dtype=torch.int64)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores what :meth:`state_dict` saved (and pops its keys from ``tensors``). A file of the earlier rule,
        one running mean, restarts both means from it, past the warm-up."""
        old = tensors.pop("rho_auto.mean_loss", None)
        if "rho_auto.fast" in tensors:
            self.fast = tensors.pop("rho_auto.fast").float().reshape(())
            self.slow = tensors.pop("rho_auto.slow").float().reshape(())
            self.observed = int(tensors.pop("rho_auto.observed").reshape(()))
        elif old is not None:
            self.fast, self.slow = old.float().reshape(()), old.float().reshape(()).clone()
            self.observed = self.WARMUP


def radius_rule_for(model, args) -> LossDrivenRadius | None:
    """The rule of a SAQ run with ``rho="auto"`` on the classifier ``model``; None for a fixed radius or plain QAT."""
    if args.rho != "auto" or args.saq_mode == "qat":
        return None
    classes = getattr(getattr(model, "config", None), "num_labels", None)
    if not isinstance(classes, int) or classes < 2:
        raise ValueError(f"rho='auto' sets the radius from a classifier's loss and needs the model's "
                         f"config.num_labels >= 2 (got {classes!r}): give rho a number")
    return LossDrivenRadius(classes, args.rho_auto_max, args.rho_auto_loss_share)
