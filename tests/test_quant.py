"""Core: LSQ quantizers, quantized layers, QuantConfig, quantize_model and reload through transformers."""

import math
import os
import re

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
)

import saq_hf
from conftest import tiny_convnext, tiny_vit, vit_block_names
from saq_hf import QuantConfig, calibrate, quantize_model, quantized_layer_bits
from saq_hf.quant import (
    LSQQuantizer,
    QuantConv2d,
    QuantLinear,
    capture_quantized_weights,
    perturb_quantized_weights,
    quantized_layers,
)


MODELS = {"vit": tiny_vit, "convnext": tiny_convnext}


def pixels(seed=1, batch=4):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def float_layers(model):
    return {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@pytest.mark.parametrize("arch", MODELS)
def test_every_linear_and_conv_is_converted_with_architecture_defaults(arch):
    model = MODELS[arch]()
    expected = float_layers(model)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    bits = quantized_layer_bits(model)
    assert set(bits) == expected
    assert all(isinstance(model.get_submodule(n), (QuantLinear, QuantConv2d)) for n in expected)
    # The paper's setting: patch embedding and classifier at 8 bits, everything else at the requested width.
    eight_bit = {n for n, b in bits.items() if b == (8, 8)}
    assert eight_bit == {n for n in expected if "patch_embeddings" in n or n == "classifier"}
    assert all(b == (4, 4) for n, b in bits.items() if n not in eight_bit)


@pytest.mark.parametrize("arch", MODELS)
def test_modules_to_not_convert_stay_in_float(arch):
    model = MODELS[arch]()
    quantize_model(model, QuantConfig(modules_to_not_convert=["classifier", "*patch_embeddings*"]))
    assert type(model.classifier) is nn.Linear
    assert not any("patch_embeddings" in n for n in quantized_layer_bits(model))
    assert len(quantized_layer_bits(model)) == len(float_layers(model)) - 2


def test_grouped_depthwise_conv_keeps_its_geometry():
    model = tiny_convnext()
    dwconv = model.convnext.encoder.stages[0].layers[0].dwconv
    quantize_model(model)
    q = model.convnext.encoder.stages[0].layers[0].dwconv
    assert isinstance(q, QuantConv2d)
    assert (q.groups, q.kernel_size, q.padding) == (dwconv.groups, dwconv.kernel_size, dwconv.padding)
    assert q.weight is dwconv.weight  # the latent weight is the same Parameter, under the same name


@pytest.mark.parametrize("arch", MODELS)
def test_w8a8_logits_stay_within_3_percent_of_float(arch):
    model = MODELS[arch]()
    x = pixels()
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        quantize_model(model, QuantConfig(w_bits=8, a_bits=8))
        quantized = model(pixel_values=x).logits
    relative = (quantized - reference).norm() / reference.norm()
    assert relative < 0.03, f"W8A8 relative logit error {relative:.4f}"


@pytest.mark.parametrize("per_channel", [True, False])
def test_2bit_weights_take_at_most_four_values_per_group(per_channel):
    model = tiny_vit()
    quantize_model(model, QuantConfig(w_bits=2, a_bits=None, per_channel=per_channel, bits_overrides={}))
    for _, layer in quantized_layers(model):
        qw = layer.quantized_weight().detach()
        groups = qw.flatten(1) if per_channel else qw.reshape(1, -1)
        assert max(len(torch.unique(g)) for g in groups) <= 4
        codes = layer.weight_quantizer.codes(layer.weight)
        assert codes.min() >= -2 and codes.max() <= 1
        assert torch.equal(codes.float() * layer.weight_quantizer.step_size.detach(), qw)


def test_lsq_gradients_match_the_paper_formulas():
    # The op's formulas, on s itself (the linear layout; the log layout only chains d/dlog(s) = s·d/ds).
    quantizer = LSQQuantizer(bits=3, signed=True, step_size_format="linear")  # Qn = -4, Qp = 3
    quantizer.set_step_size(0.5)
    quantizer.initialized.fill_(True)
    x = torch.tensor([-3.0, -1.1, 0.2, 0.74, 1.6, 2.5], requires_grad=True)
    out = quantizer(x)
    assert torch.equal(out.detach(), torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.5, 1.5]))
    out.sum().backward()
    # STE: gradient 1 inside [Qn·s, Qp·s] = [-2, 1.5], zero where clipped.
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))
    v = x.detach() / 0.5
    inside = (v >= -4) & (v <= 3)
    ds = torch.where(inside, v.round() - v, v.clamp(-4, 3))
    expected = ds.sum() / math.sqrt(x.numel() * 3)  # gradient scale 1/sqrt(numel·Qp)
    assert quantizer.step_size.grad.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_reach_latent_weights_and_all_step_sizes():
    model = tiny_vit()
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4))
    model.train()
    model(pixel_values=pixels(), labels=torch.tensor([0, 1, 2, 3])).loss.backward()
    for name, layer in quantized_layers(model):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
        assert layer.weight_quantizer.step_size_parameter.grad.abs().sum() > 0, name
        assert layer.input_quantizer.step_size_parameter.grad is not None, name


