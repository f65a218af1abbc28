"""The radius that transfers, rho="auto", clean step sizes and the collapse guard (docs/METHOD.md, "The radius ρ")."""

import math

import pytest
import torch
from conftest import NUM_LABELS, ToyImages, tiny_vit
from sklearn.datasets import load_digits
from transformers import ViTConfig, ViTForImageClassification

import saq_hf.start_rule as start_rule_module
from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model
from saq_hf.quant import LSQQuantizer
from saq_hf.radius import LossDrivenRadius
from saq_hf.sharpness import SharpnessPerturbation
from saq_hf.start_rule import FIT_SHARE, FIT_WINDOW, WAITING

FAST = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1)


def quantized(model, bits=4):
    return quantize_model(model, QuantConfig(w_bits=bits, a_bits=bits))


def loss_of(model, batch):
    return lambda: model(**batch).loss


def batch(n=8):
    data = ToyImages()
    return {"pixel_values": data.pixel_values[:n], "labels": data.labels[:n]}


def test_relative_radius_moves_every_tensor_by_rho_times_its_norm():
    model = quantized(tiny_vit())
    model(**batch())
    sharpness = SharpnessPerturbation(model, case="saq", rho=0.03)
    grads = sharpness.ascent_gradients(loss_of(model, batch()))
    eps = sharpness.compute_epsilon(grads)
    points = [layer.quantized_weight().detach() for layer in sharpness.layers] + [p.detach() for p in sharpness.params]
    checked = 0
    for e, g, x in zip(eps, grads, points):
        if e is None:
            continue
        if float(g.norm()) == 0 or float(x.norm()) == 0:
            assert float(e.norm()) == 0
            continue
        torch.testing.assert_close(e.norm(), 0.03 * x.norm(), rtol=1e-4, atol=0)
        torch.testing.assert_close(e / e.norm(), g / g.norm(), rtol=1e-4, atol=1e-6)  # along its own gradient
        checked += 1
    assert checked > 10


def test_relative_radius_leaves_zero_initialised_biases_alone_where_absolute_piles_onto_them():
    # From scratch every bias is 0: the paper's global-norm ε puts a large share of ρ on them.
    model = quantized(tiny_vit())
    model(**batch())
    biases = [i for i, p in enumerate(SharpnessPerturbation(model).params) if float(p.norm()) == 0]
    assert biases
    shares = {}
    for radius in ("relative", "absolute"):
        sharpness = SharpnessPerturbation(model, rho=0.05, radius=radius)
        eps = sharpness.compute_epsilon(sharpness.ascent_gradients(loss_of(model, batch())))
        n = len(sharpness.layers)
        total = sum(float(e.pow(2).sum()) for e in eps if e is not None)
        shares[radius] = sum(float(eps[n + i].pow(2).sum()) for i in biases if eps[n + i] is not None) / total
    assert shares["relative"] == 0
    assert shares["absolute"] > 0.05


def rule_radii(losses, **kwargs):
    rule = LossDrivenRadius(**{"num_classes": 10, "rho_max": 0.02, "loss_share": 0.5, **kwargs})
    radii = []
    for loss in losses:
        rule.observe(torch.tensor(float(loss)))
        radii.append(float(rule.rho))
    return rule, radii


def test_loss_driven_radius_is_zero_during_its_warm_up():
    _, radii = rule_radii([3.0] * 40)
    warm = LossDrivenRadius.WARMUP
    assert radii[:warm - 1] == [0.0] * (warm - 1) and radii[warm - 1:] == pytest.approx([0.02] * (41 - warm))
    assert float(LossDrivenRadius(num_classes=10, rho_max=0.02, loss_share=0.5).rho) == 0.0  # before any loss


def test_loss_driven_radius_on_a_high_plateau_is_its_cap():
    # Noisy labels: the loss stays above loss_share * ln C and has stopped falling.
    _, radii = rule_radii([1.8 + 0.1 * (-1) ** t for t in range(80)])
    assert radii[-1] == pytest.approx(0.02)


def test_loss_driven_radius_on_a_low_plateau_is_proportional_to_the_loss():
    rule, radii = rule_radii([0.2] * 80)
    assert float(rule.fall) == pytest.approx(0.0, abs=1e-6)
    assert radii[-1] == pytest.approx(0.02 * 0.2 / (0.5 * math.log(10)))


