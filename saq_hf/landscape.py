"""How sharp is the loss around a quantized model's weights? Measurements with respect to ``Q(w)``.

SAQ's claim (docs/METHOD.md) is about the loss as a function of the quantized weights ``Q(w)``: it trains for a
minimum where ``L(Q(w) + ε)`` stays low for every ``||ε||₂ ≤ ρ``. This module measures that, on a fixed
list of batches and with the model in eval mode:

- :func:`top_hessian_eigenvalue`: the largest-magnitude eigenvalue of ``∇²_{Q(w)} L``, by power iteration
  on Hessian-vector products (double backward through the loss w.r.t. the ``Q(w)`` tensors the forward used);
- :func:`loss_increase`: ``L(Q(w) + ε) - L(Q(w))`` for ``||ε||₂ = ρ``, ε random or adversarial
  (``ρ · ∇L / ||∇L||``, the SAM / SAQ ascent step);
- :func:`loss_curve`: ``L(Q(w) + α·d)`` along a random filter-normalised direction ``d`` (Li et al., 2018);
- :func:`sharpness_report`: all of it as one JSON-ready dict (what ``saq-hf eval --sharpness`` prints).

Only the quantized layers' weights move (one global L2 norm over all of them, 8-bit layers included);
biases, norms and step sizes stay put. Rounding of activations is crossed with the straight-through
estimator, as in training. Nothing is changed: parameters, ``.grad``, train/eval flags and the random
state are as they were afterwards. Sharpness is not scale-invariant: compare models of one architecture
and bit-width, and read the numbers next to ``quantized_weight_norm``.
"""

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .quant import capture_quantized_weights, perturb_quantized_weights, quantized_layers

LossFn = Callable[[nn.Module, object], torch.Tensor]
Direction = dict[nn.Module, torch.Tensor]


def batch_loss(model: nn.Module, batch) -> torch.Tensor:
    """Default loss of one batch: a dict of model inputs with ``labels`` (the model's own loss, as
    transformers models return it), or an ``(inputs, labels)`` pair (cross-entropy on the logits)."""
    if isinstance(batch, Mapping):
        outputs = model(**batch)
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
        if loss is None:
            raise ValueError("the model returned no loss: pass batches that include 'labels', or a loss_fn")
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
        outputs = model(inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        return F.cross_entropy(logits, labels)
    raise TypeError(
        f"a batch must be a dict of model inputs with 'labels' or an (inputs, labels) pair, got "
        f"{type(batch).__name__}; pass loss_fn=callable(model, batch) for anything else"
    )


def _batch_size(batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return len(first) if hasattr(first, "__len__") else 1


def _to_device(batch, device: torch.device):
    if isinstance(batch, Mapping):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device) if torch.is_tensor(v) else v for v in batch)
    return batch


class Measurement:
    """A model, its quantized layers and a fixed list of batches; the loss is the sample-weighted mean."""

    def __init__(self, model: nn.Module, batches: Iterable, loss_fn: LossFn | None, max_batches: int | None):
        self.model = model
        self.layers = [layer for _, layer in quantized_layers(model)]
        if not self.layers:
            raise ValueError("the model has no quantized layers: quantize it first (saq_hf.quantize_model)")
        device = self.layers[0].weight.device
        self.batches = []
        for batch in batches:
            if max_batches is not None and len(self.batches) >= max_batches:
                break
            self.batches.append(_to_device(batch, device))
        if not self.batches:
            raise ValueError("no batches to measure on: pass a DataLoader or a non-empty list of batches")
        sizes = [_batch_size(b) for b in self.batches]
        self.weights = [size / sum(sizes) for size in sizes]
        self.n_samples = sum(sizes)
        self.loss_fn = loss_fn or batch_loss

    @torch.no_grad()
    def quantized_weights(self) -> Direction:
        return {layer: layer.quantized_weight().detach() for layer in self.layers}

    @torch.no_grad()
    def loss(self, perturbation: Direction | None = None) -> float:
        total = 0.0
        with perturb_quantized_weights(perturbation or {}):
            for weight, batch in zip(self.weights, self.batches):
                total += weight * float(self.loss_fn(self.model, batch))
        return total

    def gradient(self) -> Direction:
        """``∇_{Q(w)} L`` of the mean loss; ``.grad`` untouched."""
        total = {layer: torch.zeros_like(layer.weight) for layer in self.layers}
        for weight, batch in zip(self.weights, self.batches):
            with capture_quantized_weights(self.layers) as captured:
                loss = self.loss_fn(self.model, batch)
            layers = [layer for layer in self.layers if layer in captured]
            grads = torch.autograd.grad(loss, [captured[layer] for layer in layers], allow_unused=True)
            for layer, grad in zip(layers, grads):
                if grad is not None:
                    total[layer] += weight * grad.detach()
        return total

    def hessian_vector_product(self, vector: Direction) -> Direction:
        """``(∇²_{Q(w)} L) v`` of the mean loss, one double backward per batch."""
        total = {layer: torch.zeros_like(layer.weight) for layer in self.layers}
        for weight, batch in zip(self.weights, self.batches):
            with capture_quantized_weights(self.layers) as captured:
                loss = self.loss_fn(self.model, batch)
            layers = [layer for layer in self.layers if layer in captured]
            points = [captured[layer] for layer in layers]
            grads = torch.autograd.grad(loss, points, create_graph=True, allow_unused=True)
            reached = [(layer, p, g) for layer, p, g in zip(layers, points, grads) if g is not None]
            if not reached:
                continue
            directional = sum((g * vector[layer]).sum() for layer, _, g in reached)
            if not directional.requires_grad:  # the loss is linear in Q(w) on this batch
                continue
            products = torch.autograd.grad(directional, [p for _, p, _ in reached], allow_unused=True)
            for (layer, _, _), product in zip(reached, products):
                if product is not None:
                    total[layer] += weight * product.detach()
        return total


