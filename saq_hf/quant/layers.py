"""Fake-quantized ``nn.Linear`` and ``nn.Conv2d`` that keep the latent FP weight under the name ``weight``."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .lsq import lsq_fake_quantize_many
from .quantizer import LSQQuantizer


class QuantLayerMixin:
    """Weight and input-activation LSQ quantizers plus the two hooks the sharpness step needs.

    - ``weight_perturbation``: a tensor added to the quantized weight in forward (``Q(w) + ε``), ``None``
      otherwise. :func:`perturb_quantized_weights` sets a constant ε; :func:`capture_quantized_weights` a
      probe whose gradient is the gradient w.r.t. ``Q(w)``.

    Both hooks are plain attributes read in forward, so a compiled model sees the same graph whether it
    runs the ascent pass (probe), the descent pass (ε) or plain QAT (``None``), after one compile each.
    """

    weight: nn.Parameter
    weight_quantizer: LSQQuantizer
    input_quantizer: LSQQuantizer | None

    def _init_quantizers(self, w_bits: int, a_bits: int | None, per_channel: bool, device, dtype,
                         step_size_format: str) -> None:
        channel_shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1) if per_channel else None
        self.weight_quantizer = LSQQuantizer(w_bits, signed=True, channel_shape=channel_shape,
                                             device=device, dtype=dtype, step_size_format=step_size_format)
        self.input_quantizer = (
            LSQQuantizer(a_bits, signed=None, is_activation=True, device=device, dtype=dtype,
                         step_size_format=step_size_format) if a_bits else None
        )
        self.weight_perturbation: torch.Tensor | None = None
        # When this layer may drop its ε (eager mode): None (never), "first_use", or "recompute" (the forward that
        # activation checkpointing reruns during backward: the first forward's ε must still be there for it).
        self._perturbation_release: str | None = None
        self._perturbation_released = False
        # ||Q(w)|| as the last captured forward computed it, with the versions of w and its step size then.
        self._record_weight_norm = False
        self._weight_norm_record: tuple | None = None  # (norm, weight, its version, step size, its version)
        # Q(w) computed for this forward pass together with the model's other weights (quantize_weights_together).
        self._pass_quantized_weight: torch.Tensor | None = None

    @property
    def w_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def a_bits(self) -> int | None:
        return self.input_quantizer.bits if self.input_quantizer is not None else None

    def quantized_weight(self) -> torch.Tensor:
        """The differentiable fake-quantized weight ``Q(w)``, exactly as forward uses it (before any ε)."""
        weight = self.__dict__.get("_pass_quantized_weight")
        if weight is not None and not torch.compiler.is_compiling() and not _saved_tensor_hooks_active():
            return weight
        return self.weight_quantizer(self.weight)

    def _take_pass_quantized_weight(self) -> torch.Tensor:
        """``quantized_weight()`` for this layer's forward, which takes ``Q(w)`` out of the pass: from then on only the
        tensors autograd saves hold it, so ``Q(w) + ε`` does not keep a second copy of every weight alive to the end of
        the pass (a second forward of the layer in the same pass quantizes the weight itself, to the same values)."""
        weight = self.quantized_weight()
        self._pass_quantized_weight = None
        return weight

    @torch.no_grad()
    def quantized_weight_norm(self) -> torch.Tensor:
        """``||Q(w)||₂`` now: the value the last captured forward recorded while ``w`` and its step size are unchanged
        since (the same tensors, by identity, at the same in-place version counters), else computed. A quantizer or
        weight swapped in since (e.g. a bit-width search trying another quantizer) is another tensor, whatever its
        version counter says. A fused optimizer step does not bump version counters: a record that an optimizer step
        may outlive must be cleared (``_weight_norm_record = None``)."""
        record = self._weight_norm_record
        if record is not None:
            norm, weight, weight_version, step, step_version = record
            current = self.weight_quantizer.step_size_parameter
            if weight is self.weight and step is current and (weight_version, step_version) == (
                    weight._version, step._version):
                return norm
        return torch.linalg.vector_norm(self.quantized_weight())

    def _forward_weight_and_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self._take_pass_quantized_weight()
        if self._record_weight_norm and not torch.compiler.is_compiling():
            # One reduction here saves recomputing Q(w) for the relative radius (eager only: no side outputs in a graph).
            step = self.weight_quantizer.step_size_parameter
            self._weight_norm_record = (torch.linalg.vector_norm(weight.detach()), self.weight, self.weight._version,
                                        step, step._version)
        if self.weight_perturbation is not None:
            weight = weight + self.weight_perturbation
            # A graph's inputs stay alive while it runs anyway, so compiled code keeps ε to the end of the pass.
            if self._perturbation_release and not torch.compiler.is_compiling() and (
                    self._perturbation_release == "first_use" or _in_backward()):
                self.weight_perturbation = None
                self._perturbation_released = True
        elif self._perturbation_released and not torch.compiler.is_compiling():
            raise RuntimeError(
                "a fake-quantized layer ran its forward again after dropping its SAQ perturbation: the model reuses "
                "the layer within one pass or recomputes it during backward (activation checkpointing that saq-hf "
                "did not detect); enable checkpointing through transformers (gradient_checkpointing=True) or mark "
                "the checkpointed modules with `module.gradient_checkpointing = True`")
        return weight.to(x.dtype), x


class QuantLinear(QuantLayerMixin, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int,
                 a_bits: int | None, per_channel: bool = True, device=None, dtype=None,
                 step_size_format: str = "log"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizers(w_bits, a_bits, per_channel, device, dtype, step_size_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, x = self._forward_weight_and_input(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, w_bits: int,
                 a_bits: int | None, per_channel: bool = True, device=None, dtype=None,
                 step_size_format: str = "log"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self._init_quantizers(w_bits, a_bits, per_channel, device, dtype, step_size_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, x = self._forward_weight_and_input(x)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return self._conv_forward(x, weight, bias)


QUANT_LAYER_TYPES = (QuantLinear, QuantConv2d)


def _in_backward() -> bool:
    """Whether autograd is running a backward pass now: a forward run then is activation checkpointing's recompute."""
    return torch._C._current_graph_task_id() != -1


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are installed: non-reentrant activation checkpointing (``torch.utils.checkpoint``)
    runs a region's forward under them and checks that its recompute saves the same tensors, which a layer reading
    ``Q(w)`` computed outside the region would break (its recompute quantizes the weight itself)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _checkpointed(module: nn.Module) -> bool:
    return getattr(module, "gradient_checkpointing", False) is True or type(module).__name__ == "CheckpointWrapper"