def test_loss_driven_radius_is_zero_while_the_loss_falls():
    # A small fine-tuning set: a high loss, but falling by 5 % a step. The earlier rule read it as noise (ρ at its cap).
    rule, radii = rule_radii([2.3 * 0.95 ** t for t in range(120)])
    assert max(radii) == 0.0 and float(rule.fall) > LossDrivenRadius.FALL_ZERO


def test_loss_driven_radius_closes_while_the_loss_falls_and_reopens_on_its_high_plateau():
    # High and flat (cap), then the model starts fitting (3.0 to 1.5 in 30 steps), then the loss stays high (noise).
    losses = [3.0] * 40 + [3.0 - 0.05 * t for t in range(1, 31)] + [1.5] * 120
    rule, radii = rule_radii(losses)
    assert radii[39] == pytest.approx(0.02)
    closed = [t for t, r in enumerate(radii) if t >= 40 and r == 0.0]
    assert closed and min(closed) < 80 < max(closed)  # closed by the fall and for a while after it
    assert radii[-1] == pytest.approx(0.02)
    reopened = max(closed) + 1
    assert all(b >= a - 1e-12 for a, b in zip(radii[reopened:], radii[reopened + 1:]))  # opens steadily


def test_loss_driven_radius_fades_linearly_across_its_fall_band():
    rule = LossDrivenRadius(num_classes=10, rho_max=0.02, loss_share=0.5)
    rule.observed = LossDrivenRadius.WARMUP
    middle = (LossDrivenRadius.FALL_FULL + LossDrivenRadius.FALL_ZERO) / 2
    rule.slow, rule.fast = torch.tensor(3.0), torch.tensor(3.0 * (1 - middle))  # fast still above the level cap
    assert float(rule.rho) == pytest.approx(0.01)


def test_loss_driven_radius_state_saves_to_safetensors_after_a_single_loss(tmp_path):
    # One observation: both means are the same value; a checkpoint must still hold two tensors (no shared memory).
    from safetensors.torch import load_file, save_file

    rule, _ = rule_radii([1.2])
    save_file(rule.state_dict(), str(tmp_path / "state.safetensors"))
    restored = LossDrivenRadius(num_classes=10, rho_max=0.02, loss_share=0.5)
    restored.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    assert (float(restored.fast), float(restored.slow), restored.observed) == pytest.approx((1.2, 1.2, 1))


def test_loss_driven_radius_state_round_trips_and_reads_the_earlier_rules_file():
    rule, _ = rule_radii([1.0 + 0.01 * t for t in range(35)])
    restored = LossDrivenRadius(num_classes=10, rho_max=0.02, loss_share=0.5)
    tensors = {**rule.state_dict(), "other": torch.zeros(1)}
    restored.load_state_dict(tensors)
    assert list(tensors) == ["other"]  # its own keys taken, the strategy's left
    assert restored.observed == 35 and float(restored.rho) == pytest.approx(float(rule.rho))
    earlier = LossDrivenRadius(num_classes=10, rho_max=0.02, loss_share=0.5)
    earlier.load_state_dict({"rho_auto.mean_loss": torch.tensor([0.5])})
    assert float(earlier.rho) == pytest.approx(0.02 * 0.5 / (0.5 * math.log(10)))


def test_loss_driven_radius_needs_a_classifier():
    with pytest.raises(ValueError, match="set rho to a number"):
        LossDrivenRadius(num_classes=1, rho_max=0.02, loss_share=0.5)


def args(tmp_path, **overrides):
    # SAQ from the first step, also on the untrained tiny models here; the saq_start_ratio tests below say "auto".
    return SAQTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                **{"max_steps": 2, "saq_start_ratio": 0.0, **FAST, **overrides})


def trained_tiny_vit(tmp_path):
    model = quantized(tiny_vit())
    SAQTrainer(model=model, args=args(tmp_path / "qat", saq_mode="qat", max_steps=60, learning_rate=3e-3),
               train_dataset=ToyImages()).train()
    return model


@pytest.fixture
def no_warm_up(monkeypatch):
    """rho="auto" from the first micro-batch: the runs here are a few steps long."""
    monkeypatch.setattr(LossDrivenRadius, "WARMUP", 1)


def plateau_share(measured):
    band = measured["fall_zero"] - measured["fall_full"]
    return min(1.0, max(0.0, (measured["fall_zero"] - measured["last_fall"]) / band))


