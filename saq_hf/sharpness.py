"""The sharpness-aware perturbation of docs/METHOD.md: ascent gradients, ε, apply, restore, for the three cases.

Case table (``w`` latent weight, ``Q(w)`` its fake-quantized value, ``θ`` the other perturbed parameters):

    case   objective             ε is computed from      ε is added
    case1  L(Q(w) + ε(w))        ∇_w L                   after quantization
    case2  L(Q(w + ε(w)))        ∇_w L                   to w, before quantization
    saq    L(Q(w) + ε(Q(w)))     ∇_{Q(w)} L              after quantization   (Case 3, the paper's method)

``ε = ρ · g / ||g||₂`` with one global norm over every perturbed tensor; ``θ`` always gets ``θ + ε_θ``.
With ``adaptive`` (ASAM) the direction is scaled element-wise by the magnitude of the perturbed point:
``ε = ρ · T²g / ||T g||₂`` with ``T = |Q(w)|`` (case 3), ``|w|`` (cases 1, 2) and ``|θ|``.

One step reads like ``sam.py``::

    grads = perturbation.ascent_gradients(compute_loss)   # pass 1, .grad untouched
    eps = perturbation.compute_epsilon(grads)            # None: zero / non-finite norm, step not perturbed
    perturbation.apply(eps)
    compute_loss().backward()                            # pass 2 at the perturbed point
    perturbation.restore()                               # θ and w copied back bit for bit
    optimizer.step()
"""

from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import nn

from .quant import LSQQuantizer, capture_quantized_weights, perturb_quantized_weights, quantized_layers

CASES = ("saq", "case1", "case2")
PERTURB_CHOICES = ("none", "bias_norm", "bias_norm_step_size")


def _is_normalization(module: nn.Module) -> bool:
    # Also catches transformers' own norm classes (ConvNextLayerNorm, *RMSNorm) by name.
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or (
        "norm" in type(module).__name__.lower()
    )


def other_perturbed_parameters(model: nn.Module, perturb: str = "bias_norm") -> list[nn.Parameter]:
    """The trainable parameters perturbed besides the quantized layers' latent weights (``θ`` above).

    Weights outside the quantized layers (layers kept in full precision, position embeddings, class
    tokens, layer scales) are always in: that is what plain SAM perturbs. ``perturb`` adds biases and
    normalization affine parameters (``"bias_norm"``) and the LSQ step sizes (``"bias_norm_step_size"``).
    """
    if perturb not in PERTURB_CHOICES:
        raise ValueError(f"perturb must be one of {PERTURB_CHOICES}, got {perturb!r}")
    quantized_weights = {id(layer.weight) for _, layer in quantized_layers(model)}
    selected, seen = [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen or id(param) in quantized_weights:
                continue
            seen.add(id(param))
            if isinstance(module, LSQQuantizer):
                wanted = perturb == "bias_norm_step_size"
            elif name == "bias" or _is_normalization(module):
                wanted = perturb != "none"
            else:
                wanted = True
            if wanted:
                selected.append(param)
    return selected


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)]))