def _layers_outside_checkpointing(model: nn.Module):
    """The quantized layers of ``model`` not inside a module marked as recomputed during backward (such a layer
    quantizes its own weight: a recompute reruns its forward when the pass is over)."""
    stack = [model]
    while stack:
        module = stack.pop()
        if isinstance(module, QuantLayerMixin):
            yield module
        elif module is model or not _checkpointed(module):
            stack.extend(child for child in reversed(module._modules.values()) if child is not None)


def _quantize_weights_of_pass(model: nn.Module, args) -> None:
    """Forward pre-hook: ``Q(w)`` of every quantized layer in ``model`` at once (:func:`lsq_fake_quantize_many`, one
    autograd node per device and dtype), for the layers' forwards of this pass to read. Compiled code and tracers see
    each layer quantize its own weight (a graph fuses that itself)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _checkpointed(model):
        return
    groups: dict[tuple, list] = {}
    for module in _layers_outside_checkpointing(model):
        spec = module.weight_quantizer.multi_tensor_spec(module.weight)
        if spec is not None:
            groups.setdefault((module.weight.device, module.weight.dtype), []).append((module, spec))
    layers = []
    for members in groups.values():
        quantized = lsq_fake_quantize_many([m.weight for m, _ in members],
                                           [m.weight_quantizer.step_size_parameter for m, _ in members],
                                           [spec for _, spec in members])
        for (module, _), weight in zip(members, quantized):
            module._pass_quantized_weight = weight
            layers.append(module)
    model.__dict__["_layers_with_pass_weights"] = layers


def _release_weights_of_pass(model: nn.Module, args, output) -> None:
    """Forward hook (also after an exception): the pass is over; later calls (activation checkpointing's recompute
    during backward, ``quantized_weight()`` between passes) quantize the current weights themselves, to the same bits."""
    for module in model.__dict__.pop("_layers_with_pass_weights", ()):
        module._pass_quantized_weight = None


def quantize_weights_together(model: nn.Module) -> None:
    """From now on each forward call of ``model`` fake-quantizes all its layers' weights at once, before the layers
    run (they do not depend on the batch): a few multi-tensor kernel calls instead of an autograd function and its
    kernel calls per layer, with the same outputs and gradients, bit for bit. ``convert_layers`` sets this up."""
    if model.__dict__.get("_weights_quantized_together"):
        return
    model.register_forward_pre_hook(_quantize_weights_of_pass)
    model.register_forward_hook(_release_weights_of_pass, always_call=True)
    model.__dict__["_weights_quantized_together"] = True


def recomputes_activations(model: nn.Module) -> bool:
    """Whether ``model`` reruns (part of) its forward during backward: transformers' gradient (activation)
    checkpointing marks the modules it checkpoints with ``gradient_checkpointing = True``; torch's
    ``checkpoint_wrapper`` wraps them in a ``CheckpointWrapper``."""
    return any(_checkpointed(module) for module in model.modules())


def quantized_layers(model: nn.Module):
    """``(name, layer)`` for every fake-quantized layer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLayerMixin):
            yield name, module


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in quantized_layers(model))


