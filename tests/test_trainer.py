"""SAQTrainer end to end on tiny models: equivalences, docs/METHOD.md's formulas by hand, Trainer integration."""

import pytest
import torch
from conftest import OneLayerRegression, Regression, ToyImages, tiny_convnext, tiny_vit
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model
from saq_hf.radius import LossDrivenRadius
from saq_hf.sharpness import SharpnessPerturbation

FAST = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)


# The paper's step exactly (docs/METHOD.md's formulas): absolute radius, step sizes trained at the perturbed point,
# SAQ from the first step (these tiny random models start untrained, which would otherwise defer SAQ).
PAPER = dict(rho=0.05, saq_radius="absolute", saq_clean_step_sizes=False, saq_start_ratio=0.0)


def saq_args(tmp_path, **overrides) -> SAQTrainingArguments:
    values = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "max_steps": 2, **FAST, **PAPER,
              **overrides}
    return SAQTrainingArguments(**values)


def train(model, tmp_path, dataset=None, trainer_cls=SAQTrainer, args=None, **overrides):
    args = args if args is not None else saq_args(tmp_path, **overrides)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset if dataset is not None else ToyImages())
    trainer.train()
    return trainer


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def max_difference(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def quantized(factory, seed=0):
    return quantize_model(factory(seed))


# --- equivalences -------------------------------------------------------------------------------------

def test_qat_mode_is_the_stock_trainer(tmp_path):
    # The step sizes' own optimizer group at the stock learning rate, and no weight decay anywhere: the stock step.
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, weight_decay=0.0, **FAST)
    stock = train(quantized(tiny_vit), tmp_path, trainer_cls=Trainer,
                  args=TrainingArguments(output_dir=str(tmp_path / "stock"), **common))
    qat = train(quantized(tiny_vit), tmp_path, args=SAQTrainingArguments(
        output_dir=str(tmp_path / "qat"), saq_mode="qat", step_size_lr_scale=1.0, **common))
    assert_same(params(stock.model), params(qat.model))
    assert [h["loss"] for h in stock.state.log_history[:-1]] == [h["loss"] for h in qat.state.log_history[:-1]]


# ViT takes num_items_in_batch (loss normalised by the Trainer's count), ConvNeXt does not (loss divided by
# the accumulation steps): rho=0 must reproduce QAT under both rules.
@pytest.mark.parametrize("factory, mode", [(tiny_vit, "saq"), (tiny_vit, "case1"), (tiny_vit, "case2"),
                                           (tiny_convnext, "saq")])
def test_rho_zero_gives_the_qat_parameters(tmp_path, factory, mode):
    common = dict(gradient_accumulation_steps=2, max_steps=2)
    qat = train(quantized(factory), tmp_path / "qat", saq_mode="qat", **common)
    zero = train(quantized(factory), tmp_path / mode, saq_mode=mode, rho=0.0, **common)
    assert_same(params(qat.model), params(zero.model))


def test_case1_and_case3_differ_only_when_weights_clip(tmp_path):
    def run(mode, step_size):
        model = quantize_model(OneLayerRegression(), QuantConfig(w_bits=4, a_bits=None, bits_overrides={}))
        model.fc.weight_quantizer.set_step_size(step_size)
        return params(train(model, tmp_path / mode, Regression(), saq_mode=mode, rho=0.3, max_steps=3,
                            per_device_train_batch_size=8, optim="sgd", learning_rate=0.1).model)

    assert max_difference(run("case1", 0.02), run("saq", 0.02)) > 1e-3  # most |w/s| > 7: clipped
    assert_same(run("case1", 1.0), run("saq", 1.0))  # nothing clipped: ∇_w L == ∇_{Q(w)} L


# --- one SGD step against docs/METHOD.md by hand ----------------------------------------------------------------

