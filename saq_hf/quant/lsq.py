"""Learned Step Size Quantization (Esser et al., ICLR 2020): the fused fake-quant op (the module around it is
``LSQQuantizer`` in ``quantizer.py``).

The op is written once, as the elementwise arithmetic of LSQ's forward and backward (``_fake_quantize``,
``_fake_quantize_grads``), and reaches fusion three ways:

- eager, float32/float64 on a CPU: the same arithmetic in C++ (``native.py``, ``csrc/lsq_cpu.cpp``), one pass and
  one call per direction at every size, the same bits;
- eager elsewhere (and where the C++ kernels cannot be built): each of the two functions runs as one kernel
  compiled by Inductor (C++ on CPU, Triton on CUDA), one pass over the tensor instead of four (forward) and nine
  (backward), for tensors large enough that this beats the call cost (``_FUSED_MIN_NUMEL``; smaller ones run the
  same code as plain in-place ops, as few of them as give the same bits: there the cost of each call is what
  counts); the step-size gradient is then summed by ``torch.sum`` as before, so outputs and gradients are
  bit-identical to the unfused ops;
- inside ``torch.compile`` (e.g. ``SAQTrainingArguments(torch_compile=True)``) the plain functions are
  traced into the model's graph, where Inductor fuses them with their neighbours.

Where a compiled kernel cannot run (double backward, tracing for ONNX, other devices, no compiler) the
same functions run as plain torch ops.
"""

import types
import warnings

import torch

from . import native


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