def test_rho_auto_takes_the_rule_radius_of_the_running_loss_and_logs_it(tmp_path, no_warm_up):
    trainer = SAQTrainer(model=trained_tiny_vit(tmp_path), args=args(tmp_path, rho="auto", max_steps=4),
                         train_dataset=ToyImages())
    trainer.train()
    measured = trainer.rho_auto_measurement
    share = trainer.args.rho_auto_loss_share
    expected = 0.02 * min(1.0, measured["last_mean_loss"] / (share * math.log(NUM_LABELS))) * plateau_share(measured)
    assert measured["last_rho"] == pytest.approx(expected) and trainer.rho == pytest.approx(expected)
    logged = [h["saq_rho"] for h in trainer.state.log_history if "saq_rho" in h]
    assert len(logged) == 4 and all(0 < r <= 0.02 for r in logged) and expected > 0
    assert measured["mean_rho"] == pytest.approx(sum(logged) / 4)


def test_rho_auto_gives_a_model_that_fits_its_labels_a_smaller_radius(tmp_path, no_warm_up):
    # A trained model's loss is low: a small radius. An unfit one (loss near ln C): rho_auto_max.
    fitted = SAQTrainer(model=trained_tiny_vit(tmp_path), args=args(tmp_path / "fit", rho="auto"),
                        train_dataset=ToyImages())
    fitted.train()
    unfit = SAQTrainer(model=quantized(tiny_vit()), args=args(tmp_path / "unfit", rho="auto"), train_dataset=ToyImages())
    unfit.train()
    assert unfit.rho == pytest.approx(0.02)
    assert fitted.rho < 0.5 * unfit.rho


def test_rho_auto_at_its_cap_trains_exactly_like_that_fixed_radius(tmp_path, no_warm_up):
    # The rule only sets the radius: no extra random draws, no other change to the step.
    auto = SAQTrainer(model=quantized(tiny_vit()), args=args(tmp_path / "a", rho="auto", rho_auto_loss_share=1e-6),
                      train_dataset=ToyImages())
    auto.train()
    fixed = SAQTrainer(model=quantized(tiny_vit()), args=args(tmp_path / "f", rho=0.02), train_dataset=ToyImages())
    fixed.train()
    for (name, a), b in zip(auto.model.named_parameters(), fixed.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), ("AUTO", "auto"), ("0.1", 0.1), (0.02, 0.02), (0, 0.0)])
def test_rho_accepts_auto_or_a_number(tmp_path, value, parsed):
    assert SAQTrainingArguments(output_dir=str(tmp_path), rho=value).rho == parsed


@pytest.mark.parametrize("field, value", [("rho", "big"), ("rho", -1.0), ("rho", float("nan")),
                                          ("saq_radius", "global"), ("rho_auto_max", 0.0),
                                          ("rho_auto_loss_share", -1.0)])
def test_bad_radius_settings_name_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        SAQTrainingArguments(output_dir=str(tmp_path), **{field: value})


def test_clean_step_sizes_get_the_unperturbed_gradient(tmp_path):
    # With saq_clean_step_sizes the LSQ step sizes see exactly plain QAT's gradient; every other parameter
    # sees the perturbed point's.
    grads = {}
    for mode in ("qat", "saq"):
        model = quantized(tiny_vit())
        model(**batch())
        trainer = SAQTrainer(model=model, args=args(tmp_path / mode, saq_mode=mode, rho=0.05),
                             train_dataset=ToyImages())
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(model, batch())
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    step_sizes = [n for n in grads["qat"] if n.endswith("step_size")]
    assert step_sizes
    for name in step_sizes:
        torch.testing.assert_close(grads["saq"][name], grads["qat"][name], rtol=1e-5, atol=1e-8, msg=name)
    others = [n for n in grads["qat"] if not n.endswith("step_size")]
    assert max(float((grads["saq"][n] - grads["qat"][n]).abs().max()) for n in others) > 1e-4


def digits_batches():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = torch.nn.functional.interpolate((x - x.mean()) / x.std(), scale_factor=4, mode="nearest")  # 32x32
    return torch.utils.data.TensorDataset(x[:512], torch.tensor(digits.target[:512]))


class Digits(torch.utils.data.Dataset):
    def __init__(self):
        self.data = digits_batches()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return {"pixel_values": x, "labels": y}


def from_scratch_vit():
    torch.manual_seed(0)
    return quantized(ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, num_channels=1, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, num_labels=10)), bits=4)