def hand_sgd_step(model, mode: str, rho: float, lr: float, adaptive: bool):
    """docs/METHOD.md's step for ``y = Q(w) x + b`` computed with plain torch (LSQ and STE written out)."""
    layer, data = model.fc, Regression()
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    is_quantized = hasattr(layer, "weight_quantizer")
    if is_quantized:
        s = layer.weight_quantizer.step_size.detach().clone()
        qn, qp = layer.weight_quantizer.qrange()
        grad_scale = 1.0 / (w.shape[1] * qp) ** 0.5  # LSQ: 1/sqrt(elements per step size · Qp)

    def quantize(latent):
        return torch.clamp(latent / s, qn, qp).round() * s if is_quantized else latent

    def inside(latent):
        return ((latent / s >= qn) & (latent / s <= qp)).float() if is_quantized else torch.ones_like(latent)

    def gradients(qw, bias):
        qw, bias = qw.clone().requires_grad_(), bias.clone().requires_grad_()
        loss = (data.x @ qw.T + bias - data.y).pow(2).mean()
        return torch.autograd.grad(loss, [qw, bias])

    eps_w, eps_b = torch.zeros_like(w), torch.zeros_like(b)
    if mode != "qat":
        g_qw, g_b = gradients(quantize(w), b)
        g_w = g_qw if mode == "saq" else g_qw * inside(w)  # case 1/2: gradient w.r.t. latent w, via the STE
        t_w = (quantize(w) if mode == "saq" else w).abs() if adaptive else torch.ones_like(w)
        t_b = b.abs() if adaptive else torch.ones_like(b)
        norm = torch.sqrt((t_w * g_w).pow(2).sum() + (t_b * g_b).pow(2).sum())
        eps_w, eps_b = rho * t_w**2 * g_w / norm, rho * t_b**2 * g_b / norm
    point = w + eps_w if mode == "case2" else w  # case 2 perturbs before quantization
    qw = quantize(point) if mode == "case2" else quantize(w) + eps_w
    g_qw, g_b = gradients(qw, b + eps_b)
    new = {"fc.weight": w - lr * g_qw * inside(point), "fc.bias": b - lr * g_b}
    if is_quantized:
        v = point / s
        clipped = torch.clamp(v, qn, qp)
        ds = torch.where(inside(point).bool(), clipped.round() - v, clipped)
        # The trained parameter is log(s): its gradient is s times the gradient w.r.t. s.
        grad_s = (g_qw * ds).sum(dim=1, keepdim=True) * grad_scale
        new["fc.weight_quantizer.log_step_size"] = s.log() - lr * s * grad_s
    return new