def _inside(clipped: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """``(clipped == scaled)`` as 0/1 in the input's dtype: one conversion instead of a bool promotion in each
    product. Eager, the comparison writes the 0/1 straight into a tensor of that dtype: one call instead of two (a
    comparison then a conversion), the same values; traced, the two-op spelling (no ``out=`` in a graph)."""
    if torch.compiler.is_compiling():
        return (clipped == scaled).to(scaled.dtype)
    return torch.eq(clipped, scaled, out=torch.empty_like(scaled))


def _fake_quantize_grads(grad_output: torch.Tensor, x: torch.Tensor, step_size: torch.Tensor, qn: int,
                         qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ's gradient w.r.t. ``x`` and, per element (not yet summed), w.r.t. the step size."""
    scaled = x / step_size
    clipped = torch.clamp(scaled, qn, qp)
    inside = _inside(clipped, scaled)
    # STE: identity inside the representable range, zero where clipped. d(out)/ds = round(v) - v inside
    # the range, and the clip bound (= round(clamp(v))) outside it; computed in place in two temporaries.
    return grad_output * inside, clipped.round_().sub_(scaled.mul_(inside)).mul_(grad_output)


def _fake_quantize_grad_x(grad_output: torch.Tensor, x: torch.Tensor, step_size: torch.Tensor, qn: int,
                          qp: int) -> torch.Tensor:
    """LSQ's gradient w.r.t. ``x`` alone (the first output of ``_fake_quantize_grads``, bit for bit)."""
    scaled = x / step_size
    return grad_output * _inside(torch.clamp(scaled, qn, qp), scaled)


# Below these sizes the fixed cost of calling a compiled kernel (~15-30 µs: dynamo's guards, the wrapper)
# exceeds what fusion saves. Measured on CPU with torch 2.13, 1 thread: the in-place forward is four cheap passes
# (fused wins from ~2^20 elements); the backward's nine (four for x's gradient alone), with the mask written
# straight into x's dtype, cost as much as the fused kernel at ~2^15 (~2^16 for x's gradient alone).
_FUSED_MIN_NUMEL = {"_fake_quantize": 2**20, "_fake_quantize_grads": 2**15, "_fake_quantize_grad_x": 2**16}
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


_NATIVE_DTYPES = (torch.float32, torch.float64)


def _native_layout(step_size: torch.Tensor, x: torch.Tensor, grad: torch.Tensor | None, any_grad_layout: bool) -> bool:
    """Whether the C++ kernels compute this call with the layouts torch ops would give (a sum's order, and so its
    bits, follows its input's memory layout): a step size for the whole tensor, or one per row (dim 0); ``x`` and
    ``grad`` both contiguous or both channels-last (a convolution's input after a permute). With ``any_grad_layout``
    (weights, whose gradient only reaches their leaf) the gradient may be in any layout: it is copied into ``x``'s."""
    if step_size.numel() == 1:
        if not (step_size.dim() == 0 or step_size.dim() == x.dim()):
            return False
    elif not (step_size.dim() == x.dim() > 0 and step_size.shape[0] == x.shape[0] == step_size.numel()):
        return False
    if x.is_contiguous():
        return grad is None or any_grad_layout or grad.is_contiguous()
    return (step_size.numel() == 1 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and (grad is None or any_grad_layout or grad.is_contiguous(memory_format=torch.channels_last)))


def _native_kernels(step_size: torch.Tensor, x: torch.Tensor, grad: torch.Tensor | None = None,
                    any_grad_layout: bool = False):
    """The C++ kernels where they compute this call (eager, CPU, float32/float64, a layout they take), else ``None``."""
    if (x.device.type != "cpu" or x.dtype not in _NATIVE_DTYPES or step_size.dtype != x.dtype
            or step_size.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.jit.is_tracing() or (grad is not None and grad.dtype != x.dtype)
            or not _native_layout(step_size, x, grad, any_grad_layout)):
        return None
    return native.kernels()


def _run(fn, step_size: torch.Tensor, qn: int, qp: int, *tensors: torch.Tensor):
    """``fn(*tensors, step_size, qn, qp)`` as a fused kernel where one can run, else as plain torch ops."""
    x = tensors[-1]
    kernels = _native_kernels(step_size, x, tensors[0] if len(tensors) > 1 else None)
    if kernels is not None:
        if fn is _fake_quantize:
            return kernels.forward(x, step_size, qn, qp)
        grad_x, grad_s = kernels.backward(*tensors, step_size, qn, qp, fn is _fake_quantize_grads)
        return (grad_x, grad_s) if fn is _fake_quantize_grads else grad_x
    # The size first: it decides for the small tensors, where this function's own cost matters.
    if x.numel() < _FUSED_MIN_NUMEL[fn.__name__]:
        return fn(*tensors, step_size, qn, qp)
    per_channel = step_size.dim() > 0
    plain = (torch.compiler.is_compiling() or torch.jit.is_tracing()
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

    With ``log_step`` the step-size argument is ``log(s)`` and the op takes ``s = exp`` of it itself, differentiated
    as ``exp``'s own backward does (``grad * s``): the same bits as ``exp`` before the op, one autograd node less.
    ``s`` is then a constant of the backward, which changes nothing a double backward can reach: x's gradient does
    not depend on ``s`` (almost everywhere), and the step size's gradient is not differentiable on either path
    (its per-element terms are computed in place).
    """

    @staticmethod
    def forward(ctx, x, step_size, qn, qp, grad_scale, step_grad=True, log_step=False):
        ctx.qn, ctx.qp, ctx.grad_scale, ctx.step_grad, ctx.log_step = qn, qp, grad_scale, step_grad, log_step
        kernels = _native_kernels(step_size, x)
        if kernels is not None:  # the whole op in one call (exp included), the same bits
            out, step_size = kernels.op_forward(x, step_size, qn, qp, log_step)
            ctx.save_for_backward(x, step_size)
            return out
        if log_step:
            step_size = step_size.exp()
        ctx.save_for_backward(x, step_size)
        return _run(_fake_quantize, step_size, qn, qp, x)

    @staticmethod
    def backward(ctx, grad_output):
        x, step_size = ctx.saved_tensors
        kernels = _native_kernels(step_size, x, grad_output)
        if kernels is not None:
            grad_x, grad_s = kernels.op_backward(grad_output, x, step_size, ctx.qn, ctx.qp, ctx.grad_scale,
                                                 ctx.step_grad, ctx.log_step)
            return grad_x, grad_s, None, None, None, None, None
        grad_x, grad_s = _lsq_grads(grad_output, x, step_size, ctx.qn, ctx.qp, ctx.grad_scale, ctx.step_grad)
        if ctx.log_step:
            grad_s = grad_s * step_size
        return grad_x, grad_s, None, None, None, None, None


def lsq_fake_quantize(x: torch.Tensor, step_size: torch.Tensor, qn: int, qp: int, grad_scale: float,
                      step_grad: bool = True, log_step: bool = False) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with step size(s) ``step_size`` (broadcastable), range ``[qn, qp]``.

    ``step_grad=False``: the step size's gradient is zero (not computed), ``x``'s is unchanged.
    ``log_step=True``: ``step_size`` holds ``log(s)`` (same dtype as ``x``); outputs and gradients (w.r.t. it) are
    those of ``lsq_fake_quantize(x, step_size.exp(), ...)``, bit for bit.
    """
    return _LSQFakeQuantize.apply(x, step_size, qn, qp, grad_scale, step_grad, log_step)


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
        ctx.specs = specs
        ctx.set_materialize_grads(False)
        if all(_native_kernels(params[i], xs[i]) is not None for i in range(n)):  # one C++ call for all, exp included
            out, steps = native.kernels().op_forward_many(xs, params, [spec[0] for spec in specs],
                                                           [spec[1] for spec in specs], [spec[4] for spec in specs])
            ctx.save_for_backward(*xs, *steps)
            return tuple(out)
        logs = [i for i, spec in enumerate(specs) if spec[4]]
        steps = list(params)
        if logs:
            for i, s in zip(logs, torch._foreach_exp([params[i] for i in logs])):
                steps[i] = s
        ctx.save_for_backward(*xs, *steps)
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
        if all(_native_kernels(steps[i], xs[i], grads[i], any_grad_layout=True) is not None for i in used):
            gx, gs = native.kernels().op_backward_many(
                [grads[i] for i in used], [xs[i] for i in used], [steps[i] for i in used],
                *([specs[i][k] for i in used] for k in (0, 1, 2, 3, 4)))
            for i, a, b in zip(used, gx, gs):
                grad_x[i], grad_s[i] = a, b
            return (None, *grad_x, *grad_s)
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