RELEASES = (None, "first_use", "recompute")


@contextmanager
def perturb_quantized_weights(perturbations: dict[nn.Module, torch.Tensor], release: str | None = None):
    """Add each constant tensor to its layer's quantized weight for the forward passes inside the block.

    For a block that runs one forward pass (and its backward), ``release`` lets each layer drop its ε once no
    forward will read it again, so ε is freed layer by layer (the sum's backward does not need it; the caller
    must not keep other references), in eager mode:

    - ``"first_use"``: after the layer's first forward;
    - ``"recompute"``: after the forward the layer runs during backward (activation checkpointing reruns the
      checkpointed blocks there, and that rerun must add the same ε); layers outside those blocks keep ε until
      the block ends.

    A layer whose forward runs again after it dropped its ε raises, rather than run without it.
    """
    if release not in RELEASES:
        raise ValueError(f"release must be one of {RELEASES}, got {release!r}")
    layers = list(perturbations)
    try:
        for layer in layers:
            layer.weight_perturbation = perturbations[layer].detach()
            layer._perturbation_release, layer._perturbation_released = release, False
        del perturbations
        yield
    finally:
        for layer in layers:
            layer.weight_perturbation = None
            layer._perturbation_release, layer._perturbation_released = None, False


@contextmanager
def capture_quantized_weights(layers):
    """Yield ``{layer: probe}``: tensors added to each layer's quantized weight inside the block, whose
    gradient is the gradient w.r.t. ``Q(w)`` (``∇_δ L(Q(w) + δ) = ∇_{Q(w)} L``).

    A probe carries the layer's current perturbation (zero when none, as a broadcast view: no memory), so
    the forward value is unchanged. Unlike recording the ``Q(w)`` tensor forward built, this also works
    when forward runs in a compiled graph: the probe is an input of that graph, not an intermediate.
    Probes are leaves when they carry an ε, and keep their gradient in ``.grad`` after ``backward()``.
    In eager mode each layer also records ``||Q(w)||`` (:meth:`QuantLayerMixin.quantized_weight_norm`).
    """
    layers = list(layers)
    previous = {layer: layer.weight_perturbation for layer in layers}
    captured: dict[nn.Module, torch.Tensor] = {}
    try:
        for layer in layers:
            layer._record_weight_norm = True
            current = previous[layer]
            if current is None:
                zero = torch.zeros((), dtype=layer.weight.dtype, device=layer.weight.device, requires_grad=True)
                probe = zero.expand_as(layer.weight)
                probe.retain_grad()
            else:
                probe = current.detach().requires_grad_()
            layer.weight_perturbation = captured[layer] = probe
        yield captured
    finally:
        for layer, value in previous.items():
            layer.weight_perturbation = value
            layer._record_weight_norm = False
