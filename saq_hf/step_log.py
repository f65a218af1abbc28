"""The SAQ entries of ``SAQTrainer``'s training-loss log: sums over the SAQ steps since the last log, kept as tensors
(no device sync per step) and written out as means when the Trainer logs."""

import torch


class StepLog:
    """This process's sums since the last log: ascent gradient and ε norms, unperturbed (ascent) and perturbed
    (descent) losses, and the radii ``rho="auto"`` set."""

    def __init__(self):
        self.sums = self._empty()
        self.rho_sum, self.rho_count = 0.0, 0

    @staticmethod
    def _empty() -> dict:
        return {"grad_norm": 0.0, "eps_norm": 0.0, "count": 0, "ascent_loss": 0.0, "descent_loss": 0.0,
                "loss_count": 0}

    def add_radius(self, rho) -> None:
        self.rho_sum, self.rho_count = self.rho_sum + rho, self.rho_count + 1

    def add_epsilon(self, grad_norm: torch.Tensor, eps: list[torch.Tensor | None]) -> None:
        sums = self.sums
        sums["grad_norm"] = sums["grad_norm"] + grad_norm.detach()
        sums["eps_norm"] = sums["eps_norm"] + torch.linalg.vector_norm(
            torch.stack([n.float() for n in torch._foreach_norm([e for e in eps if e is not None])])
        )
        sums["count"] += 1

    def add_losses(self, ascent: torch.Tensor, descent: torch.Tensor) -> None:
        sums = self.sums
        sums["ascent_loss"] = sums["ascent_loss"] + ascent
        sums["descent_loss"] = sums["descent_loss"] + descent
        sums["loss_count"] += 1

    def mean_radius(self) -> float | None:
        """The mean radius since the last :meth:`pop_radius` (None: no SAQ step set one)."""
        return float(self.rho_sum) / self.rho_count if self.rho_count else None

    def pop_radius(self) -> float | None:
        mean = self.mean_radius()
        self.rho_sum, self.rho_count = 0.0, 0
        return mean

    def write(self, logs: dict) -> tuple[float, float, int] | None:
        """Put the means of the norms and losses into ``logs``; returns the mean ascent and descent loss and the
        number of micro-batches they cover (None: no SAQ step since the last log)."""
        sums, losses = self.sums, None
        if sums["count"]:
            logs["saq_ascent_grad_norm"] = float(sums["grad_norm"]) / sums["count"]
            logs["saq_eps_norm"] = float(sums["eps_norm"]) / sums["count"]
        if sums["loss_count"]:
            ascent = float(sums["ascent_loss"]) / sums["loss_count"]
            descent = float(sums["descent_loss"]) / sums["loss_count"]
            logs["saq_ascent_loss"], logs["saq_descent_loss"] = ascent, descent
            losses = ascent, descent, sums["loss_count"]
        return losses

    def clear(self) -> None:
        """Start the sums of the next log (the radii are popped with :meth:`pop_radius`)."""
        self.sums = self._empty()
