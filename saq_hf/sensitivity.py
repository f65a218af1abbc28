"""Per-layer sensitivity at each candidate bit-width, the two measures of :mod:`saq_hf.search`: ``"sharpness"``
(loss under the layer's quantization plus SAQ's ε) and ``"hessian"`` (Hutchinson traces x quantization error)."""

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .landscape import Measurement
from .quant import LSQQuantizer, QuantLayerMixin, capture_quantized_weights, quantized_layers
from .quant.lsq import mse_step_sizes, quant_range
from .sharpness import SharpnessPerturbation

CALIBRATION_VALUES = 1 << 14  # input values per layer the candidates' input step sizes are estimated from


def _weight_quantizers(layer: QuantLayerMixin, candidates: list[int]) -> dict[int, LSQQuantizer]:
    """The layer's weight quantizer at every candidate bit-width, each at the MSE-optimal step size quantize_model
    starts training from (the same grid, every bit-width in one pass)."""
    weight = layer.weight.detach()
    per_channel = layer.weight_quantizer.per_channel
    shape = (weight.shape[0],) + (1,) * (weight.dim() - 1) if per_channel else None
    steps = mse_step_sizes(weight, [quant_range(bits, True) for bits in candidates], per_channel)
    quantizers = {}
    for bits, step in zip(candidates, steps):
        quantizer = LSQQuantizer(bits, signed=True, channel_shape=shape, device=weight.device, dtype=weight.dtype,
                                 step_size_format="linear")
        quantizer.initialize_to(step)
        quantizers[bits] = quantizer.requires_grad_(False)
    return quantizers


def _input_quantizer(layer: QuantLayerMixin, bits: int) -> LSQQuantizer:
    weight = layer.weight
    quantizer = LSQQuantizer(bits, signed=None, is_activation=True, device=weight.device, dtype=weight.dtype,
                             step_size_format="linear")
    return quantizer.requires_grad_(False)