@pytest.mark.parametrize("mode, adaptive, quantize, tuple_output", [
    ("qat", False, True, False),
    ("saq", False, True, False),
    ("case1", False, True, False),
    ("case2", False, True, True),
    ("saq", True, True, False),
    ("case1", True, True, False),
    ("saq", False, False, True),  # no quantized layer: plain SAM
])
def test_one_sgd_step_matches_method_formulas(tmp_path, mode, adaptive, quantize, tuple_output):
    model = OneLayerRegression(tuple_output=tuple_output)
    if quantize:
        quantize_model(model, QuantConfig(w_bits=4, a_bits=None, bits_overrides={}))
        model.fc.weight_quantizer.set_step_size(0.05)  # some weights clip, most do not
    before = params(model)
    expected = hand_sgd_step(model, mode, rho=0.3, lr=0.1, adaptive=adaptive)
    train(model, tmp_path, Regression(), saq_mode=mode, rho=0.3, saq_adaptive=adaptive, optim="sgd",
          learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, max_steps=1,
          per_device_train_batch_size=8, step_size_lr_scale=1.0)
    got = params(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max_difference(got, before) > 1e-3  # it did move


# --- one training_step in isolation --------------------------------------------------------------------------

def step_trainer(tmp_path, model, **overrides) -> SAQTrainer:
    trainer = SAQTrainer(model=model, args=saq_args(tmp_path, **overrides), train_dataset=ToyImages())
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; read by the loss scaling
    return trainer


def image_batch(start: int) -> dict:
    data = ToyImages()
    return {"pixel_values": data.pixel_values[start:start + 4], "labels": data.labels[start:start + 4]}


@pytest.mark.parametrize("mode", ["saq", "case1", "case2"])
def test_training_step_leaves_parameters_and_state_exactly_as_before(tmp_path, mode):
    model = quantized(tiny_vit)
    model(**image_batch(0))  # initialise the activation step sizes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = step_trainer(tmp_path, model, saq_mode=mode, rho=0.5, saq_perturb="bias_norm_step_size")
    trainer.training_step(model, image_batch(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_accumulation_keeps_earlier_micro_batch_gradients(tmp_path):
    model = quantized(tiny_vit)
    model(**image_batch(0))
    trainer = step_trainer(tmp_path, model, saq_mode="saq", rho=0.5)

    def grads_after(*starts):
        model.zero_grad()
        for start in starts:
            trainer.training_step(model, image_batch(start))
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    first, second, both = grads_after(0), grads_after(4), grads_after(0, 4)
    for name in both:
        torch.testing.assert_close(both[name], first[name] + second[name], rtol=1e-5, atol=1e-7)
    assert max(first[n].abs().max().item() for n in first) > 0


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 5)

    def forward(self, pixel_values, labels):
        features = self.bn(self.conv(pixel_values)).mean(dim=(2, 3))
        return {"loss": nn.functional.cross_entropy(self.head(features), labels)}


def test_batchnorm_running_stats_are_updated_once_per_step(tmp_path):
    stats = {}
    for mode in ("qat", "saq"):
        model = quantize_model(BatchNormNet(), QuantConfig(bits_overrides={}))
        step_trainer(tmp_path, model, saq_mode=mode, rho=0.5).training_step(model, image_batch(0))
        stats[mode] = {k: v.clone() for k, v in model.bn.state_dict().items()}
    assert stats["saq"]["num_batches_tracked"].item() == 1
    assert all(torch.equal(stats["qat"][k], stats["saq"][k]) for k in stats["qat"])


# --- strategies, logging, skips, resume -----------------------------------------------------------------------

@pytest.mark.parametrize("strategy, expected_forwards, perturbed_steps", [
    ("full", 6, [1, 2, 3]),
    ("every_k", 5, [1, 3]),  # interval 2: optimizer steps 0 and 2 are SAQ steps
    ("looksam", 5, [1, 3]),  # the same schedule; the steps in between cost one pass too
    ("reuse_grad", 3, [2, 3]),  # no previous gradient before the first step
])
def test_strategy_cost_and_schedule(tmp_path, strategy, expected_forwards, perturbed_steps):
    model = quantized(tiny_vit)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer = train(model, tmp_path, saq_strategy=strategy, saq_interval=2, max_steps=3)
    assert len(forwards) == expected_forwards
    logged = [h["step"] for h in trainer.state.log_history if "saq_eps_norm" in h]
    assert logged == perturbed_steps


class ParamsAfterEachStep(TrainerCallback):
    def __init__(self):
        self.snapshots = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.snapshots.append(params(model))


def test_reuse_grad_first_step_is_plain_qat_then_perturbs(tmp_path):
    snapshots = {}
    for mode in ("qat", "saq"):
        recorder = ParamsAfterEachStep()
        trainer = SAQTrainer(model=quantized(tiny_vit), train_dataset=ToyImages(), callbacks=[recorder],
                             args=saq_args(tmp_path / mode, saq_mode=mode, saq_strategy="reuse_grad"))
        trainer.train()
        snapshots[mode] = recorder.snapshots
    assert_same(snapshots["qat"][0], snapshots["saq"][0])
    assert max_difference(snapshots["qat"][1], snapshots["saq"][1]) > 1e-7


def test_sharpness_metrics_are_logged_with_the_loss(tmp_path):
    trainer = train(quantized(tiny_vit), tmp_path, rho=0.07, max_steps=2)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        assert entry["saq_ascent_grad_norm"] > 0
        assert entry["saq_eps_norm"] == pytest.approx(0.07, rel=1e-5)
        assert entry["saq_skipped"] == 0
    qat = train(quantized(tiny_vit), tmp_path / "qat", saq_mode="qat", max_steps=1)
    assert not any(k.startswith("saq_") for h in qat.state.log_history for k in h)


def poison_ascent_gradients(monkeypatch, poisoned_calls):
    original = SharpnessPerturbation.ascent_gradients
    calls = []

    def ascent_gradients(self, compute_loss, extra=None):
        result = original(self, compute_loss, extra)
        grads = result[0] if extra is not None else result
        calls.append(1)
        if len(calls) in poisoned_calls:
            grads[0] = torch.full_like(grads[0], float("nan"))
        return result

    monkeypatch.setattr(SharpnessPerturbation, "ascent_gradients", ascent_gradients)


def test_non_finite_ascent_gradient_skips_the_perturbation_and_training_continues(tmp_path, monkeypatch):
    qat = params(train(quantized(tiny_vit), tmp_path / "qat", saq_mode="qat", max_steps=2).model)
    poison_ascent_gradients(monkeypatch, poisoned_calls={1, 2})
    always_skipped = train(quantized(tiny_vit), tmp_path / "skip", max_steps=2)
    assert_same(qat, params(always_skipped.model))  # a skipped step is exactly the plain QAT step
    assert always_skipped.state.log_history[-2]["saq_skipped"] == 2

    monkeypatch.undo()
    poison_ascent_gradients(monkeypatch, poisoned_calls={2})
    trainer = train(quantized(tiny_vit), tmp_path / "once", max_steps=3)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["saq_skipped"] for h in logs] == [0, 1, 1]
    assert ["saq_eps_norm" in h for h in logs] == [True, False, True]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("radius", [PAPER, dict(rho="auto")], ids=["paper", "defaults-auto"])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, radius, monkeypatch):
    # Interval 3: steps 0 and 3 are SAQ steps, so the resumed half has a plain and a full SAQ step. With
    # rho="auto" the resumed run restores the rule's running means of the loss and its count (the SAQ step 3 reads
    # them; a warm-up of 2 micro-batches, so step 3's radius is not 0 and a lost count would make it 0).
    monkeypatch.setattr(LossDrivenRadius, "WARMUP", 2)
    common = dict(max_steps=4, saq_strategy="every_k", saq_interval=3, logging_steps=1,
                  **{**PAPER, **radius, "saq_radius": "relative" if radius is not PAPER else "absolute",
                     "saq_clean_step_sizes": radius is not PAPER})
    uninterrupted = params(train(quantized(tiny_vit), tmp_path / "straight", **common).model)

    args = saq_args(tmp_path / "resumed", save_strategy="steps", save_steps=2, **common)
    first = SAQTrainer(model=quantized(tiny_vit), args=args, train_dataset=ToyImages(), callbacks=[StopAt(2)])
    first.train()
    assert first.state.global_step == 2
    second = SAQTrainer(model=quantized(tiny_vit, seed=1), args=args, train_dataset=ToyImages())
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert second.state.global_step == 4
    assert_same(uninterrupted, params(second.model))


