"""The perturbation module on its own: ε per case, exact restore, skips, which parameters move."""

import pytest
import torch
from conftest import OneLayerRegression, Regression, tiny_vit, vit_block_names
from torch import nn

from saq_hf import QuantConfig, quantize_model
from saq_hf.quant import quantized_layers
from saq_hf.sharpness import SharpnessPerturbation, frozen_running_stats, other_perturbed_parameters


def one_layer(step_size: float | None = 0.02):
    """A W4 one-layer regression model; a small step size clips most weights (|w/s| > 7)."""
    model = quantize_model(OneLayerRegression(), QuantConfig(w_bits=4, a_bits=None, bits_overrides={}))
    if step_size is not None:
        model.fc.weight_quantizer.set_step_size(step_size)
    return model


def regression_loss(model):
    data = Regression()
    return lambda: model(data.x, data.y)["loss"]


def vit_loss(model):
    generator = torch.Generator().manual_seed(3)
    pixels, labels = torch.randn(4, 3, 16, 16, generator=generator), torch.tensor([0, 1, 2, 3])
    return lambda: model(pixel_values=pixels, labels=labels).loss


def quantized_vit():
    model = quantize_model(tiny_vit())
    vit_loss(model)()  # first forward initialises the activation step sizes
    return model


def hand_ascent_gradients(model):
    """∇L w.r.t. Q(w) and b, and the STE mask, by hand for the one-layer model."""
    layer, data = model.fc, Regression()
    s = layer.weight_quantizer.step_size.detach()
    qn, qp = layer.weight_quantizer.qrange()
    v = layer.weight.detach() / s
    qw = (torch.clamp(v, qn, qp).round() * s).requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    loss = (data.x @ qw.T + b - data.y).pow(2).mean()
    g_qw, g_b = torch.autograd.grad(loss, [qw, b])
    inside = ((v >= qn) & (v <= qp)).float()
    return g_qw, g_b, inside, qw.detach()


@pytest.mark.parametrize("case", ["saq", "case1", "case2"])
def test_apply_then_restore_is_bit_exact(case):
    model = quantized_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = vit_loss(model)
    clean = loss().item()
    sharpness = SharpnessPerturbation(model, case=case, rho=0.5, perturb="bias_norm_step_size", radius="absolute")
    eps = sharpness.compute_epsilon(sharpness.ascent_gradients(loss))
    sharpness.apply(eps)
    with torch.no_grad():
        perturbed = loss().item()
    sharpness.restore()
    assert perturbed > clean + 1e-3  # the ascent direction raises the loss
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.weight_perturbation is None for _, layer in quantized_layers(model))
    assert loss().item() == clean


def test_ascent_gradients_leave_grad_untouched():
    model = quantized_vit()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 0.25)
    sharpness = SharpnessPerturbation(model, case="saq", radius="absolute")
    grads = sharpness.ascent_gradients(vit_loss(model))
    assert sum(g is not None for g in grads) > 20
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in params)