def test_default_saq_learns_from_scratch_like_plain_qat(tmp_path):
    # The from-scratch collapse (docs/METHOD.md): with the paper's absolute rho=0.05 and step sizes trained at the
    # perturbed point a small W4A4 ViT learned far slower than plain QAT. With a relative radius and clean step sizes
    # the loss falls like QAT's, also with SAQ from the first step (what this test guards; the defaults,
    # saq_start_ratio="auto" and rho="auto", keep this untrained model on plain QAT until it fits).
    final = {}
    settings = {"qat": dict(saq_mode="qat"), "relative": dict(saq_start_ratio=0.0, rho=0.002), "defaults": {}}
    for name, overrides in settings.items():
        trainer = SAQTrainer(model=from_scratch_vit(), train_dataset=Digits(), args=SAQTrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=16, num_train_epochs=4, learning_rate=3e-3,
            weight_decay=0.05, lr_scheduler_type="cosine", **{**FAST, "logging_steps": 32}, **overrides))
        trainer.train()
        final[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    assert final["qat"] < 0.9 * math.log(10)
    assert final["relative"] < 0.93 * math.log(10)
    assert abs(final["relative"] - final["qat"]) < 0.15
    assert abs(final["defaults"] - final["qat"]) < 0.15

def test_saq_on_an_untrained_model_says_to_train_it_first(tmp_path):
    trainer = SAQTrainer(model=quantized(tiny_vit()), args=args(tmp_path / "scratch", rho=0.002),
                         train_dataset=ToyImages())
    with pytest.warns(UserWarning, match="untrained model"):
        trainer.train()


def test_rho_auto_refuses_an_absolute_radius(tmp_path):
    with pytest.raises(ValueError, match="relative radius"):
        SAQTrainingArguments(output_dir=str(tmp_path), rho="auto", saq_radius="absolute")


def test_saq_on_a_trained_model_does_not_warn(tmp_path, recwarn):
    model = trained_tiny_vit(tmp_path)
    SAQTrainer(model=model, args=args(tmp_path / "saq", rho=0.002), train_dataset=ToyImages()).train()
    assert not [w for w in recwarn.list if "untrained model" in str(w.message)]


# --- saq_start_ratio: plain QAT first on a model that starts untrained ------------------------------------------

def counting_forwards(model):
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    return forwards


def test_an_untrained_model_trains_plain_qat_until_it_fits_and_says_so(tmp_path):
    runs = {}
    for mode in ("qat", "saq"):
        model = quantized(tiny_vit())
        forwards = counting_forwards(model)
        trainer = SAQTrainer(model=model, args=args(tmp_path / mode, saq_mode=mode, max_steps=4, saq_start_ratio="auto"),
                             train_dataset=ToyImages())
        if mode == "saq":
            with pytest.warns(UserWarning, match="SAQ never started"):
                trainer.train()
        else:
            trainer.train()
        runs[mode] = (trainer, len(forwards))
    trainer, forwards = runs["saq"]
    assert trainer.saq_start_step == WAITING and trainer.start_rule.fit_threshold == pytest.approx(FIT_SHARE * math.log(NUM_LABELS))
    assert [h["saq_start_step"] for h in trainer.state.log_history if "saq_start_step" in h] == [WAITING]
    assert forwards == 1 + 4  # the look at the first batch, then four plain QAT steps
    for (name, a), b in zip(trainer.model.named_parameters(), runs["qat"][0].model.parameters()):
        assert torch.equal(a, b), name  # bit for bit plain QAT: the look changes nothing


def test_saq_starts_at_the_first_window_whose_loss_is_below_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(start_rule_module, "FIT_SHARE", 100.0)  # any loss counts as fitted
    model = quantized(tiny_vit())
    forwards = counting_forwards(model)
    trainer = SAQTrainer(model=model, args=args(tmp_path, max_steps=FIT_WINDOW + 2, saq_start_ratio="auto"),
                         train_dataset=ToyImages())
    trainer.train()
    assert trainer.saq_start_step == FIT_WINDOW
    assert [h["saq_start_step"] for h in trainer.state.log_history if "saq_start_step" in h] == [WAITING, FIT_WINDOW]
    assert len(forwards) == 1 + FIT_WINDOW + 2 * 2
    assert [h["step"] for h in trainer.state.log_history if "saq_eps_norm" in h] == [FIT_WINDOW + 1, FIT_WINDOW + 2]


def test_a_resumed_run_goes_on_waiting_or_keeps_its_start(tmp_path):
    for history, expected in (([WAITING], WAITING), ([WAITING, 30], 30), ([7], 7)):
        resumed = SAQTrainer(model=quantized(tiny_vit()), args=args(tmp_path, saq_start_ratio="auto"),
                             train_dataset=ToyImages())
        resumed.state.log_history = [{"saq_start_step": value, "step": 0} for value in history]
        assert resumed.start_rule.resolve(resumed, resumed.model, batch()) == expected


def test_a_trained_model_starts_saq_at_once_and_the_check_changes_nothing(tmp_path):
    runs = {}
    for ratio in ("auto", 0.0):
        model = trained_tiny_vit(tmp_path / str(ratio))
        trainer = SAQTrainer(model=model, args=args(tmp_path / f"saq{ratio}", saq_start_ratio=ratio, max_steps=3),
                             train_dataset=ToyImages())
        trainer.train()
        assert trainer.saq_start_step == 0
        assert not [h for h in trainer.state.log_history if "saq_start_step" in h]
        runs[ratio] = model
    for (name, a), b in zip(runs["auto"].named_parameters(), runs[0.0].parameters()):
        assert torch.equal(a, b), name


def test_a_numeric_start_ratio_needs_no_look_at_the_model(tmp_path):
    model = quantized(tiny_vit())
    forwards = counting_forwards(model)
    trainer = SAQTrainer(model=model, args=args(tmp_path, saq_start_ratio=0.25, max_steps=4), train_dataset=ToyImages())
    trainer.train()
    assert trainer.saq_start_step == 1 and len(forwards) == 1 + 3 * 2


def test_qat_mode_runs_no_check(tmp_path):
    model = quantized(tiny_vit())
    forwards = counting_forwards(model)
    SAQTrainer(model=model, args=args(tmp_path, saq_mode="qat", max_steps=3), train_dataset=ToyImages()).train()
    assert len(forwards) == 3


@pytest.mark.parametrize("path", ["cpp", "torch_ops"])
def test_descent_pass_skips_only_the_step_size_gradients_it_replaces(tmp_path, monkeypatch, path):
    # Ascent: every quantizer computes its step size's gradient (the clean one). Descent: that gradient is
    # replaced, so the quantizers compute x's gradient alone, and are reset after; without clean step sizes
    # both passes compute it. On the op's C++ CPU kernels and on its torch-ops path (where they cannot be built).
    from saq_hf.quant import lsq, native
    calls = []

    def name(step_grad):
        return "_fake_quantize_grads" if step_grad else "_fake_quantize_grad_x"

    if path == "cpp":
        module = native.kernels()

        class Spy:  # one entry per tensor, named as the torch-ops path's call
            def op_backward(self, *a):
                calls.append(name(a[6]))
                return module.op_backward(*a)

            def op_backward_many(self, *a):
                calls.extend(name(step_grad) for step_grad in a[6])
                return module.op_backward_many(*a)

            def __getattr__(self, attr):
                return getattr(module, attr)

        monkeypatch.setattr(native, "kernels", lambda: Spy())
    else:
        monkeypatch.setattr(native, "kernels", lambda: None)
    # The torch-ops path (and, with the C++ kernels, what they leave to it: ViT's class-token slice)...
    run = lsq._run
    monkeypatch.setattr(lsq, "_run", lambda fn, *a: calls.append(fn.__name__) or run(fn, *a))
    # ... and the weights' calls there, made together once per pass: one entry per weight.
    many = lsq._foreach_fake_quantize_grads
    monkeypatch.setattr(lsq, "_foreach_fake_quantize_grads", lambda grads, xs, *a: calls.extend(
        [name(a[-1])] * len(xs)) or many(grads, xs, *a))
    for clean in (True, False):
        model = quantized(tiny_vit())
        model(**batch())
        quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
        trainer = SAQTrainer(model=model, args=args(tmp_path / str(clean), saq_mode="saq", rho=0.05,
                                                    saq_clean_step_sizes=clean), train_dataset=ToyImages())
        trainer.current_gradient_accumulation_steps = 1
        calls.clear()
        trainer.training_step(model, batch())
        backward = [name for name in calls if name != "_fake_quantize"]
        if clean:
            assert backward.count("_fake_quantize_grads") == len(quantizers)
            assert backward.count("_fake_quantize_grad_x") == len(quantizers)
        else:
            assert "_fake_quantize_grad_x" not in backward and len(backward) > len(quantizers)
        assert all(q.step_size_grad for q in quantizers)


def test_recorded_weight_norm_is_used_only_while_the_weight_and_step_size_are_unchanged():
    from saq_hf.quant import QuantLinear, capture_quantized_weights
    layer = QuantLinear(16, 8, w_bits=4, a_bits=4)
    x = torch.randn(4, 16)
    with capture_quantized_weights([layer]):
        layer(x)
    record = layer._weight_norm_record[0]
    fresh = torch.linalg.vector_norm(layer.quantized_weight().detach())
    assert layer.quantized_weight_norm() is record and torch.equal(record, fresh)
    for tensor in (layer.weight, layer.weight_quantizer.step_size):
        with torch.no_grad():
            tensor.mul_(1.5)  # an optimizer step: in place
        now = layer.quantized_weight_norm()
        assert now is not record and torch.equal(now, torch.linalg.vector_norm(layer.quantized_weight().detach()))
    layer(x)  # a forward outside a capture records nothing
    assert layer._weight_norm_record[0] is record


def test_recorded_weight_norm_is_not_used_for_a_quantizer_swapped_in_at_the_same_version():
    # A bit-width search swaps other quantizers into a layer between the ascent (which records ||Q(w)||) and ε.
    # Fresh quantizers initialised once sit at the same version counter as the recorded one: the record must not
    # pass for theirs, or ε gets the 8-bit weight's length at every bit-width.
    from saq_hf.quant import LSQQuantizer, QuantLinear, capture_quantized_weights
    torch.manual_seed(0)
    layer = QuantLinear(16, 8, w_bits=8, a_bits=None)
    with capture_quantized_weights([layer]):
        layer(torch.randn(4, 16))
    recorded = layer._weight_norm_record[0]
    other = LSQQuantizer(2, signed=True, channel_shape=(8, 1), step_size_format=layer.weight_quantizer.step_size_format)
    other.initialize_from(layer.weight.detach())
    step = layer.weight_quantizer.step_size_parameter
    assert other.step_size_parameter._version == step._version  # what made the old key match
    layer.weight_quantizer = other
    expected = torch.linalg.vector_norm(layer.quantized_weight().detach())
    assert abs(float(expected) - float(recorded)) > 1e-3 * float(recorded)
    assert torch.equal(layer.quantized_weight_norm(), expected)


def test_captured_gradient_is_the_gradient_at_qw_also_for_a_layer_used_twice():
    import torch.nn.functional as F
    from saq_hf.quant import QuantLinear, capture_quantized_weights
    torch.manual_seed(0)
    layer = QuantLinear(8, 8, w_bits=4, a_bits=None)
    x = torch.randn(4, 8)
    layer(x)  # initialises the step sizes
    with capture_quantized_weights([layer]) as captured:
        loss = layer(torch.tanh(layer(x))).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, captured[layer])
    # The same loss as a function of a free tensor W = Q(w): both uses of the layer count.
    free = layer.quantized_weight().detach().requires_grad_()
    (expected,) = torch.autograd.grad(F.linear(torch.tanh(F.linear(x, free, layer.bias)), free, layer.bias)
                                      .pow(2).sum(), free)
    torch.testing.assert_close(grad, expected)
    assert layer.weight_perturbation is None