def _calibration_sample(x: torch.Tensor, limit: int = CALIBRATION_VALUES) -> torch.Tensor:
    """At most ``limit`` values of ``x``, evenly strided, with the largest magnitude kept (the step-size grid is
    anchored at it)."""
    flat = x.detach().reshape(-1).float()
    stride = max(1, -(-flat.numel() // limit))
    return torch.cat([flat[::stride], flat[flat.abs().argmax()].reshape(1)])


class _Candidates:
    """Every searched layer's quantizers at every candidate bit-width, weight step sizes from the weights and input
    step sizes from the first batch (one forward; up to :data:`CALIBRATION_VALUES` values per layer), and swapping
    them in one layer at a time. The working model's own 8-bit quantizers get the same estimates as the 8-bit
    candidates."""

    def __init__(self, work: nn.Module, layers: dict[str, QuantLayerMixin], candidates: list[int],
                 activations: bool, batches: list, loss_fn):
        self.layers = layers
        self.weight = {}
        for name, layer in layers.items():
            for bits, quantizer in _weight_quantizers(layer, candidates).items():
                self.weight[(name, bits)] = quantizer
                if bits == layer.w_bits:  # the working model's own quantizer: the same estimate, not a second one
                    layer.weight_quantizer.initialize_to(quantizer.step_size.detach())
        self.input = ({(n, b): _input_quantizer(layer, b) for n, layer in layers.items() for b in candidates}
                      if activations else {})
        self.input_error: dict[tuple[str, int], float] = {}
        self._points: dict[tuple[str, int, bool], tuple] = {}
        if self.input:
            self._calibrate(work, batches, loss_fn, candidates)

    @torch.no_grad()
    def _calibrate(self, work, batches, loss_fn, candidates) -> None:
        def estimate(name):
            def hook(layer, args):
                x = args[0]
                sample = _calibration_sample(x[: -(-CALIBRATION_VALUES // max(x[:1].numel(), 1))])
                signed = bool(sample.min() < 0)
                steps = mse_step_sizes(sample, [quant_range(bits, signed) for bits in candidates], per_channel=False)
                for bits, step in zip(candidates, steps):
                    self.input[(name, bits)].initialize_to(step, signed=signed)
                    if bits == layer.a_bits and layer.input_quantizer is not None:  # the working model's own
                        layer.input_quantizer.initialize_to(step, signed=signed)
            return hook

        handles = [layer.register_forward_pre_hook(estimate(name)) for name, layer in self.layers.items()]
        try:
            loss_fn(work, batches[0])
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def measure_input_errors(self, work, batches, weights, loss_fn, candidates) -> None:
        """``||Q_b(x) - x||²`` of each layer's input, per batch, averaged with the batch weights."""
        errors = {key: 0.0 for key in self.input}

        def measure(name):
            def hook(_module, args):
                x = args[0]
                for bits in candidates:
                    errors[(name, bits)] += share[0] * float((self.input[(name, bits)](x) - x).float().pow(2).sum())
            return hook

        share = [0.0]
        handles = [layer.register_forward_pre_hook(measure(name)) for name, layer in self.layers.items()]
        try:
            for weight, batch in zip(weights, batches):
                share[0] = weight
                loss_fn(work, batch)
        finally:
            for handle in handles:
                handle.remove()
        self.input_error = errors

    def weight_error(self, name: str, bits: int) -> float:
        layer = self.layers[name]
        with torch.no_grad():
            return float((self.weight[(name, bits)](layer.weight) - layer.weight).float().pow(2).sum())

    def swapped(self, name: str, bits: int, mirrored: bool = False):
        """Layer ``name`` at ``bits`` (or its mirror) for the block. The weights do not move while the search
        measures: each (layer, bits, mirror) point's ``Q(w)`` is computed on first use and kept."""
        key = (name, bits, mirrored)
        if key not in self._points:
            layer = self.layers[name]
            weight_quantizer = self.weight[(name, bits)]
            input_quantizer = self.input.get((name, bits), layer.input_quantizer)
            if mirrored:
                weight_quantizer = _mirror(weight_quantizer)
                input_quantizer = _mirror(input_quantizer) if input_quantizer is not None else None
            self._points[key] = (_FixedQuantizer.of(weight_quantizer, layer.weight), input_quantizer)
        return _Swap(self.layers[name], *self._points[key])

    def release(self, name: str) -> None:
        """Drop layer ``name``'s kept points (a copy of its weight per bit-width and mirror)."""
        self._points = {key: point for key, point in self._points.items() if key[0] != name}


def _copy_as(cls: type, quantizer: LSQQuantizer) -> LSQQuantizer:
    """A ``cls`` (an :class:`LSQQuantizer` subclass) with ``quantizer``'s bits, sign, layout and step sizes."""
    step = quantizer.step_size_parameter
    copy_ = cls(quantizer.bits, signed=None if quantizer.auto_signed else bool(quantizer.signed),
                channel_shape=tuple(step.shape) or None, is_activation=quantizer.is_activation, device=step.device,
                dtype=step.dtype, step_size_format=quantizer.step_size_format)
    copy_.load_state_dict(quantizer.state_dict())
    return copy_.requires_grad_(False)


def _mirror(quantizer: LSQQuantizer) -> LSQQuantizer:
    """The same quantizer (bits, sign, step sizes) moving its input the other way."""
    return _copy_as(_MirroredQuantizer, quantizer)


class _MirroredQuantizer(LSQQuantizer):
    """``x - (Q(x) - x)``: a weight (or input) moved by its quantization error the other way. The mean of the losses
    at ``Q(x)`` and here has no term linear in the error, which on a finite batch is noise of either sign (training
    removes it) and can be larger than the curvature term that says what a bit-width costs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x - super().forward(x)

    def multi_tensor_spec(self, x: torch.Tensor):  # never batched with plain LSQ quantizers: its forward differs
        return None


class _FixedQuantizer(LSQQuantizer):
    """A weight's quantizer while the search measures, where that weight does not move: ``Q(w)`` computed once, not
    in every measuring forward."""

    @classmethod
    def of(cls, source: LSQQuantizer, weight: torch.Tensor) -> "_FixedQuantizer":
        fixed = _copy_as(cls, source)
        with torch.no_grad():
            fixed.value = source(weight)
        return fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value

    def multi_tensor_spec(self, x: torch.Tensor):
        return None


@contextlib.contextmanager
def _weights_quantized_once(model: nn.Module):
    layers = [layer for _, layer in quantized_layers(model)]
    originals = [layer.weight_quantizer for layer in layers]
    try:
        for layer, quantizer in zip(layers, originals):
            layer.weight_quantizer = _FixedQuantizer.of(quantizer, layer.weight)
        yield
    finally:
        for layer, quantizer in zip(layers, originals):
            layer.weight_quantizer = quantizer


class _Swap:
    def __init__(self, layer, weight_quantizer, input_quantizer):
        self.layer, self.new = layer, (weight_quantizer, input_quantizer)

    def __enter__(self):
        self.old = (self.layer.weight_quantizer, self.layer.input_quantizer)
        self.layer.weight_quantizer, self.layer.input_quantizer = self.new

    def __exit__(self, *exc):
        self.layer.weight_quantizer, self.layer.input_quantizer = self.old


class _EarlierOutputs:
    """Outputs of the modules that run before each searched layer, recorded in forwards of one batch at the working
    point, for measuring forwards that change that layer alone.

    When only layer ``l`` changes, every module whose forward ended before ``l``'s began computes the same output
    again: :meth:`reused_before` has the outermost such modules (whole blocks, where they return one tensor) return
    their recorded output instead, a copy (the model may change it in place), which saves on average half of each
    measuring forward. Not reused: a module called more than once in a forward, one that returns anything but a
    tensor, or whose output shares memory with its input (an in-place operation or a view); a layer called twice
    reuses nothing. Only the outputs some layer reuses are kept.
    """

    def __init__(self, model: nn.Module, layers: Iterable[nn.Module], compute_loss: Callable[[], torch.Tensor]):
        modules = [m for m in model.modules() if m is not model]
        clock = itertools.count()
        start: dict[nn.Module, int] = {}
        end: dict[nn.Module, int] = {}
        calls: dict[nn.Module, int] = {}
        unusable: set[nn.Module] = set()

        def before(module, _args):
            calls[module] = calls.get(module, 0) + 1
            start.setdefault(module, next(clock))

        def after(module, args, kwargs, output):
            end[module] = next(clock)
            inputs = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            if not torch.is_tensor(output) or any(
                    a.untyped_storage().data_ptr() == output.untyped_storage().data_ptr() for a in inputs):
                unusable.add(module)

        with _hooks(modules, before, after):
            compute_loss()
        reusable = {m for m in modules if calls.get(m) == 1 and m not in unusable}
        self.reuse: dict[nn.Module, list[nn.Module]] = {}
        for layer in layers:
            if calls.get(layer) != 1:
                continue  # not run, or run twice in one forward: nothing before it is safe to skip
            chosen: list[nn.Module] = []
            stack = [model]
            while stack:
                for child in stack.pop().children():
                    if child not in start:
                        stack.append(child)  # a container that is never called (ModuleList): look inside
                    elif start[child] < start[layer]:
                        if child in reusable and end[child] < start[layer]:
                            chosen.append(child)
                        else:
                            stack.append(child)  # an ancestor of the layer, or not reusable: look inside
            self.reuse[layer] = chosen
        needed = {m for chosen in self.reuse.values() for m in chosen}
        self.outputs: dict[nn.Module, torch.Tensor] = {}

        def keep(module, _args, _kwargs, output):
            self.outputs[module] = output.detach().clone()  # the model may change it in place afterwards

        with _hooks(needed, None, keep):
            compute_loss()

    @contextlib.contextmanager
    def reused_before(self, layer: nn.Module):
        earlier = self.reuse.get(layer, [])
        saved = {module: module.__dict__.get("forward") for module in earlier}
        try:
            for module in earlier:
                module.forward = functools.partial(_recorded_output, self.outputs[module])
            yield
        finally:
            for module, forward in saved.items():
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward


@contextlib.contextmanager
def _hooks(modules: Iterable[nn.Module], before, after):
    handles = []
    try:
        for module in modules:
            if before is not None:
                handles.append(module.register_forward_pre_hook(before))
            if after is not None:
                handles.append(module.register_forward_hook(after, with_kwargs=True))
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()


def _recorded_output(output: torch.Tensor, *_args, **_kwargs) -> torch.Tensor:
    return output.clone()


def _sharpness_sensitivity(work, measure: Measurement, cands: _Candidates, candidates, rho: float) -> dict:
    """``{layer: {bits: L(Q_b + ε) - L₀}}``, averaged over ``Q_b`` and its mirror (:class:`_MirroredQuantizer`).

    With the relative radius SAQ's ε for one tensor is ``ρ·||Q(w_l)||·g_l/||g_l||``, whatever the other tensors do:
    each layer alone gets exactly its training ε, built by :class:`SharpnessPerturbation`. Its direction ``g_l`` is
    taken once per batch at the 8-bit point (one backward for all layers and bit-widths) and its length from the
    layer's weight at ``b`` bits, so each (layer, bit-width) costs two forward passes per batch (``Q_b`` and its
    mirror) instead of two ascent-descent steps.
    """
    frozen = [p for p in work.parameters() if p.requires_grad]
    restore = contextlib.ExitStack()
    try:
        restore.enter_context(_weights_quantized_once(work))  # nothing but the swapped-in quantizers moves
        base = measure.loss()
        sharp = {name: {bits: -base for bits in candidates} for name in cands.layers}
        for p in frozen:  # ε moves the searched layers' Q(w) only: θ and the pinned layers stay where they are
            p.requires_grad_(False)
        for layer in cands.layers.values():
            layer.weight.requires_grad_(True)
        perturbation = SharpnessPerturbation(work, case="saq", rho=rho, perturb="none", radius="relative")
        index = {layer: i for i, layer in enumerate(perturbation.layers)}
        per_batch = []
        for batch in measure.batches:
            compute_loss = functools.partial(measure.loss_fn, work, batch)
            per_batch.append((perturbation.ascent_gradients(compute_loss),
                              _EarlierOutputs(work, cands.layers.values(), compute_loss)))
        for name, layer in cands.layers.items():  # layer by layer: one layer's candidate points alive at a time
            for weight, batch, (grads, prefix) in zip(measure.weights, measure.batches, per_batch):
                alone = [grad if i == index[layer] else None for i, grad in enumerate(grads)]
                with prefix.reused_before(layer):
                    for bits in candidates:
                        for mirrored in (False, True):
                            with cands.swapped(name, bits, mirrored), torch.no_grad(), \
                                    perturbation.perturbed(perturbation.compute_epsilon(alone)):
                                sharp[name][bits] += 0.5 * weight * float(measure.loss_fn(work, batch))
            cands.release(name)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        restore.close()
    return {"sharpness": sharp, "base_loss": base}


def hessian_traces(work: nn.Module, measure: Measurement, layers: dict[str, QuantLayerMixin], n_samples: int,
                   seed: int, inputs: bool) -> dict[str, dict[str, float]]:
    """Mean Hessian diagonal ``Tr(H)/n`` of the loss w.r.t. each layer's ``Q(w)`` and (``inputs``) its input,
    by Hutchinson's estimator: ``E[vᵀHv]`` over Rademacher ``v``, ``n_samples`` per batch, one double backward
    each (the Hessian-vector products of :mod:`saq_hf.landscape`, with the inputs as extra points)."""
    generator = torch.Generator().manual_seed(seed)
    names = list(layers)
    totals = {name: {"weight": 0.0, "input": 0.0} for name in names}
    for share, batch in zip(measure.weights, measure.batches):
        probes: dict[str, torch.Tensor] = {}

        def probe(name):
            def hook(_module, args):
                probes[name] = torch.zeros_like(args[0], requires_grad=True)
                return (args[0] + probes[name],) + tuple(args[1:])
            return hook

        handles = [layers[n].register_forward_pre_hook(probe(n)) for n in names] if inputs else []
        try:
            with capture_quantized_weights(layers.values()) as captured:
                loss = measure.loss_fn(work, batch)
        finally:
            for handle in handles:
                handle.remove()
        points = [(n, "weight", captured[layers[n]]) for n in names if layers[n] in captured]
        points += [(n, "input", probes[n]) for n in names if n in probes]
        grads = torch.autograd.grad(loss, [p for _, _, p in points], create_graph=True, allow_unused=True)
        reached = [(point, g) for point, g in zip(points, grads) if g is not None and g.requires_grad]
        for _ in range(n_samples):
            # One product per tensor, v on that tensor alone: vᵀHv is then its own diagonal block (positive
            # semi-definite where the loss is convex in it), without the other blocks' cross terms, whose noise
            # swamps the trace when one v spans every layer.
            for (name, kind, point), g in reached:
                v = torch.randint(0, 2, g.shape, generator=generator).to(g) * 2 - 1
                (hv,) = torch.autograd.grad((g * v).sum(), point, retain_graph=True, allow_unused=True)
                if hv is not None:
                    totals[name][kind] += share * float((v * hv).sum()) / point.numel() / n_samples
    return totals


def _hessian_sensitivity(work, measure, cands: _Candidates, candidates, n_samples: int, seed: int) -> dict:
    traces = hessian_traces(work, measure, cands.layers, n_samples, seed, inputs=bool(cands.input))
    if cands.input:
        cands.measure_input_errors(work, measure.batches, measure.weights, measure.loss_fn, candidates)
    sensitivity = {}
    for name in cands.layers:
        # A negative trace estimate (a saddle, or noise) would reward fewer bits: clamped at 0, as HAWQ assumes PSD.
        weight_diag, input_diag = max(traces[name]["weight"], 0.0), max(traces[name]["input"], 0.0)
        sensitivity[name] = {bits: 0.5 * (weight_diag * cands.weight_error(name, bits)
                                          + input_diag * cands.input_error.get((name, bits), 0.0))
                             for bits in candidates}
    return {"hessian": sensitivity, "hessian_traces": traces}