def test_activation_range_is_unsigned_for_non_negative_inputs():
    quantizer = LSQQuantizer(bits=4, signed=None, is_activation=True)
    quantizer(torch.rand(8, 10))
    assert not bool(quantizer.signed) and quantizer.qrange() == (0, 15)
    signed = LSQQuantizer(bits=4, signed=None, is_activation=True)
    signed(torch.randn(8, 10))
    assert bool(signed.signed) and signed.qrange() == (-8, 7)


def perturb_step_sizes(model):
    """Move every step size off its initial value, as training would."""
    with torch.no_grad():
        for _, layer in quantized_layers(model):
            layer.weight_quantizer.set_step_size(layer.weight_quantizer.step_size * 1.1)
            if layer.input_quantizer is not None:
                layer.input_quantizer.set_step_size(layer.input_quantizer.step_size * 0.9)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("w_bits,a_bits", [(2, 4), (4, 4)])
def test_save_and_from_pretrained_give_bit_identical_logits(tmp_path, arch, w_bits, a_bits):
    model = MODELS[arch]()
    quantize_model(model, QuantConfig(w_bits=w_bits, a_bits=a_bits))
    x = pixels()
    model(pixel_values=pixels(seed=7))  # first batch initialises the activation step sizes
    perturb_step_sizes(model)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert quantized_layer_bits(reloaded) == quantized_layer_bits(model)
    assert reloaded.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
    original_state = model.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original_state[key]), key
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=x).logits, expected)
        # A reloaded quantizer is initialised: a very different batch must not reset its step size.
        steps = [l.input_quantizer.step_size.clone() for _, l in quantized_layers(reloaded)]
        reloaded(pixel_values=100 * pixels(seed=3))
        assert all(torch.equal(s, l.input_quantizer.step_size) for s, (_, l) in zip(steps, quantized_layers(reloaded)))


@pytest.mark.parametrize("arch", MODELS)
def test_quantize_on_load_from_a_float_checkpoint(tmp_path, arch):
    fp = MODELS[arch]()
    fp.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, quantization_config=QuantConfig(w_bits=3, a_bits=None))
    bits = quantized_layer_bits(loaded)
    assert set(bits) == float_layers(fp)
    assert {b for n, b in bits.items() if n != "classifier" and "patch_embeddings" not in n} == {(3, None)}
    # Step sizes come from the real weights (not the meta-device placeholder of 1.0).
    for name, layer in quantized_layers(loaded):
        assert torch.equal(layer.weight, fp.get_submodule(name).weight)
        assert not torch.all(layer.weight_quantizer.step_size == 1.0), name
        assert bool(layer.weight_quantizer.initialized)
    assert loaded.config.quantization_config.w_bits == 3