def test_bf16_autocast_trains_and_restores(tmp_path):
    model = quantized(tiny_vit)
    before = params(model)
    trainer = train(model, tmp_path, bf16=True, max_steps=2)
    after = params(trainer.model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert max_difference(before, after) > 0
    assert all(v.dtype == torch.float32 for v in after.values())
    assert [h["saq_skipped"] for h in trainer.state.log_history if "loss" in h] == [0, 0]


# --- arguments -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("saq_mode", "case4"), ("rho", -1.0), ("rho", float("nan")), ("saq_perturb", "all"),
    ("saq_strategy", "sometimes"), ("saq_interval", 0), ("saq_interval", 1.5), ("saq_looksam_alpha", -0.1),
    ("saq_looksam_alpha", float("inf")), ("saq_start_ratio", 1.5), ("saq_start_ratio", "later"),
    ("saq_start_ratio", None), ("rho", None),
])
def test_invalid_arguments_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"\(field: {field}\)") as error:
        SAQTrainingArguments(output_dir=str(tmp_path), **{field: value})
    assert repr(value) in str(error.value)


def test_arguments_parse_from_command_line_and_recipe_dict(tmp_path):
    parser = HfArgumentParser(SAQTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--saq_mode", "case1", "--rho", "0.1", "--saq_adaptive",
        "--saq_perturb", "bias_norm_step_size", "--saq_strategy", "every_k", "--saq_interval", "3"])
    assert (args.saq_mode, args.rho, args.saq_adaptive, args.saq_perturb, args.saq_strategy, args.saq_interval) \
        == ("case1", 0.1, True, "bias_norm_step_size", "every_k", 3)
    (auto,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--rho", "auto",
                                                  "--saq_start_ratio", "0.25"])
    assert (auto.rho, auto.saq_start_ratio) == ("auto", 0.25)
    (default,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert (default.rho, default.saq_start_ratio) == ("auto", "auto")
    (recipe,) = parser.parse_dict({"output_dir": str(tmp_path), "saq_mode": "case2", "rho": 0.02})
    assert (recipe.saq_mode, recipe.rho, recipe.saq_strategy) == ("case2", 0.02, "full")
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--saq_mode", "sam"])


def test_trainer_rejects_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="SAQTrainingArguments"):
        SAQTrainer(model=quantized(tiny_vit), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