def _dot(a: Direction, b: Direction) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def _norm(a: Direction) -> float:
    return _dot(a, a) ** 0.5


def _scaled(a: Direction, factor: float) -> Direction:
    return {k: v * factor for k, v in a.items()}


def _gaussian(layers: list[nn.Module], generator: torch.Generator) -> Direction:
    return {
        layer: torch.randn(layer.weight.shape, generator=generator, dtype=torch.float32).to(
            device=layer.weight.device, dtype=layer.weight.dtype)
        for layer in layers
    }


@contextmanager
def measuring(model: nn.Module, double_backward: bool = True):
    """Eval mode (no dropout, batch-norm statistics frozen), gradients on for every quantized weight (so a
    frozen layer's ``Q(w)`` is still in the graph), with ``double_backward`` the math attention kernel (the fused
    CPU/GPU kernels have no double backward); everything restored on exit, flags module by module."""
    modes = {module: module.training for module in model.modules()}
    flags = {layer.weight: layer.weight.requires_grad for _, layer in quantized_layers(model)}
    try:
        model.eval()
        for weight in flags:
            weight.requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH) if double_backward else nullcontext():
            yield
    finally:
        for module, training in modes.items():
            module.training = training
        for weight, flag in flags.items():
            weight.requires_grad_(flag)


def filter_normalized_direction(model: nn.Module, seed: int = 0) -> Direction:
    """A Gaussian direction in ``Q(w)`` space with each filter (output row / channel) rescaled to the norm of
    the same filter of ``Q(w)`` (Li et al., 2018), so that models with different weight scales are compared
    at comparable relative distances."""
    layers = [layer for _, layer in quantized_layers(model)]
    generator = torch.Generator().manual_seed(seed)
    direction = _gaussian(layers, generator)
    with torch.no_grad():
        for layer in layers:
            q = layer.quantized_weight().detach()
            d = direction[layer]
            dims = tuple(range(1, d.dim()))
            scale = (torch.linalg.vector_norm(q, dim=dims, keepdim=True)
                     / torch.linalg.vector_norm(d, dim=dims, keepdim=True).clamp_min(1e-12))
            direction[layer] = d * scale
    return direction


def _power_iteration(measure: Measurement, n_iter: int, tol: float, seed: int) -> tuple[float, int]:
    generator = torch.Generator().manual_seed(seed)
    vector = _gaussian(measure.layers, generator)
    vector = _scaled(vector, 1.0 / _norm(vector))
    eigenvalue = 0.0
    for iteration in range(1, n_iter + 1):
        product = measure.hessian_vector_product(vector)
        new_eigenvalue = _dot(vector, product)
        norm = _norm(product)
        if norm == 0.0:
            return 0.0, iteration
        vector = _scaled(product, 1.0 / norm)
        if iteration > 1 and abs(new_eigenvalue - eigenvalue) <= tol * max(abs(eigenvalue), 1e-12):
            return new_eigenvalue, iteration
        eigenvalue = new_eigenvalue
    return eigenvalue, n_iter


