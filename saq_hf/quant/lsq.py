"""Learned Step Size Quantization (Esser et al., ICLR 2020): one fused fake-quant op and a module.

The op is written once, as the elementwise arithmetic of LSQ's forward and backward (``_fake_quantize``,
``_fake_quantize_grads``), and reaches fusion two ways:

- eager: each of the two functions runs as one kernel compiled by Inductor (C++ on CPU, Triton on CUDA),
  one pass over the tensor instead of four (forward) and nine (backward), for tensors large enough that
  this beats the call cost (``_FUSED_MIN_NUMEL``; smaller ones run the same code as plain in-place ops);
  the step-size gradient is then summed by ``torch.sum`` as before, so outputs and gradients are
  bit-identical to the unfused ops;
- inside ``torch.compile`` (e.g. ``SAQTrainingArguments(torch_compile=True)``) the plain functions are
  traced into the model's graph, where Inductor fuses them with their neighbours.

Where a compiled kernel cannot run (double backward, tracing for ONNX, other devices, no compiler) the
same functions run as plain torch ops.
"""

import math
import types
import warnings

import torch
import torch.distributed as dist
from torch import nn


# How a quantizer keeps its step size s: as log(s) (trained; positive by construction) or as s (exported models,
# checkpoints written before the log form).
STEP_SIZE_FORMATS = ("log", "linear")

# Clip points tried when initialising a step size, as fractions of max|x| (log-spaced: low bit-widths clip hard).
STEP_SEARCH_FRACTIONS = torch.logspace(-2, 0, 40)


