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

from .quant import (
    LSQQuantizer,
    capture_quantized_weights,
    perturb_quantized_weights,
    quantized_layers,
    recomputes_activations,
)
from .radius import LossDrivenRadius  # noqa: F401  (its earlier home: benchmarks/regimes.py imports it from here)

CASES = ("saq", "case1", "case2")
PERTURB_CHOICES = ("none", "bias_norm", "bias_norm_step_size")
RADII = ("relative", "absolute")


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


def _global_norm(tensors: list[torch.Tensor], norms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``||concat(tensors)||₂`` from the per-tensor norms (``norms``, when already computed)."""
    norms = torch._foreach_norm(tensors) if norms is None else norms
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


class SharpnessPerturbation:
    """Builds and applies ε for one model in one of the three cases.

    Tensors are listed in a fixed order: the quantized layers' weights first (``Q(w)`` or ``w`` by case),
    then ``θ``. Gradients and ε are lists in that order; ``None`` marks a tensor the loss did not reach.
    On a model without quantized layers every case is plain SAM (ASAM with ``adaptive``).
    """

    def __init__(self, model: nn.Module, case: str = "saq", rho: float = 0.05, adaptive: bool = False,
                 perturb: str = "bias_norm", radius: str = "relative"):
        if case not in CASES:
            raise ValueError(f"case must be one of {CASES}, got {case!r}")
        if radius not in RADII:
            raise ValueError(f"radius must be one of {RADII}, got {radius!r}")
        self.model = model
        self.case, self.rho, self.adaptive, self.radius = case, rho, adaptive, radius
        self.layers = [layer for _, layer in quantized_layers(model) if layer.weight.requires_grad]
        self.params = other_perturbed_parameters(model, perturb)
        # Read once (the Trainer enables checkpointing before the first step builds this): a model that starts
        # recomputing later makes a layer raise at its recompute, never run without its ε.
        self.recomputes = recomputes_activations(model)
        self.skipped = 0
        self.last_grad_norm: torch.Tensor | None = None
        self.last_loss: torch.Tensor | None = None
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

    def ascent_gradients(self, compute_loss: Callable[[], torch.Tensor],
                         extra: list[torch.Tensor] | None = None):
        """Pass 1: ``compute_loss()`` runs one forward; returns ∇L at the current point (``.grad`` untouched).

        With ``extra`` (tensors that are not perturbed, e.g. the LSQ step sizes), returns ``(grads,
        extra_grads)``: their gradient at the unperturbed point, from the same backward. The loss is kept as
        ``last_loss`` (detached).

        The probes stay in the layers until the backward has run, so a block that activation checkpointing
        recomputes there sees them too.
        """
        with self._probes() as captured:
            loss = compute_loss()
            self.last_loss = loss.detach()
            points = self._points(captured)
            reached = [i for i, p in enumerate(points) if p is not None]
            targets = [points[i] for i in reached] + list(extra or [])
            found = self._gradients(loss, targets)
        grads: list[torch.Tensor | None] = [None] * len(points)
        for i, grad in zip(reached, found):
            grads[i] = grad
        if extra is None:
            return grads
        return grads, list(found[len(reached):])

    def _gradients(self, loss: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """``∂loss/∂targets`` with every ``.grad`` left as it was.

        ``torch.autograd.grad`` where it can; reentrant activation checkpointing refuses it (its recompute runs
        a backward of its own, which must accumulate into ``.grad``), so a model that recomputes activations gets
        a plain ``backward()`` with every ``.grad`` set aside and put back afterwards. Both give the same values.
        """
        if not self.recomputes:
            return list(torch.autograd.grad(loss, targets, allow_unused=True))
        leaves = list({id(t): t for t in [*self.model.parameters(), *targets] if t.requires_grad}.values())
        kept = [t.grad for t in leaves]
        for tensor in leaves:
            tensor.grad = None
        try:
            loss.backward()
            return [t.grad for t in targets]
        finally:
            for tensor, grad in zip(leaves, kept):
                tensor.grad = grad

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
            # Summed: under reentrant activation checkpointing a tensor's gradient can arrive in parts.
            def hook(grad):
                grads[i] = grad if grads[i] is None else grads[i] + grad

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
                    # The optimizer steps before these gradients become ε, and a fused optimizer (AdamW's default
                    # in transformers) updates w without bumping its version counter: ||Q(w)|| recorded now
                    # would pass for current then.
                    layer._weight_norm_record = None

    @torch.no_grad()
    def _sizes_now(self, indices: list[int]) -> list[torch.Tensor]:
        """``||x||₂`` of each perturbed tensor now (``Q(w)``'s as the ascent forward recorded it, where still valid)."""
        n = len(self.layers)
        if self.case != "saq":
            return torch._foreach_norm(self._points_now(indices))
        params = [self.params[i - n].detach() for i in indices if i >= n]
        param_norms = iter(torch._foreach_norm(params) if params else [])
        return [self.layers[i].quantized_weight_norm() if i < n else next(param_norms) for i in indices]

    @torch.no_grad()
    def _points_now(self, indices: list[int]) -> list[torch.Tensor]:
        """The current value of each perturbed tensor: ``Q(w)`` (case 3), ``w`` (cases 1, 2) or ``θ``."""
        n = len(self.layers)
        values = []
        for i in indices:
            if i >= n:
                values.append(self.params[i - n].detach())
            elif self.case == "saq":
                values.append(self.layers[i].quantized_weight().detach())
            else:
                values.append(self.layers[i].weight.detach())
        return values

    @torch.no_grad()
    def compute_epsilon(self, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None] | None:
        """ε for one step; ``None`` counts a skipped step.

        ``radius="relative"`` (default): every perturbed tensor ``x`` moves by ``ρ·||x||`` along its own
        gradient, ``ε_x = ρ·||x||·g_x/||g_x||`` (ASAM: ``T²g_x/||T g_x||``), so ρ is a fraction of each
        tensor's size and means the same on every model width and bit-width. ``radius="absolute"`` is the
        paper's ``ε = ρ·g/||g||`` (ASAM: ``ρ·T²g/||Tg||``) with one global norm over every perturbed tensor.

        A zero or non-finite gradient norm (no gradient reached the perturbed tensors, or an fp16 overflow)
        gives no perturbation for this step: the step falls back to the plain QAT update.
        """
        indices = [i for i, g in enumerate(grads) if g is not None]
        present = [grads[i] for i in indices]
        if not present:
            self.last_grad_norm = None
            self.skipped += 1
            return None
        grad_norms = torch._foreach_norm(present)
        self.last_grad_norm = _global_norm(present, grad_norms)
        if not torch.isfinite(self.last_grad_norm) or self.last_grad_norm == 0:
            self.skipped += 1
            return None
        points = self._points_now(indices) if self.adaptive else None
        if self.adaptive:
            magnitudes = [p.abs() for p in points]
            scaled = torch._foreach_mul(present, magnitudes)
            direction = torch._foreach_mul(scaled, magnitudes)
        else:
            scaled = direction = present
        if self.radius == "absolute":
            norm = _global_norm(scaled) if self.adaptive else self.last_grad_norm
            if not torch.isfinite(norm) or norm == 0:
                self.skipped += 1
                return None
            values = torch._foreach_mul(direction, self.rho / norm)
        else:
            # A tensor with a zero gradient (or zero value, e.g. a zero-initialised bias) is not moved.
            norms = torch._foreach_norm(scaled) if self.adaptive else grad_norms
            sizes = torch._foreach_norm(points) if self.adaptive else self._sizes_now(indices)
            points = None  # a copy of every Q(w): free it before ε is built (SAQ's peak memory)
            # torch.where, not a Python branch: no host sync per tensor on a GPU. One op over all the norms
            # where they share a dtype (the same values as per tensor, a few ops instead of four per tensor).
            if len({t.dtype for t in [*norms, *sizes]}) == 1:
                norm, size = torch.stack(norms), torch.stack(sizes)
                factors = torch.where(norm > 0, self.rho * size / norm, norm).unbind()
            else:
                factors = [torch.where(n > 0, self.rho * s / n, n) for s, n in zip(sizes, norms)]
            values = torch._foreach_mul(direction, factors)
        eps: list[torch.Tensor | None] = [None] * len(grads)
        for i, value in zip(indices, values):
            eps[i] = value
        return eps

    @torch.no_grad()
    def apply(self, eps: list[torch.Tensor | None]) -> None:
        """Move to the perturbed point; :meth:`restore` moves back exactly.

        ε is for one forward pass (the descent pass): each layer drops its ε once its forward has added it,
        and ``eps`` is consumed (its entries set to ``None``), so an ε is freed as soon as its layer has run
        and SAQ's peak memory stays close to QAT's (the backward does not read a constant summand).
        """
        n = len(self.layers)
        in_place = [(p, e) for p, e in zip(self.params, eps[n:]) if e is not None]
        weight_eps = [(layer, e) for layer, e in zip(self.layers, eps[:n]) if e is not None]
        if self.case == "case2":
            in_place += [(layer.weight, e) for layer, e in weight_eps]
        else:
            perturbations = dict(weight_eps)
            release = "recompute" if self.recomputes else "first_use"
            self._restore.enter_context(perturb_quantized_weights(perturbations, release=release))
            perturbations.clear()  # the context manager keeps its arguments; the layers hold ε now
        if in_place:
            tensors = [p for p, _ in in_place]
            saved = [p.detach().clone() for p in tensors]
            # Copying the saved values back (not subtracting ε) makes the round trip exact in floating point.
            self._restore.callback(torch._foreach_copy_, tensors, saved)
            torch._foreach_add_(tensors, [e for _, e in in_place])
        eps[:] = [None] * len(eps)

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


@contextmanager
def recording(params):
    """The gradient each of ``params`` gets from the backward inside the block (before it is accumulated into
    ``.grad`` or all-reduced), left unchanged."""
    found = [None] * len(params)

    def keep(i):
        # Summed: under reentrant activation checkpointing a tensor's gradient can arrive in parts.
        def hook(grad):
            found[i] = grad if found[i] is None else found[i] + grad

        return hook

    handles = [p.register_hook(keep(i)) for i, p in enumerate(params)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def same_random_draws(device: torch.device):
    """Fork the RNG for the ascent pass, so the descent pass draws the same dropout masks (and the
    random stream stays the one plain QAT would see)."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)
