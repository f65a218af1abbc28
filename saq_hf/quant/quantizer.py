"""The LSQ fake-quantizer module: a learned step size per tensor or per output channel, around the op of
``lsq.py``."""

import math

import torch
import torch.distributed as dist
from torch import nn

from .lsq import STEP_SEARCH_FRACTIONS, lsq_fake_quantize, quant_range


# How a quantizer keeps its step size s: as log(s) (trained; positive by construction) or as s (exported models,
# checkpoints written before the log form).
STEP_SIZE_FORMATS = ("log", "linear")


class LSQQuantizer(nn.Module):
    """Fake-quantizer with a learnable step size.

    Weights use a signed range and, with ``channel_axis`` set, one step size per output channel. Activations
    are per tensor; with ``signed=None`` the range is chosen on the first batch (unsigned when every value is
    non-negative, as after ReLU/softmax). The step size is initialised from data the first time the quantizer
    sees a tensor (the step minimising the quantization MSE); ``initialized`` and ``signed`` are buffers, so a reloaded
    quantizer keeps its learned state and never re-initialises.

    Once initialised, forward is compile-friendly: no host sync, no branch on tensor values, no buffer write.
    Initialisation and calibration run eagerly, outside any compiled graph.

    The step size is trained as its logarithm (``step_size_format="log"``: the parameter ``log_step_size``,
    ``s = exp(log_step_size)``), so it stays positive whatever the optimizer does and an Adam-type optimizer
    moves it by a share of itself per step, not by the learning rate in absolute terms (which drove small step
    sizes to zero and below). ``"linear"`` keeps ``s`` itself as the parameter ``step_size``: the layout of
    exported models (their step sizes are exactly those the codes were taken with) and of checkpoints written
    before the log form; :meth:`to_log_step_size` converts it for training.
    """

    def __init__(self, bits: int, signed: bool | None = True, channel_shape: tuple[int, ...] | None = None,
                 is_activation: bool = False, device=None, dtype=None, step_size_format: str = "log"):
        super().__init__()
        self.is_activation = is_activation
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {bits}")
        self.bits = bits
        self.auto_signed = signed is None
        shape = channel_shape if channel_shape is not None else ()
        if step_size_format not in STEP_SIZE_FORMATS:
            raise ValueError(f"step_size_format must be one of {STEP_SIZE_FORMATS}, got {step_size_format!r}")
        if step_size_format == "log":
            self.log_step_size = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.step_size = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self.register_buffer("signed", torch.tensor(bool(signed) if signed is not None else True, device=device))
        self._calibration_estimates: list[torch.Tensor] | None = None
        # (Qn, Qp) once the buffers say "initialised": reading a buffer as a Python bool is a host sync
        # (on GPU) and a graph break under torch.compile. Cleared whenever the buffers may change:
        # initialisation, calibration and state-dict loading.
        self._known_range: tuple[int, int] | None = None
        # False while a pass's step-size gradient is replaced anyway (SAQTrainer's descent pass with
        # saq_clean_step_sizes): its per-element terms are then not computed.
        self.step_size_grad = True

    @property
    def step_size(self) -> torch.Tensor:
        """The step size ``s`` (differentiable): ``exp(log_step_size)``, or the ``step_size`` parameter itself."""
        linear = self._parameters.get("step_size")
        if linear is not None:
            return linear
        log = self._parameters.get("log_step_size")
        if log is None:  # while __init__ registers the parameter (hasattr must see no attribute yet)
            raise AttributeError("step_size")
        return log.exp()

    @property
    def step_size_parameter(self) -> nn.Parameter:
        """The trained tensor: ``log_step_size``, or ``step_size`` in the linear layout."""
        return self._parameters.get("log_step_size", self._parameters.get("step_size"))

    @property
    def step_size_format(self) -> str:
        return "log" if "log_step_size" in self._parameters else "linear"

    @torch.no_grad()
    def set_step_size(self, value) -> None:
        """Set ``s`` (a number or a tensor broadcastable to the step size's shape), in either layout."""
        target = self.step_size_parameter
        value = torch.as_tensor(value, dtype=target.dtype, device=target.device).expand_as(target)
        target.copy_(value.log() if self.step_size_format == "log" else value)

    @torch.no_grad()
    def to_log_step_size(self, name: str = "step size") -> None:
        """Convert the linear layout to the log one (``log_step_size = log(s)``); nothing to do in the log layout.

        ``ValueError`` naming ``name`` when a step size is not positive: a log cannot hold it.
        """
        if self.step_size_format == "log":
            return
        linear = self._parameters["step_size"]
        if bool(self.initialized) and not bool((linear > 0).all()):
            bad = linear[linear <= 0].flatten()
            raise ValueError(f"{name} holds {bad.numel()} value(s) <= 0 (e.g. {bad[0].item():.3g}), which training "
                             "in log form cannot continue from: quantize the floating-point model again "
                             "(saq_hf.quantize_model) and train from there")
        log = nn.Parameter(linear.detach().log(), requires_grad=linear.requires_grad)
        del self._parameters["step_size"]
        self.log_step_size = log

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_range = None
        super()._load_from_state_dict(*args, **kwargs)

    def ready(self) -> bool:
        """Whether the quantizer is initialised; reads the buffers (a host sync) only until it is."""
        if self._known_range is None and bool(self.initialized):
            self._known_range = quant_range(self.bits, bool(self.signed))
        return self._known_range is not None

    @property
    def per_channel(self) -> bool:
        return self.step_size_parameter.dim() > 0

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sign = "auto-signed" if self.auto_signed else ("signed" if bool(self.signed) else "unsigned")
        return f"bits={self.bits}, {kind}, {sign}"

    def qrange(self) -> tuple[int, int]:
        return self._known_range or quant_range(self.bits, bool(self.signed))

    def _group_dims(self, x: torch.Tensor) -> list[int]:
        return [d for d in range(x.dim()) if not self.per_channel or self.step_size_parameter.shape[d] == 1]

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

    def check_step_size(self, name: str) -> None:
        """``ValueError`` naming the tensor ``name`` unless an initialised step size is finite and non-zero everywhere
        (a NaN, infinite or zero one makes NaN outputs or zero weights without any error). In the linear layout of
        older checkpoints negative values are accepted: AdamW could move a small step size across zero there, and the
        saved model then still computes exactly what was trained."""
        step = self.step_size.detach()
        valid = torch.isfinite(step) & (step != 0)
        if bool(self.initialized) and not bool(valid.all()):
            bad = step[~valid].flatten()
            raise ValueError(f"step size {name} holds {bad.numel()} invalid value(s) (e.g. {bad[0].item()}): "
                             "step sizes must be finite and non-zero; the checkpoint is corrupt or was edited")

    def _set_step_size(self, estimate: torch.Tensor) -> None:
        if not bool(torch.isfinite(estimate).all()):
            raise ValueError("cannot initialise a step size from NaN or infinite values: the model's input (or a "
                             "layer before this one) holds NaN/inf; check the data and its normalisation")
        # Every data-parallel worker sees a different first batch; averaging keeps replicas identical.
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            estimate = estimate.clone()
            dist.all_reduce(estimate)
            estimate /= dist.get_world_size()
        with torch.no_grad():
            self.set_step_size(estimate.reshape(self.step_size_parameter.shape))
            self.initialized.fill_(True)
        self._known_range = None

    @torch.no_grad()
    def initialize_to(self, step_size: torch.Tensor, signed: bool | None = None) -> None:
        """Mark the quantizer initialised with ``step_size`` (and, for an auto-signed one, ``signed``): a step size
        estimated elsewhere, e.g. for many bit-widths at once by :func:`mse_step_sizes`."""
        if signed is not None:
            if not self.auto_signed and bool(signed) != bool(self.signed):
                raise ValueError(f"this quantizer is {'signed' if bool(self.signed) else 'unsigned'}; "
                                 f"cannot initialise it as {'signed' if signed else 'unsigned'}")
            self.signed.fill_(bool(signed))
            self._known_range = None
        self._set_step_size(step_size)

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

    @torch.compiler.disable
    def _initialize_or_read(self, x: torch.Tensor) -> tuple[int, int]:
        """First call only, always eager: initialise from ``x`` (or read the loaded buffers)."""
        if not self.ready():
            self.initialize_from(x)
            self.ready()
        return self._known_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibration_estimates is not None:
            if not self._calibration_estimates and self.auto_signed:
                self.initialize_from(x)
            self._calibration_estimates.append(self._estimate_step_size(x))
            return x
        qn, qp = self._known_range or self._initialize_or_read(x)
        log = self._parameters.get("log_step_size")
        if log is not None and log.dtype == x.dtype:  # exp inside the op: one autograd node less, the same bits
            return lsq_fake_quantize(x, log, qn, qp, self._grad_scale(x, qp), self.step_size_grad, True)
        return lsq_fake_quantize(x, self.step_size.to(x.dtype), qn, qp, self._grad_scale(x, qp), self.step_size_grad)

    def _grad_scale(self, x: torch.Tensor, qp: int) -> float:
        # LSQ's gradient scale counts the elements sharing one step size: per sample for activations.
        group_numel = (x.numel() // max(x.shape[0], 1) if self.is_activation and x.dim() > 1
                       else x.numel() // self.step_size_parameter.numel())
        return 1.0 / math.sqrt(max(group_numel, 1) * qp)

    def multi_tensor_spec(self, x: torch.Tensor) -> tuple[int, int, float, bool, bool] | None:
        """The ``specs`` entry of :func:`lsq_fake_quantize_many` that computes ``self(x)``, or ``None`` where only
        :meth:`forward` can: before initialisation, while calibrating, with hooks or a replaced forward on this
        module, or a step size of another dtype or device than ``x``."""
        if (self._known_range is None or self._calibration_estimates is not None or "forward" in self.__dict__
                or self._forward_hooks or self._forward_pre_hooks):
            return None
        param = self.step_size_parameter
        if param.dtype != x.dtype or param.device != x.device:
            return None
        qn, qp = self._known_range
        return qn, qp, self._grad_scale(x, qp), self.step_size_grad, self.step_size_format == "log"

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (as int32), exactly those the forward pass multiplies by the step size."""
        qn, qp = self.qrange()
        return torch.clamp(x / self.step_size.to(x.dtype), qn, qp).round().to(torch.int32)
