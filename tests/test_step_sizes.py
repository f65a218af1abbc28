"""LSQ step sizes trained as log(s): positive by construction, their own optimizer group, and checkpoints that store
them linearly (exports, and checkpoints of earlier releases) still load."""

import json
import math

import pytest
import torch
from conftest import ToyImages, tiny_vit
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification

from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, calibrate, quantize_model
from saq_hf.quant import LSQQuantizer, quantized_layers

FAST = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)


def calibrated():
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    calibrate(model, [{"pixel_values": ToyImages(8).pixel_values}])
    return model


def step_sizes(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{part}": getattr(layer, part).step_size.detach().clone() for name, layer in quantized_layers(model)
            for part in ("weight_quantizer", "input_quantizer") if getattr(layer, part) is not None}


def as_earlier_release(folder, negative: bool = False):
    """Rewrite a saved checkpoint as an earlier saq-hf wrote it: ``step_size`` = s, no ``step_size_format`` key."""
    tensors = load_file(folder / "model.safetensors")
    for key in [k for k in tensors if k.endswith("log_step_size")]:
        tensors[key.replace("log_step_size", "step_size")] = tensors.pop(key).exp()
    if negative:  # AdamW could drive a linear step size below zero
        key = next(k for k in sorted(tensors) if k.endswith("weight_quantizer.step_size"))
        tensors[key] = -tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["step_size_format"]
    (folder / "config.json").write_text(json.dumps(config))


def logits(model):
    with torch.no_grad():
        return model.eval()(pixel_values=ToyImages(4, seed=3).pixel_values).logits


def test_step_size_is_the_exponential_of_the_trained_parameter_and_set_step_size_sets_it():
    quantizer = LSQQuantizer(4, signed=True, channel_shape=(3, 1))
    assert quantizer.step_size_format == "log" and [n for n, _ in quantizer.named_parameters()] == ["log_step_size"]
    quantizer.set_step_size(torch.tensor([[0.5], [0.25], [2.0]]))
    torch.testing.assert_close(quantizer.step_size, torch.tensor([[0.5], [0.25], [2.0]]))
    torch.testing.assert_close(quantizer.log_step_size, torch.tensor([[0.5], [0.25], [2.0]]).log())


@pytest.mark.parametrize("step_size_format", ["log", "linear"])
def test_a_gradient_step_cannot_make_a_step_size_non_positive_in_log_form(step_size_format):
    quantizer = LSQQuantizer(2, signed=True, step_size_format=step_size_format)
    quantizer.set_step_size(1e-3)
    quantizer.initialized.fill_(True)
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=10.0)
    x = torch.linspace(-1, 1, 64)
    for _ in range(5):  # large steps that shrink the step size
        optimizer.zero_grad()
        (quantizer(x) - 5 * x).pow(2).sum().neg().backward()
        optimizer.step()
    # The same steps take a linear step size far below zero.
    assert bool((quantizer.step_size > 0).all()) == (step_size_format == "log")


def test_step_sizes_get_their_own_group_without_weight_decay_at_the_scaled_learning_rate(tmp_path):
    model = calibrated()
    trainer = SAQTrainer(model=model, train_dataset=ToyImages(), args=SAQTrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, step_size_lr_scale=10.0, max_steps=1, **FAST))
    optimizer = trainer.create_optimizer()
    logs = {id(q.log_step_size) for q in model.modules() if isinstance(q, LSQQuantizer)}
    groups = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & logs]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == logs
    assert groups[0]["lr"] == pytest.approx(1e-2) and groups[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)
    # With the default scale they stay in the stock no-decay group.
    default = SAQTrainer(model=calibrated(), train_dataset=ToyImages(), args=SAQTrainingArguments(
        output_dir=str(tmp_path / "default"), weight_decay=0.1, max_steps=1, **FAST))
    assert not any(name.endswith("step_size") for name in default.get_decay_parameter_names(default.model))


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_bad_step_size_lr_scale_names_the_field(tmp_path, value):
    with pytest.raises(ValueError, match="step_size_lr_scale must be a finite number > 0"):
        SAQTrainingArguments(output_dir=str(tmp_path), step_size_lr_scale=value)


def test_a_checkpoint_of_the_earlier_linear_format_loads_and_computes_what_it_did(tmp_path):
    model = calibrated()
    expected, steps = logits(model), step_sizes(model)
    model.save_pretrained(tmp_path)
    as_earlier_release(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.quantization_config.step_size_format == "linear"
    assert {q.step_size_format for q in reloaded.modules() if isinstance(q, LSQQuantizer)} == {"linear"}
    # The file holds exp(log s): the very values the trained model computed with.
    assert all(torch.equal(steps[k], v) for k, v in step_sizes(reloaded).items())
    assert torch.equal(logits(reloaded), expected)


def test_training_a_linear_checkpoint_converts_it_to_log_form_and_saves_the_new_format(tmp_path):
    calibrated().save_pretrained(tmp_path / "old")
    as_earlier_release(tmp_path / "old")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "old")
    before = step_sizes(model)
    trainer = SAQTrainer(model=model, train_dataset=ToyImages(), args=SAQTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, saq_start_ratio=0.0, **FAST))
    assert {q.step_size_format for q in model.modules() if isinstance(q, LSQQuantizer)} == {"log"}
    for key, value in step_sizes(model).items():
        torch.testing.assert_close(value, before[key], rtol=1e-6, atol=0)
    trainer.train()
    model.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["quantization_config"]["step_size_format"] == "log"
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "new")
    assert torch.equal(logits(reloaded), logits(model))


def test_a_linear_checkpoint_with_a_negative_step_size_evaluates_but_training_it_is_refused(tmp_path):
    calibrated().save_pretrained(tmp_path)
    as_earlier_release(tmp_path, negative=True)
    model = AutoModelForImageClassification.from_pretrained(tmp_path)  # evaluation: what was trained
    assert torch.isfinite(logits(model)).all()
    with pytest.raises(ValueError, match=r"holds \d+ value\(s\) <= 0 .* quantize the floating-point model again"):
        SAQTrainer(model=model, train_dataset=ToyImages(), args=SAQTrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=1, **FAST))


def test_resuming_from_a_linear_checkpoint_is_refused_naming_what_to_do(tmp_path):
    calibrated().save_pretrained(tmp_path / "checkpoint-2")
    as_earlier_release(tmp_path / "checkpoint-2")
    trainer = SAQTrainer(model=calibrated(), train_dataset=ToyImages(), args=SAQTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, **FAST))
    with pytest.raises(ValueError, match="stores its step sizes linearly .* start a new run from it"):
        trainer._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