@pytest.mark.parametrize("case", ["saq", "case1", "case2"])
def test_epsilon_is_rho_times_normalised_gradient(case):
    model = one_layer()
    g_qw, g_b, inside, _ = hand_ascent_gradients(model)
    g_w = g_qw if case == "saq" else g_qw * inside  # case 1/2: gradient w.r.t. latent w goes through the STE
    norm = torch.sqrt(g_w.pow(2).sum() + g_b.pow(2).sum())
    sharpness = SharpnessPerturbation(model, case=case, rho=0.3, radius="absolute")
    eps_w, eps_b = sharpness.compute_epsilon(sharpness.ascent_gradients(regression_loss(model)))
    torch.testing.assert_close(eps_w, 0.3 * g_w / norm, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(eps_b, 0.3 * g_b / norm, rtol=1e-6, atol=1e-8)
    assert torch.sqrt(eps_w.pow(2).sum() + eps_b.pow(2).sum()).item() == pytest.approx(0.3, rel=1e-6)


def test_adaptive_epsilon_scales_by_quantized_weight_magnitude():
    model = one_layer()
    g_qw, g_b, _, qw = hand_ascent_gradients(model)
    b = model.fc.bias.detach()
    norm = torch.sqrt((qw.abs() * g_qw).pow(2).sum() + (b.abs() * g_b).pow(2).sum())
    sharpness = SharpnessPerturbation(model, case="saq", rho=0.3, adaptive=True, radius="absolute")
    eps_w, eps_b = sharpness.compute_epsilon(sharpness.ascent_gradients(regression_loss(model)))
    torch.testing.assert_close(eps_w, 0.3 * qw.pow(2) * g_qw / norm, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(eps_b, 0.3 * b.pow(2) * g_b / norm, rtol=1e-6, atol=1e-8)


def test_case1_and_case3_directions_differ_only_where_weights_clip():
    clipped = one_layer(step_size=0.02)
    _, _, inside, _ = hand_ascent_gradients(clipped)
    assert 0 < inside.sum() < inside.numel()
    eps = {}
    for case in ("saq", "case1"):
        sharpness = SharpnessPerturbation(clipped, case=case, rho=0.1, radius="absolute")
        eps[case] = sharpness.compute_epsilon(sharpness.ascent_gradients(regression_loss(clipped)))[0]
    assert (eps["case1"][inside == 0] == 0).all()
    assert (eps["saq"][inside == 0].abs() > 0).all()

    unclipped = one_layer(step_size=1.0)
    assert hand_ascent_gradients(unclipped)[2].all()
    same = [SharpnessPerturbation(unclipped, case=case, rho=0.1, radius="absolute") for case in ("saq", "case1")]
    eps_saq, eps_case1 = (s.compute_epsilon(s.ascent_gradients(regression_loss(unclipped)))[0] for s in same)
    assert torch.equal(eps_saq, eps_case1)


def test_case2_tiny_rho_is_rounded_away():
    model = one_layer(step_size=0.1)
    loss = regression_loss(model)
    clean = loss().item()
    results = {}
    for case in ("case2", "saq"):
        sharpness = SharpnessPerturbation(model, case=case, rho=1e-5, perturb="none", radius="absolute")
        sharpness.apply(sharpness.compute_epsilon(sharpness.ascent_gradients(loss)))
        with torch.no_grad():
            results[case] = loss().item()
        sharpness.restore()
    assert results["case2"] == clean  # Q(w + ε) == Q(w): training falls back to plain QAT
    assert results["saq"] > clean


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_zero_or_non_finite_gradient_skips_and_counts(bad):
    model = one_layer()
    sharpness = SharpnessPerturbation(model, case="saq", radius="absolute")
    grads = sharpness.ascent_gradients(regression_loss(model))
    grads = [torch.full_like(g, bad) if bad == 0.0 else g for g in grads]
    if bad != 0.0:
        grads[0][0, 0] = bad
    assert sharpness.compute_epsilon(grads) is None
    assert sharpness.skipped == 1
    assert sharpness.compute_epsilon(sharpness.ascent_gradients(regression_loss(model))) is not None
    assert sharpness.skipped == 1


@pytest.mark.parametrize("case", ["saq", "case1"])
def test_recorded_descent_gradients_equal_ascent_gradients_at_the_same_point(case):
    model = quantized_vit()
    loss = vit_loss(model)
    sharpness = SharpnessPerturbation(model, case=case, perturb="bias_norm_step_size", radius="absolute")
    expected = sharpness.ascent_gradients(loss)
    model.zero_grad()
    with sharpness.recording_gradients() as recorded:
        loss().backward()
    assert len(recorded) == len(expected)
    for got, want in zip(recorded, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_perturbed_parameter_selection_on_a_quantized_vit():
    model = quantized_vit()
    names = {id(p): n for n, p in model.named_parameters()}
    selected = {mode: {names[id(p)] for p in other_perturbed_parameters(model, mode)}
                for mode in ("none", "bias_norm", "bias_norm_step_size")}
    assert selected["none"] == {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
    block = vit_block_names(model, 0)
    fc1_weights = {vit_block_names(model, b)["fc1"] + ".weight" for b in (0, 1)}
    assert block["query"].split(".attention.")[0] + ".layernorm_before.weight" in selected["bias_norm"]
    assert block["fc1"] + ".bias" in selected["bias_norm"]
    assert not any("step_size" in n or n in fc1_weights for n in selected["bias_norm"])
    step_sizes = {n for n in names.values() if n.endswith("step_size")}
    assert selected["bias_norm_step_size"] == selected["bias_norm"] | step_sizes


def test_model_without_quantized_layers_is_plain_sam_in_every_case():
    model = tiny_vit()
    loss = vit_loss(model)
    eps = []
    for case in ("saq", "case1", "case2"):
        sharpness = SharpnessPerturbation(model, case=case, rho=0.05, radius="absolute")
        assert len(sharpness.params) == sum(1 for p in model.parameters() if p.requires_grad)
        eps.append(sharpness.compute_epsilon(sharpness.ascent_gradients(loss)))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss(), params)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    sam = {id(p): 0.05 * g / norm for p, g in zip(params, grads)}
    for case_eps in eps:
        for p, e in zip(sharpness.params, case_eps):
            torch.testing.assert_close(e, sam[id(p)], rtol=1e-5, atol=1e-9)


def test_frozen_running_stats_restores_batchnorm_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model(torch.randn(2, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_running_stats(model):
        model(torch.randn(2, 3, 8, 8) + 5)
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