def top_hessian_eigenvalue(model: nn.Module, batches: Iterable, *, n_iter: int = 20, tol: float = 1e-3,
                           seed: int = 0, max_batches: int | None = None, loss_fn: LossFn | None = None) -> float:
    """Largest-magnitude eigenvalue of the Hessian of the mean loss over ``batches`` w.r.t. every ``Q(w)``.

    Power iteration from a seeded Gaussian vector: at most ``n_iter`` Hessian-vector products, stopping early
    once the estimate changes by less than ``tol`` (relative). A batch is a dict of model inputs with
    ``labels`` or an ``(inputs, labels)`` pair; ``loss_fn(model, batch)`` overrides the loss.
    """
    measure = Measurement(model, batches, loss_fn, max_batches)
    with measuring(model):
        return _power_iteration(measure, n_iter, tol, seed)[0]


def _loss_increases(measure: Measurement, rho: float, n_random: int, seed: int) -> tuple[float, float, float]:
    base = measure.loss()
    if rho == 0:
        return base, 0.0, 0.0
    generator = torch.Generator().manual_seed(seed)
    random_increase = 0.0
    for _ in range(n_random):
        direction = _gaussian(measure.layers, generator)
        random_increase += (measure.loss(_scaled(direction, rho / _norm(direction))) - base) / n_random
    gradient = measure.gradient()
    norm = _norm(gradient)
    adversarial_increase = measure.loss(_scaled(gradient, rho / norm)) - base if norm > 0 else 0.0
    return base, random_increase, adversarial_increase


def loss_increase(model: nn.Module, batches: Iterable, rho: float, *, direction: str = "adversarial",
                  n_random: int = 5, seed: int = 0, max_batches: int | None = None,
                  loss_fn: LossFn | None = None) -> float:
    """``L(Q(w) + ε) - L(Q(w))`` with ``||ε||₂ = rho`` (one norm over all quantized weights).

    ``direction="adversarial"``: ``ε = ρ·∇L/||∇L||``, the SAQ ascent step (0 where the gradient vanishes);
    ``"random"``: the mean over ``n_random`` seeded Gaussian directions.
    """
    if direction not in ("adversarial", "random"):
        raise ValueError(f"direction must be 'adversarial' or 'random', got {direction!r}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}")
    measure = Measurement(model, batches, loss_fn, max_batches)
    with measuring(model):
        _, random_increase, adversarial_increase = _loss_increases(
            measure, rho, n_random if direction == "random" else 0, seed)
    return adversarial_increase if direction == "adversarial" else random_increase


def loss_curve(model: nn.Module, batches: Iterable, *, alphas: Iterable[float] | None = None, seed: int = 0,
               max_batches: int | None = None, loss_fn: LossFn | None = None) -> dict[str, list[float]]:
    """Loss along ``Q(w) + α·d`` with ``d`` from :func:`filter_normalized_direction` (``seed``): α = ±1
    moves every filter by its own norm. Default ``alphas``: 21 points in [-1, 1]."""
    measure = Measurement(model, batches, loss_fn, max_batches)
    alphas = [float(a) for a in alphas] if alphas is not None else [round(-1 + i / 10, 6) for i in range(21)]
    direction = filter_normalized_direction(model, seed)
    with measuring(model):
        losses = [measure.loss(_scaled(direction, alpha)) for alpha in alphas]
    return {"alphas": alphas, "losses": losses}


def sharpness_report(model: nn.Module, batches: Iterable, *, rho: float = 0.05, n_iter: int = 20,
                     tol: float = 1e-3, n_random: int = 5, seed: int = 0, max_batches: int | None = None,
                     loss_fn: LossFn | None = None) -> dict[str, float | int]:
    """Every sharpness number of ``model`` on ``batches`` (a DataLoader or a list, read once), as a flat dict:

    ``loss``, ``top_eigenvalue`` (and ``eigen_iterations`` used of ``n_iter``), ``rho``,
    ``random_loss_increase`` (mean over ``n_random`` directions), ``adversarial_loss_increase``,
    ``quantized_weight_norm`` (the global ``||Q(w)||₂`` that ``rho`` is measured against), ``n_batches``,
    ``n_samples``, ``seed``. Plain floats and ints, ready for JSON or a model card.
    """
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}")
    measure = Measurement(model, batches, loss_fn, max_batches)
    with measuring(model):
        base, random_increase, adversarial_increase = _loss_increases(measure, rho, n_random, seed)
        eigenvalue, iterations = _power_iteration(measure, n_iter, tol, seed)
    return {
        "loss": base,
        "top_eigenvalue": eigenvalue,
        "eigen_iterations": iterations,
        "rho": float(rho),
        "random_loss_increase": random_increase,
        "adversarial_loss_increase": adversarial_increase,
        "quantized_weight_norm": _norm(measure.quantized_weights()),
        "n_batches": len(measure.batches),
        "n_samples": measure.n_samples,
        "seed": seed,
    }