def test_per_module_bit_overrides_are_honoured():
    model = tiny_vit()
    first, second = vit_block_names(model, 0), vit_block_names(model, 1)
    config = QuantConfig(w_bits=4, a_bits=4, bits_overrides={
        "*." + ".".join(first["fc1"].split(".")[-2:]): 2,  # "*.mlp.fc1": every block's
        second["attention"] + ".*": {"w_bits": 6},
        "classifier": {"w_bits": 8, "a_bits": None},
    })
    quantize_model(model, config)
    bits = quantized_layer_bits(model)
    assert bits[first["fc1"]] == bits[second["fc1"]] == (2, 2)
    assert bits[second["query"]] == (6, 4)
    assert bits[first["query"]] == (4, 4)
    assert bits["classifier"] == (8, None) and model.classifier.input_quantizer is None
    assert bits["vit.embeddings.patch_embeddings.projection"] == (4, 4)  # explicit overrides replace defaults


def test_generic_module_keeps_first_and_last_layer_at_8_bits():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10), nn.ReLU(),
                          nn.Linear(10, 3))
    quantize_model(model, QuantConfig(w_bits=2, a_bits=2))
    assert quantized_layer_bits(model) == {"0": (8, 8), "3": (2, 2), "5": (8, 8)}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("kwargs,field", [
    ({"w_bits": 1}, "w_bits"),
    ({"w_bits": 9}, "w_bits"),
    ({"w_bits": 4.0}, "w_bits"),
    ({"a_bits": 16}, "a_bits"),
    ({"per_channel": "yes"}, "per_channel"),
    ({"modules_to_not_convert": "classifier"}, "modules_to_not_convert"),
    ({"bits_overrides": {"fc1": 1}}, "bits_overrides['fc1'].w_bits"),
    ({"bits_overrides": {"fc1": {"bits": 4}}}, "bits_overrides['fc1']"),
    ({"bits_overrides": ["fc1"]}, "bits_overrides"),
])
def test_invalid_config_values_raise_an_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        QuantConfig(**kwargs)


def test_unknown_field_error_names_it():
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=4)


def test_config_round_trips_through_dict():
    config = QuantConfig(w_bits=3, a_bits=None, per_channel=False, modules_to_not_convert=["classifier"],
                         bits_overrides={"*fc1": 8})
    assert QuantConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    assert config.tag == "W3" and QuantConfig().tag == "W4A4"


def test_quantizing_twice_is_refused():
    model = quantize_model(tiny_vit())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)


def test_calibrate_initialises_activation_steps_from_all_batches():
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}
    assert calibrate(model, [{"pixel_values": pixels(seed=s)} for s in range(3)]) == 3
    for name, layer in quantized_layers(model):
        assert bool(layer.input_quantizer.initialized), name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [])


def test_perturbation_is_added_after_quantization_and_removed_after_the_block():
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=None))
    layer = model.get_submodule(vit_block_names(model, 0)["fc1"])
    x = torch.randn(2, 32)
    base = layer(x)
    eps = torch.full_like(layer.weight, 0.01)
    with perturb_quantized_weights({layer: eps}):
        perturbed = layer(x)
    expected = nn.functional.linear(x, layer.quantized_weight() + eps, layer.bias)
    assert torch.allclose(perturbed, expected, atol=1e-6)
    assert torch.equal(layer(x), base)
    with capture_quantized_weights([layer]) as captured:
        out = layer(x).sum()
    (grad,) = torch.autograd.grad(out, [captured[layer]])
    assert torch.allclose(grad, x.sum(0).expand_as(grad))
    assert layer.weight.grad is None


@pytest.mark.parametrize("source", ["quantize_model", "from_pretrained"])
def test_trainer_accepts_the_quantized_model_for_qat(tmp_path, source):
    model = quantize_model(tiny_vit())
    if source == "from_pretrained":
        model(pixel_values=pixels())
        model.save_pretrained(tmp_path / "q")
        model = AutoModelForImageClassification.from_pretrained(tmp_path / "q")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    assert trainer.model is model and model.is_quantized
    assert model.hf_quantizer.is_qat_trainable
    assert saq_hf.SAQHfQuantizer.__name__ == type(model.hf_quantizer).__name__
