"""Learned Step Size Quantization (Esser et al., ICLR 2020) as one fused autograd function and a module."""

import math

import torch
import torch.distributed as dist
from torch import nn


# Clip points tried when initialising a step size, as fractions of max|x| (log-spaced: low bit-widths clip hard).
STEP_SEARCH_FRACTIONS = torch.logspace(-2, 0, 40)


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(Qn, Qp)`` of a ``bits``-bit code."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class _LSQFunction(torch.autograd.Function):
    """``round(clamp(x / s, qn, qp)) * s`` with the LSQ gradients.

    One function instead of a chain of autograd ops: it saves only ``x`` and ``s`` for backward, which keeps
    the activation memory of a fake-quantized model close to the FP model's.
    """

    @staticmethod
    def forward(ctx, x, step_size, qn, qp, grad_scale):
        ctx.save_for_backward(x, step_size)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        # In place after the first op: one temporary instead of three (this is most of QAT's overhead).
        return (x / step_size).clamp_(qn, qp).round_().mul_(step_size)

    @staticmethod
    def backward(ctx, grad_output):
        x, step_size = ctx.saved_tensors
        scaled = x / step_size
        clipped = torch.clamp(scaled, ctx.qn, ctx.qp)
        inside = clipped == scaled
        # STE: identity inside the representable range, zero where clipped.
        grad_x = grad_output * inside
        # d(out)/ds = round(v) - v inside the range, and the clip bound (= round(clamp(v))) outside it;
        # computed in place in the two temporaries.
        grad_s = clipped.round_().sub_(scaled.mul_(inside)).mul_(grad_output)
        if step_size.dim() == 0:
            grad_s = grad_s.sum()
        else:
            dims = [d for d in range(grad_s.dim()) if step_size.shape[d] == 1]
            grad_s = grad_s.sum(dim=dims, keepdim=True)
        return grad_x, (grad_s * ctx.grad_scale).to(step_size.dtype), None, None, None


class LSQQuantizer(nn.Module):
    """Fake-quantizer with a learnable step size.

    Weights use a signed range and, with ``channel_axis`` set, one step size per output channel. Activations
    are per tensor; with ``signed=None`` the range is chosen on the first batch (unsigned when every value is
    non-negative, as after ReLU/softmax). The step size is initialised from data the first time the quantizer
    sees a tensor (the step minimising the quantization MSE); ``initialized`` and ``signed`` are buffers, so a reloaded
    quantizer keeps its learned state and never re-initialises.
    """

    def __init__(self, bits: int, signed: bool | None = True, channel_shape: tuple[int, ...] | None = None,
                 is_activation: bool = False, device=None, dtype=None):
        super().__init__()
        self.is_activation = is_activation
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.bits = bits
        self.auto_signed = signed is None
        shape = channel_shape if channel_shape is not None else ()
        self.step_size = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("signed", torch.tensor(bool(signed) if signed is not None else True, device=device))
        self._calibration_estimates: list[torch.Tensor] | None = None
        # (Qn, Qp) once the buffers say "initialised": reading a buffer as a Python bool is a host sync
        # (on GPU) on every call, which is a large part of fake-quant's overhead. Cleared whenever the
        # buffers may change: initialisation, calibration and state-dict loading.
        self._known_range: tuple[int, int] | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_range = None
        super()._load_from_state_dict(*args, **kwargs)

    def _ready_range(self) -> tuple[int, int] | None:
        """``(Qn, Qp)`` if the quantizer is initialised, else ``None``."""
        if self._known_range is None and bool(self.initialized):
            self._known_range = quant_range(self.bits, bool(self.signed))
        return self._known_range

    @property
    def per_channel(self) -> bool:
        return self.step_size.dim() > 0

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sign = "auto-signed" if self.auto_signed else ("signed" if bool(self.signed) else "unsigned")
        return f"bits={self.bits}, {kind}, {sign}"

    def qrange(self) -> tuple[int, int]:
        return self._ready_range() or quant_range(self.bits, bool(self.signed))

    def _group_dims(self, x: torch.Tensor) -> list[int]:
        return [d for d in range(x.dim()) if not self.per_channel or self.step_size.shape[d] == 1]

    def _estimate_step_size(self, x: torch.Tensor) -> torch.Tensor:
        # LSQ's 2·mean|x|/sqrt(Qp) wastes most of the range at 6-8 bits; the step that minimises the
        # quantization MSE (docs/METHOD.md names both) is good at every bit-width, so search it on a grid.
        qn, qp = self.qrange()
        x = x.detach().float()
        dims = self._group_dims(x)
        max_abs = x.abs().amax(dim=dims, keepdim=self.per_channel).clamp_min(1e-8)
        best_step, best_error = None, None
        for fraction in STEP_SEARCH_FRACTIONS.tolist():
            step = max_abs * (fraction / qp)
            error = (torch.clamp(x / step, qn, qp).round() * step - x).pow(2).mean(dim=dims, keepdim=self.per_channel)
            if best_error is None:
                best_step, best_error = step, error
            else:
                better = error < best_error
                best_step = torch.where(better, step, best_step)
                best_error = torch.where(better, error, best_error)
        return best_step

    def _set_step_size(self, estimate: torch.Tensor) -> None:
        # Every data-parallel worker sees a different first batch; averaging keeps replicas identical.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            estimate = estimate.clone()
            dist.all_reduce(estimate)
            estimate /= dist.get_world_size()
        with torch.no_grad():
            self.step_size.copy_(estimate.reshape(self.step_size.shape))
            self.initialized.fill_(True)
        self._known_range = None

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Set the range and step size from ``x`` and mark the quantizer initialised."""
        if self.auto_signed:
            nonneg = torch.tensor(float(x.min() >= 0), device=x.device)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(nonneg, op=dist.ReduceOp.MIN)
            self.signed.fill_(not bool(nonneg))
            self._known_range = None
        self._set_step_size(self._estimate_step_size(x))

    def start_calibration(self) -> None:
        self._calibration_estimates = []

    def finish_calibration(self) -> None:
        estimates, self._calibration_estimates = self._calibration_estimates, None
        if estimates:
            self._set_step_size(torch.stack(estimates).mean(dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibration_estimates is not None:
            if not self._calibration_estimates and self.auto_signed:
                self.initialize_from(x)
            self._calibration_estimates.append(self._estimate_step_size(x))
            return x
        qrange = self._ready_range()
        if qrange is None:
            self.initialize_from(x)
            qrange = self.qrange()
        qn, qp = qrange
        # LSQ's gradient scale counts the elements sharing one step size: per sample for activations.
        group_numel = x[0].numel() if self.is_activation and x.dim() > 1 else x.numel() // self.step_size.numel()
        grad_scale = 1.0 / math.sqrt(max(group_numel, 1) * qp)
        return _LSQFunction.apply(x, self.step_size.to(x.dtype), qn, qp, grad_scale)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (as int32), exactly those the forward pass multiplies by the step size."""
        qn, qp = self.qrange()
        return torch.clamp(x / self.step_size.to(x.dtype), qn, qp).round().to(torch.int32)