class SharpnessPerturbation:
    """Builds and applies ε for one model in one of the three cases.

    Tensors are listed in a fixed order: the quantized layers' weights first (``Q(w)`` or ``w`` by case),
    then ``θ``. Gradients and ε are lists in that order; ``None`` marks a tensor the loss did not reach.
    On a model without quantized layers every case is plain SAM (ASAM with ``adaptive``).
    """

    def __init__(self, model: nn.Module, case: str = "saq", rho: float = 0.05, adaptive: bool = False,
                 perturb: str = "bias_norm"):
        if case not in CASES:
            raise ValueError(f"case must be one of {CASES}, got {case!r}")
        self.model = model
        self.case, self.rho, self.adaptive = case, rho, adaptive
        self.layers = [layer for _, layer in quantized_layers(model) if layer.weight.requires_grad]
        self.params = other_perturbed_parameters(model, perturb)
        self.skipped = 0
        self.last_grad_norm: torch.Tensor | None = None
        self._restore = ExitStack()

    def _points(self, captured: dict) -> list[torch.Tensor | None]:
        """The tensors ε is taken with respect to: each ``Q(w)`` the forward used (case 3) or each ``w``."""
        if self.case == "saq":
            weights = [captured.get(layer) for layer in self.layers]
        else:
            weights = [layer.weight for layer in self.layers]
        return weights + list(self.params)

    def _probes(self):
        """Case 3 takes gradients at each ``Q(w)`` through probes added to it; cases 1 and 2 need none."""
        return capture_quantized_weights(self.layers) if self.case == "saq" else nullcontext({})

    def ascent_gradients(self, compute_loss: Callable[[], torch.Tensor]) -> list[torch.Tensor | None]:
        """Pass 1: ``compute_loss()`` runs one forward; returns ∇L at the current point (``.grad`` untouched)."""
        with self._probes() as captured:
            loss = compute_loss()
        points = self._points(captured)
        reached = [i for i, p in enumerate(points) if p is not None]
        found = torch.autograd.grad(loss, [points[i] for i in reached], allow_unused=True)
        grads: list[torch.Tensor | None] = [None] * len(points)
        for i, grad in zip(reached, found):
            grads[i] = grad
        return grads

    @contextmanager
    def recording_gradients(self):
        """Keep the gradients the forward-backward inside the block computes at the ascent points.

        Yields the list (filled once backward has run) that the ``reuse_grad`` strategy turns into the
        next step's ε. Hooks see the gradient of this backward only: what ``.grad`` accumulated before,
        and its data-parallel all-reduce, are left alone.
        """
        grads: list[torch.Tensor | None] = [None] * (len(self.layers) + len(self.params))
        handles = []

        def keep(i):
            def hook(grad):
                grads[i] = grad

            return hook

        # Leaves (w for cases 1 and 2, and θ) are hooked; the gradient at each Q(w) is its probe's .grad.
        for i, point in enumerate(self._points({})):
            if point is not None:
                handles.append(point.register_hook(keep(i)))
        with self._probes() as captured:
            try:
                yield grads
            finally:
                for handle in handles:
                    handle.remove()
                for i, layer in enumerate(self.layers):
                    if layer in captured:
                        grads[i] = captured[layer].grad

    @torch.no_grad()
    def _magnitudes(self, indices: list[int]) -> list[torch.Tensor]:
        n = len(self.layers)
        values = []
        for i in indices:
            if i >= n:
                values.append(self.params[i - n].abs())
            elif self.case == "saq":
                values.append(self.layers[i].quantized_weight().abs())
            else:
                values.append(self.layers[i].weight.abs())
        return values

    @torch.no_grad()
    def compute_epsilon(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
        """``ε = ρ·g/||g||`` (ASAM: ``ρ·T²g/||Tg||``) with one global norm; ``None`` counts a skipped step.

        A zero or non-finite norm (no gradient reached the perturbed tensors, or an fp16 overflow) gives
        no perturbation for this step: the step falls back to the plain QAT update.
        """
        indices = [i for i, g in enumerate(grads) if g is not None]
        present = [grads[i] for i in indices]
        if not present:
            self.last_grad_norm = None
            self.skipped += 1
            return None
        self.last_grad_norm = _global_norm(present)
        if self.adaptive:
            magnitudes = self._magnitudes(indices)
            scaled = torch._foreach_mul(present, magnitudes)
            norm = _global_norm(scaled)
        else:
            scaled, norm = present, self.last_grad_norm
        if not torch.isfinite(norm) or norm == 0:
            self.skipped += 1
            return None
        direction = torch._foreach_mul(scaled, magnitudes) if self.adaptive else scaled
        eps: list[torch.Tensor | None] = [None] * len(grads)
        for i, value in zip(indices, torch._foreach_mul(direction, self.rho / norm)):
            eps[i] = value
        return eps

    @torch.no_grad()
    def apply(self, eps: list[torch.Tensor | None]) -> None:
        """Move to the perturbed point; :meth:`restore` moves back exactly."""
        n = len(self.layers)
        in_place = [(p, e) for p, e in zip(self.params, eps[n:]) if e is not None]
        weight_eps = [(layer, e) for layer, e in zip(self.layers, eps[:n]) if e is not None]
        if self.case == "case2":
            in_place += [(layer.weight, e) for layer, e in weight_eps]
        else:
            self._restore.enter_context(perturb_quantized_weights(dict(weight_eps)))
        if in_place:
            tensors = [p for p, _ in in_place]
            saved = [p.detach().clone() for p in tensors]
            # Copying the saved values back (not subtracting ε) makes the round trip exact in floating point.
            self._restore.callback(torch._foreach_copy_, tensors, saved)
            torch._foreach_add_(tensors, [e for _, e in in_place])

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`apply`: every perturbed tensor holds its value from before, bit for bit."""
        self._restore.close()

    @contextmanager
    def perturbed(self, eps: list[torch.Tensor | None] | None):
        """``apply(eps)`` for the block, ``restore()`` on exit; ``eps=None`` leaves the model as it is."""
        if eps is None:
            yield
            return
        self.apply(eps)
        try:
            yield
        finally:
            self.restore()


@contextmanager
def frozen_running_stats(model: nn.Module):
    """Batch-norm running statistics are restored on exit, so a second pass does not update them twice."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training]
    buffers = [b for m in norms for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)