@torch.no_grad()
def mse_step_sizes(x: torch.Tensor, ranges: list[tuple[int, int]], per_channel: bool,
                   max_elements: int = 1 << 24) -> list[torch.Tensor]:
    """For each integer range ``(Qn, Qp)`` of ``ranges``: the step size of ``x`` (one per output channel, dim 0, with
    ``per_channel``; else one) that minimises the quantization MSE on the grid :class:`LSQQuantizer` initialises
    from (``max|x| · f / Qp``, ``f`` in :data:`STEP_SEARCH_FRACTIONS`, the first minimum). Several bit-widths and
    the whole grid in a few broadcast ops (at most ``max_elements`` at a time) instead of a loop per grid point;
    shaped ``(C,)`` or ``()``. Sums may round differently from the loop's in the last bit."""
    x = x.detach().float()
    rows = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    max_abs = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)  # (C, 1)
    fractions = STEP_SEARCH_FRACTIONS.to(x.device)
    chunk = max(1, max_elements // rows.numel())
    steps = []
    for qn, qp in ranges:
        grid = max_abs[None] * (fractions / qp)[:, None, None]  # (F, C, 1)
        errors = torch.cat([(torch.clamp(rows / g, qn, qp).round() * g - rows).pow(2).mean(dim=2)
                            for g in grid.split(chunk)])  # (F, C)
        best = grid[errors.argmin(dim=0), torch.arange(rows.shape[0], device=x.device), 0]
        steps.append(best if per_channel else best[0])
    return steps


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(Qn, Qp)`` of a ``bits``-bit code."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _fake_quantize(x: torch.Tensor, step_size: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """``round(clamp(x / s, qn, qp)) * s``."""
    if torch.compiler.is_compiling():
        # Out of place while traced: this is the forward of an autograd.Function, which must not return a tensor
        # an in-place op modified. torch 2.11's dynamo returns the pre-in-place intermediates as extra forward
        # outputs and the gradient lands in one of those, so x and the step size get zero gradients
        # (pytorch/pytorch#180642, fixed in 2.12). Functionalised, both spellings are the same graph, so the
        # fused kernels (compiled from this function) are unchanged.
        return torch.round(torch.clamp(x / step_size, qn, qp)) * step_size
    # Eager, in place after the first op: fresh large buffers cost page faults on CPU.
    return (x / step_size).clamp_(qn, qp).round_().mul_(step_size)


def _fake_quantize_grads(grad_output: torch.Tensor, x: torch.Tensor, step_size: torch.Tensor, qn: int,
                         qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ's gradient w.r.t. ``x`` and, per element (not yet summed), w.r.t. the step size."""
    scaled = x / step_size
    clipped = torch.clamp(scaled, qn, qp)
    inside = (clipped == scaled).to(x.dtype)  # one conversion instead of a bool promotion in each product
    # STE: identity inside the representable range, zero where clipped. d(out)/ds = round(v) - v inside
    # the range, and the clip bound (= round(clamp(v))) outside it; computed in place in two temporaries.
    return grad_output * inside, clipped.round_().sub_(scaled.mul_(inside)).mul_(grad_output)


def _fake_quantize_grad_x(grad_output: torch.Tensor, x: torch.Tensor, step_size: torch.Tensor, qn: int,
                          qp: int) -> torch.Tensor:
    """LSQ's gradient w.r.t. ``x`` alone (the first output of ``_fake_quantize_grads``, bit for bit)."""
    scaled = x / step_size
    return grad_output * (torch.clamp(scaled, qn, qp) == scaled).to(x.dtype)


# Below these sizes the fixed cost of calling a compiled kernel (~30 µs: dynamo's guards, the wrapper)
# exceeds what fusion saves. Measured on CPU with torch 2.13: the in-place forward is four cheap passes
# (fused wins from ~2^20 elements), the backward's nine (five for x's gradient alone) are not (from ~2^14).
_FUSED_MIN_NUMEL = {"_fake_quantize": 2**20, "_fake_quantize_grads": 2**14, "_fake_quantize_grad_x": 2**14}
_compiled_kernels: dict[tuple, object] = {}


def _eager_numerics_options() -> dict:
    """Inductor options under which the kernels compute what the eager ops do, bit for bit: every intermediate
    rounded to the input dtype (bf16/fp16), and fp32 division correctly rounded (Triton's ``/`` is approximate)."""
    from torch._inductor import config

    options = {"emulate_precision_casts": True} if hasattr(config, "emulate_precision_casts") else {}  # torch >= 2.5
    if hasattr(config, "eager_numerics"):  # torch >= 2.12
        options["eager_numerics.division_rounding"] = True
    elif hasattr(config, "emulate_divison_rounding"):  # the older spelling (torch 2.10, 2.11)
        options["emulate_divison_rounding"] = True
    return options


_EAGER_NUMERICS = _eager_numerics_options()
_compiler_failed: list[str] = []
# Inductor's C++ backend keeps bf16/fp16 intermediates in fp32 before torch 2.13 (emulate_precision_casts has no
# effect there: on 2.11 and 2.12 most of tests/test_fused_quant.py's bf16 cases differ from the plain ops), so
# reduced-precision tensors on a CPU run as plain ops on those releases.
_CPU_REDUCED_PRECISION_FUSES = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


def _compiled(fn, x: torch.Tensor, per_channel: bool, qn: int):
    """``fn`` compiled for the dtype, device and layout of its inputs (compiled once, any shape); ``None`` where
    a compiled kernel would not compute what the plain ops do, bit for bit."""
    key = (fn.__name__, x.dtype, x.device.type, per_channel, qn == 0)
    kernel = _compiled_kernels.get(key, False)
    if kernel is False:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not _CPU_REDUCED_PRECISION_FUSES:
            _compiled_kernels[key] = None
            return None
        # Dynamo keeps one cache per code object, capped at 8 graphs; a copy of the code per key keeps
        # every (dtype, layout) within that cap whatever mix of models a process runs.
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{'_'.join(map(str, key[1:]))}")
        copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        kernel = torch.compile(copy, dynamic=True, options=_EAGER_NUMERICS)
        _compiled_kernels[key] = kernel
    return kernel


def _run(fn, step_size: torch.Tensor, qn: int, qp: int, *tensors: torch.Tensor):
    """``fn(*tensors, step_size, qn, qp)`` as a fused kernel where one can run, else as plain torch ops."""
    x = tensors[-1]
    per_channel = step_size.dim() > 0
    # The size first: it decides for the small tensors, where this function's own cost matters.
    plain = (x.numel() < _FUSED_MIN_NUMEL[fn.__name__] or torch.compiler.is_compiling() or torch.jit.is_tracing()
             or torch.is_grad_enabled() or _compiler_failed or x.device.type not in ("cpu", "cuda")
             or not all(t.is_contiguous() for t in tensors)
             or (per_channel and (x.dim() == 0 or step_size.numel() != x.shape[0])))
    if plain:
        return fn(*tensors, step_size, qn, qp)
    # The kernels see 1-D (per tensor) or (channels, rest) (per channel) aliases: one compiled graph serves
    # every shape, where N-d inputs would need one per rank and per size-1 dimension. Fresh tensors on the same
    # storage, not views: dynamo guards on a view's base (its rank and strides) and on requires_grad, which
    # recompiled each kernel up to twice in a first training step.
    rows = x.shape[0] if per_channel else 1
    shape, strides = ((rows, x.numel() // rows), (x.numel() // rows, 1)) if per_channel else ((x.numel(),), (1,))
    flat = [t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape, strides) for t in tensors]
    flat_step = step_size.view(rows, 1) if per_channel else step_size
    try:
        kernel = _compiled(fn, x, per_channel, qn)
        out = None if kernel is None else kernel(*flat, flat_step, qn, qp)
    except Exception as error:  # noqa: BLE001 - any compiler failure (no C++ compiler, no Triton) falls back
        _compiler_failed.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"saq_hf: fused LSQ kernels unavailable, using unfused torch ops ({_compiler_failed[0][:300]})",
                      stacklevel=3)
        out = None
    if out is None:
        return fn(*tensors, step_size, qn, qp)
    return out.view(x.shape) if isinstance(out, torch.Tensor) else tuple(o.view(x.shape) for o in out)


def _lsq_grads(grad_output: torch.Tensor, x: torch.Tensor, step_size: torch.Tensor, qn: int, qp: int,
               grad_scale: float, step_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSQ op's gradients w.r.t. ``x`` and its step size (zeros without computing them for ``step_grad=False``)."""
    if not step_grad:
        return _run(_fake_quantize_grad_x, step_size, qn, qp, grad_output, x), torch.zeros_like(step_size)
    grad_x, grad_s = _run(_fake_quantize_grads, step_size, qn, qp, grad_output, x)
    if step_size.dim() == 0:
        grad_s = grad_s.sum()
    else:
        dims = [d for d in range(grad_s.dim()) if step_size.shape[d] == 1]
        grad_s = grad_s.sum(dim=dims, keepdim=True)
    return grad_x, (grad_s * grad_scale).to(step_size.dtype)


class _LSQFakeQuantize(torch.autograd.Function):
    """``round(clamp(x / s, qn, qp)) * s`` with the LSQ gradients, as one fused op.

    It saves only ``x`` and ``s`` for backward, which keeps the activation memory of a fake-quantized model
    close to the FP model's. With ``step_grad=False`` the step size gets a zero gradient without computing its
    per-element terms (for a pass whose step-size gradient is replaced anyway: SAQ's descent pass).
    """

    @staticmethod
    def forward(ctx, x, step_size, qn, qp, grad_scale, step_grad=True):
        ctx.save_for_backward(x, step_size)
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.step_grad = qn, qp, grad_scale, step_grad
        return _run(_fake_quantize, step_size, qn, qp, x)

    @staticmethod
    def backward(ctx, grad_output):
        x, step_size = ctx.saved_tensors
        grad_x, grad_s = _lsq_grads(grad_output, x, step_size, ctx.qn, ctx.qp, ctx.grad_scale, ctx.step_grad)
        return grad_x, grad_s, None, None, None, None


def lsq_fake_quantize(x: torch.Tensor, step_size: torch.Tensor, qn: int, qp: int, grad_scale: float,
                      step_grad: bool = True) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with step size(s) ``step_size`` (broadcastable), range ``[qn, qp]``.

    ``step_grad=False``: the step size's gradient is zero (not computed), ``x``'s is unchanged.
    """
    return _LSQFakeQuantize.apply(x, step_size, qn, qp, grad_scale, step_grad)


# Many tensors at once (a model's weights, which do not depend on the batch): the same arithmetic as the op above,
# one torch._foreach_* call per elementwise step for all of them instead of a Python-level autograd function and
# its few kernel calls per tensor. On a CPU, tensors that large that a fused kernel beats the plain passes
# (``_FUSED_MIN_NUMEL``) still get their fused kernel, one call each; on CUDA the host's per-call cost dominates
# every weight of ViT-B/16 (benchmarks/profile_step.py), so all of them take the multi-tensor ops.
def _one_at_a_time(fn_name: str, x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() >= _FUSED_MIN_NUMEL[fn_name]


def _foreach_fake_quantize(xs, steps, qns, qps):
    """``[(x / s).clamp_(qn, qp).round_().mul_(s)]`` (the eager forward above) for every tensor of ``xs``."""
    out = torch._foreach_div(xs, steps)
    torch._foreach_clamp_min_(out, qns)
    torch._foreach_clamp_max_(out, qps)
    torch._foreach_round_(out)
    torch._foreach_mul_(out, steps)
    return out


def _foreach_fake_quantize_grads(grads, xs, steps, qns, qps, step_grad: bool):
    """``_fake_quantize_grads`` (``_fake_quantize_grad_x`` for ``step_grad=False``) for every tensor, bit for bit."""
    scaled = torch._foreach_div(xs, steps)
    clipped = torch._foreach_clamp_min(scaled, qns)
    torch._foreach_clamp_max_(clipped, qps)
    # (clipped == scaled) as 0/1 in x's dtype; there is no multi-tensor comparison: 1 - sign(|clipped - scaled|), which
    # gives the same +0.0 and 1.0 (a - b == 0 exactly when a == b, denormals included).
    inside = torch._foreach_sub(clipped, scaled)
    torch._foreach_abs_(inside)
    torch._foreach_sign_(inside)
    torch._foreach_neg_(inside)
    torch._foreach_add_(inside, 1)
    grad_x = torch._foreach_mul(grads, inside)
    if not step_grad:
        return grad_x, None
    torch._foreach_round_(clipped)
    torch._foreach_mul_(scaled, inside)
    torch._foreach_sub_(clipped, scaled)
    torch._foreach_mul_(clipped, grads)
    return grad_x, clipped


class _LSQFakeQuantizeMany(torch.autograd.Function):
    """``_LSQFakeQuantize`` over many tensors in one autograd node, bit for bit: ``apply(specs, *xs, *step_params)``
    with one ``(qn, qp, grad_scale, step_grad, log_step)`` per tensor, where ``log_step`` says the step-size parameter
    holds ``log(s)`` (``s = exp`` of it, differentiated as ``exp``'s own backward does: ``grad * s``).

    Outputs nobody used get no gradient (``None``), and neither do their inputs."""

    @staticmethod
    def forward(ctx, specs, *tensors):
        n = len(specs)
        xs, params = list(tensors[:n]), list(tensors[n:])
        logs = [i for i, spec in enumerate(specs) if spec[4]]
        steps = list(params)
        if logs:
            for i, s in zip(logs, torch._foreach_exp([params[i] for i in logs])):
                steps[i] = s
        ctx.save_for_backward(*xs, *steps)
        ctx.specs = specs
        ctx.set_materialize_grads(False)
        out: list = [None] * n
        together = []
        for i in range(n):
            if _one_at_a_time("_fake_quantize", xs[i]):
                out[i] = _run(_fake_quantize, steps[i], specs[i][0], specs[i][1], xs[i])
            else:
                together.append(i)
        if together:
            results = _foreach_fake_quantize([xs[i] for i in together], [steps[i] for i in together],
                                             [specs[i][0] for i in together], [specs[i][1] for i in together])
            for i, q in zip(together, results):
                out[i] = q
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        specs, n = ctx.specs, len(ctx.specs)
        saved = ctx.saved_tensors
        xs, steps = saved[:n], saved[n:]
        grad_x: list = [None] * n
        grad_s: list = [None] * n
        used = [i for i in range(n) if grads[i] is not None]
        # Double backward (create_graph) needs differentiable ops: the single-tensor path's plain ones.
        single = torch.is_grad_enabled()
        for step_grad in (True, False):
            kernel = "_fake_quantize_grads" if step_grad else "_fake_quantize_grad_x"
            together = []
            for i in used:
                if specs[i][3] != step_grad:
                    continue
                if single or _one_at_a_time(kernel, xs[i]):
                    qn, qp, grad_scale = specs[i][:3]
                    grad_x[i], grad_s[i] = _lsq_grads(grads[i], xs[i], steps[i], qn, qp, grad_scale, step_grad)
                else:
                    together.append(i)
            if not together:
                continue
            gx, per_element = _foreach_fake_quantize_grads(
                [grads[i] for i in together], [xs[i] for i in together], [steps[i] for i in together],
                [specs[i][0] for i in together], [specs[i][1] for i in together], step_grad)
            if step_grad:
                sums = []
                for i, g in zip(together, per_element):
                    if steps[i].dim() == 0:
                        sums.append(g.sum())
                    else:
                        sums.append(g.sum(dim=[d for d in range(g.dim()) if steps[i].shape[d] == 1], keepdim=True))
                gs = torch._foreach_mul(sums, [specs[i][2] for i in together])
            else:
                gs = [torch.zeros_like(steps[i]) for i in together]
            for i, a, b in zip(together, gx, gs):
                grad_x[i], grad_s[i] = a, b
        logs = [i for i in used if specs[i][4]]
        if logs:
            for i, g in zip(logs, torch._foreach_mul([grad_s[i] for i in logs], [steps[i] for i in logs])):
                grad_s[i] = g
        return (None, *grad_x, *grad_s)


def lsq_fake_quantize_many(xs: list[torch.Tensor], step_params: list[torch.Tensor],
                           specs: list[tuple[int, int, float, bool, bool]]) -> tuple[torch.Tensor, ...]:
    """``lsq_fake_quantize`` of each ``xs[i]`` (the step size ``exp(step_params[i])`` when ``specs[i][4]``, else
    ``step_params[i]``; same dtype and device as ``xs[i]``) in one autograd node: outputs and gradients are those of
    the single-tensor op, bit for bit. ``specs[i] = (qn, qp, grad_scale, step_grad, log_step)``."""
    if not xs:
        return ()
    return _LSQFakeQuantizeMany.apply(tuple(specs), *xs, *step_params)


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