@pytest.mark.parametrize("strategy", ["full", "every_k", "looksam", "reuse_grad"])
def test_rho_auto_sets_the_radius_of_every_strategy_from_every_micro_batch(tmp_path, strategy, no_warm_up):
    trainer = SAQTrainer(model=trained_tiny_vit(tmp_path), train_dataset=ToyImages(),
                         args=args(tmp_path / strategy, rho="auto", saq_strategy=strategy, saq_interval=2, max_steps=4,
                                   gradient_accumulation_steps=2))
    trainer.train()
    measured = trainer.rho_auto_measurement
    # The trained model's losses reached the rule (before any loss it would take the cap, 0.02).
    assert 0 < measured["last_rho"] < 0.02 and 0 < measured["mean_rho"] < 0.02
    share = trainer.args.rho_auto_loss_share
    assert measured["last_rho"] == pytest.approx(
        0.02 * min(1.0, measured["last_mean_loss"] / (share * math.log(NUM_LABELS))) * plateau_share(measured))


def test_rho_auto_refuses_a_model_without_classes_before_training(tmp_path):
    from conftest import OneLayerRegression

    with pytest.raises(ValueError, match="num_labels >= 2"):
        SAQTrainer(model=OneLayerRegression(), args=args(tmp_path, rho="auto"), train_dataset=ToyImages())
