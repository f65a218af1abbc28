"""Sharpness measurements w.r.t. the quantized weights: eigenvalue, loss increases, 1-D curve, report."""

import json

import pytest
import torch
from conftest import ToyImages, tiny_convnext, tiny_vit

from saq_hf import QuantConfig, calibrate, quantize_model
from saq_hf.landscape import (
    filter_normalized_direction,
    loss_curve,
    loss_increase,
    sharpness_report,
    top_hessian_eigenvalue,
)
from saq_hf.quant import QuantLinear, quantized_layers

IN_FEATURES = 6


def quadratic_problem(n=48, seed=0):
    """A weights-only quantized linear layer whose loss ``0.5·mean((Q(w)·x - y)²)`` is an explicit quadratic
    in ``Q(w)``: gradient ``Xᵀ(XQ - y)/n`` and Hessian ``XᵀX/n``, known in closed form."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_FEATURES, generator=generator, dtype=torch.float64)
    x = x * torch.tensor([3.0, 1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64)  # a clear spectral gap
    y = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    layer = QuantLinear(IN_FEATURES, 1, bias=False, w_bits=4, a_bits=None, dtype=torch.float64)
    layer.quantized_weight()  # initialise the step size before measuring
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]
    return layer, batches, x, y


def quadratic_loss(model, batch):
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).mean()


def closed_form(layer, x, y):
    q = layer.quantized_weight().detach().reshape(-1)
    hessian = x.T @ x / len(x)
    gradient = x.T @ (x @ q - y.reshape(-1)) / len(x)
    loss = 0.5 * (x @ q - y.reshape(-1)).pow(2).mean()
    return q, gradient, hessian, float(loss)


def quantized_tiny(arch, bits=4):
    model = {"vit": tiny_vit, "convnext": tiny_convnext}[arch]()
    quantize_model(model, QuantConfig(w_bits=bits, a_bits=bits))
    images = ToyImages(n=24)
    batches = [{"pixel_values": images.pixel_values[i:i + 8], "labels": images.labels[i:i + 8]}
               for i in range(0, 24, 8)]
    calibrate(model, batches)
    return model.train(), batches


def test_top_eigenvalue_of_a_quadratic_loss_matches_the_analytic_hessian():
    layer, batches, x, y = quadratic_problem()
    _, _, hessian, _ = closed_form(layer, x, y)
    expected = float(torch.linalg.eigvalsh(hessian).max())
    measured = top_hessian_eigenvalue(layer, batches, n_iter=200, tol=1e-10, loss_fn=quadratic_loss)
    assert measured == pytest.approx(expected, rel=1e-6)
    assert expected > 5.0  # the 3x-scaled input dominates: ~9 · var(x₀)


def test_adversarial_increase_on_a_quadratic_is_first_plus_second_order_term():
    layer, batches, x, y = quadratic_problem()
    _, gradient, hessian, _ = closed_form(layer, x, y)
    rho = 0.3
    eps = rho * gradient / gradient.norm()
    expected = float(gradient @ eps + 0.5 * eps @ hessian @ eps)
    measured = loss_increase(layer, batches, rho, direction="adversarial", loss_fn=quadratic_loss)
    assert measured == pytest.approx(expected, rel=1e-9)


def test_random_increase_on_a_quadratic_is_bounded_by_the_adversarial_one():
    layer, batches, x, y = quadratic_problem()
    _, gradient, hessian, _ = closed_form(layer, x, y)
    rho = 0.3
    eigenvalues = torch.linalg.eigvalsh(hessian)
    random = loss_increase(layer, batches, rho, direction="random", n_random=8, loss_fn=quadratic_loss)
    adversarial = loss_increase(layer, batches, rho, direction="adversarial", loss_fn=quadratic_loss)
    # Any ||ε|| = ρ gives g·ε + ½εᵀHε within these bounds; the gradient direction maximises the linear term.
    assert -rho * float(gradient.norm()) + 0.5 * rho**2 * float(eigenvalues.min()) <= random
    assert random <= rho * float(gradient.norm()) + 0.5 * rho**2 * float(eigenvalues.max())
    assert adversarial > random


def test_loss_curve_on_a_quadratic_is_the_parabola_along_the_filter_normalised_direction():
    layer, batches, x, y = quadratic_problem()
    q, gradient, hessian, base = closed_form(layer, x, y)
    direction = filter_normalized_direction(layer, seed=3)[layer].reshape(-1)
    assert float(direction.norm()) == pytest.approx(float(q.norm()), rel=1e-9)  # one filter: same norm as Q(w)
    curve = loss_curve(layer, batches, alphas=[-1.0, -0.5, 0.0, 0.25, 1.0], seed=3, loss_fn=quadratic_loss)
    expected = [base + a * float(gradient @ direction) + 0.5 * a**2 * float(direction @ hessian @ direction)
                for a in curve["alphas"]]
    assert curve["losses"] == pytest.approx(expected, rel=1e-9)
    assert curve["losses"][2] == pytest.approx(base, rel=1e-12)


def test_filter_normalised_direction_gives_every_filter_the_norm_of_its_quantized_filter():
    model, _ = quantized_tiny("convnext")
    direction = filter_normalized_direction(model, seed=0)
    for _, layer in quantized_layers(model):
        q = layer.quantized_weight().detach()
        dims = tuple(range(1, q.dim()))
        torch.testing.assert_close(torch.linalg.vector_norm(direction[layer], dim=dims),
                                   torch.linalg.vector_norm(q, dim=dims))


@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_rho_zero_gives_zero_loss_increase(arch):
    model, batches = quantized_tiny(arch)
    assert loss_increase(model, batches, 0.0, direction="adversarial") == 0.0
    assert loss_increase(model, batches, 0.0, direction="random") == 0.0


@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_adversarial_perturbation_raises_the_loss_more_than_random_ones(arch):
    model, batches = quantized_tiny(arch)
    report = sharpness_report(model, batches, rho=0.05, n_iter=5, n_random=4)
    assert report["adversarial_loss_increase"] > 0
    assert report["adversarial_loss_increase"] > report["random_loss_increase"]


@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_measuring_leaves_parameters_gradients_and_modes_unchanged(arch):
    model, batches = quantized_tiny(arch)
    first_layer = next(layer for _, layer in quantized_layers(model))
    first_layer.weight.requires_grad_(False)  # a frozen layer stays frozen
    model.classifier.eval()  # per-module flags come back as they were, not as model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    sharpness_report(model, batches, rho=0.1, n_iter=3, n_random=2)
    loss_curve(model, batches, alphas=[-0.5, 0.5])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert first_layer.weight.requires_grad is False
    assert model.training and not model.classifier.training
    assert all(layer.weight_perturbation is None for _, layer in quantized_layers(model))
    assert torch.equal(torch.get_rng_state(), rng)


def test_top_eigenvalue_of_a_tiny_vit_bounds_the_curvature_along_random_directions():
    from saq_hf.landscape import Measurement, measuring, _norm, _dot, _scaled, _gaussian

    model, batches = quantized_tiny("vit", bits=8)
    eigenvalue = top_hessian_eigenvalue(model, batches, n_iter=50, tol=1e-4)
    measure = Measurement(model, batches, None, None)
    generator = torch.Generator().manual_seed(7)
    with measuring(model):
        for _ in range(3):
            v = _gaussian(measure.layers, generator)
            v = _scaled(v, 1 / _norm(v))
            assert abs(_dot(v, measure.hessian_vector_product(v))) < abs(eigenvalue)
    assert abs(eigenvalue) > 0


def test_sharpness_report_is_plain_json_and_counts_what_it_measured():
    model, batches = quantized_tiny("vit")
    report = sharpness_report(model, batches, rho=0.05, n_iter=4, n_random=2, max_batches=2)
    assert json.loads(json.dumps(report)) == report
    assert report["n_batches"] == 2 and report["n_samples"] == 16
    assert 1 <= report["eigen_iterations"] <= 4
    assert report["rho"] == 0.05 and report["quantized_weight_norm"] > 0
    assert set(report) == {"loss", "top_eigenvalue", "eigen_iterations", "rho", "random_loss_increase",
                           "adversarial_loss_increase", "quantized_weight_norm", "n_batches", "n_samples", "seed"}


def test_a_dataloader_is_read_once_and_measured_like_the_list_of_its_batches():
    model, batches = quantized_tiny("vit")
    loader = torch.utils.data.DataLoader(ToyImages(n=24), batch_size=8)
    from_loader = top_hessian_eigenvalue(model, loader, n_iter=5)
    from_list = top_hessian_eigenvalue(model, batches, n_iter=5)
    assert from_loader == pytest.approx(from_list, rel=1e-5)


def test_unquantized_model_is_rejected_with_a_hint():
    with pytest.raises(ValueError, match="quantize_model"):
        sharpness_report(tiny_vit(), [], rho=0.05)
