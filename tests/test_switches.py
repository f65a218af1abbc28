"""Every ``TrainingArguments`` switch that changes how forward and backward run gives the exact SAQ step, each
against its reference (docs/METHOD.md, "Trainer switches"), or is refused before training.

Switches covered elsewhere: ``torch_compile`` (tests/test_compile.py: compiled vs eager for every mode and
strategy), DDP (tests/test_data_parallel.py: two CPU processes against one process accumulating the same
micro-batches), fp16 with the grad scaler (needs a CUDA device: benchmarks/gpu_checks.py).
"""

import pytest
import torch
from conftest import ToyImages, tiny_vit
from test_trainer import PAPER, StopAt, assert_same, image_batch, params, quantized, saq_args, train
from torch import nn
from torch.utils.checkpoint import checkpoint

from saq_hf import QuantConfig, SAQTrainer, quantize_model
from saq_hf.quant import recomputes_activations
from saq_hf.guards import refuse_unsupported_switches
from saq_hf.sharpness import SharpnessPerturbation

# --- activation (gradient) checkpointing ------------------------------------------------------------------------

# Every case, radius, ASAM and strategy; the default relative radius and clean step sizes, and the paper's step.
CHECKPOINTED = {
    "saq-defaults": dict(rho=0.05, saq_radius="relative", saq_clean_step_sizes=True),
    "saq-paper": {},
    "case1": dict(saq_mode="case1"),
    "case2": dict(saq_mode="case2"),
    "asam": dict(saq_adaptive=True, rho=0.5),
    "step-sizes-perturbed": dict(saq_perturb="bias_norm_step_size"),
    "every_k": dict(saq_strategy="every_k", saq_interval=2),
    "looksam": dict(saq_strategy="looksam", saq_interval=2, rho=0.05, saq_radius="relative",
                    saq_clean_step_sizes=True),
    "reuse_grad": dict(saq_strategy="reuse_grad"),
    "qat": dict(saq_mode="qat"),
}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("fields", CHECKPOINTED.values(), ids=CHECKPOINTED.keys())
def test_activation_checkpointing_gives_the_same_step_bit_for_bit(tmp_path, fields, reentrant):
    # lr 1e-3: a step that lost ε in the recomputed forward moves the weights by ~1e-3 differently.
    common = dict(max_steps=4, learning_rate=1e-3, **fields)
    plain = params(train(quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4)), tmp_path / "plain",
                         **common).model)
    trainer = train(quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4)), tmp_path / "checkpointed",
                    gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": reentrant}, **common)
    assert recomputes_activations(trainer.model)
    assert_same(plain, params(trainer.model))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class CheckpointedRegression(nn.Module):
    """A plain module that checkpoints its block itself (``torch.utils.checkpoint``), as custom models do."""

    def __init__(self, marked: bool):
        super().__init__()
        torch.manual_seed(0)
        self.block, self.head = Block(), nn.Linear(6, 3)
        if marked:
            self.block.gradient_checkpointing = True

    def forward(self, x, labels):
        hidden = checkpoint(self.block, x, use_reentrant=False) if self.training else self.block(x)
        return {"loss": (self.head(hidden) - labels).pow(2).mean()}


def regression_run(tmp_path, model):
    from conftest import Regression
    quantize_model(model, QuantConfig(w_bits=4, a_bits=4, bits_overrides={}))
    return params(train(model, tmp_path, Regression(), max_steps=2, per_device_train_batch_size=8).model)


def test_a_model_checkpointing_itself_gets_the_exact_step_once_it_marks_the_block(tmp_path):
    reference = regression_run(tmp_path / "reference", CheckpointedRegression(marked=True))
    model = CheckpointedRegression(marked=True)
    model.forward = lambda x, labels: {"loss": (model.head(model.block(x)) - labels).pow(2).mean()}
    assert_same(reference, regression_run(tmp_path / "plain", model))


def test_an_unmarked_recompute_fails_loudly_instead_of_dropping_epsilon(tmp_path):
    with pytest.raises(RuntimeError, match="ran its forward again after dropping its SAQ perturbation"):
        regression_run(tmp_path, CheckpointedRegression(marked=False))


def test_a_layer_used_twice_in_one_pass_fails_loudly(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x, labels):
            return {"loss": (self.head(self.fc(torch.tanh(self.fc(x)))) - labels).pow(2).mean()}

    with pytest.raises(RuntimeError, match="reuses the layer within one pass"):
        regression_run(tmp_path, Twice())


# --- gradient accumulation --------------------------------------------------------------------------------------

def test_qat_with_gradient_accumulation_is_one_large_batch_within_rounding(tmp_path):
    # Two half-batch gradients are summed in another order than one full-batch gradient: rounding only.
    common = dict(saq_mode="qat", max_steps=2, optim="sgd", learning_rate=0.1, max_grad_norm=0.0)

    def initialised():  # the activation step sizes from the same batch (LSQ initialises them from the first one)
        model = quantized(tiny_vit)
        model(**image_batch(0))
        return model

    large = params(train(initialised(), tmp_path / "large", per_device_train_batch_size=8, **common).model)
    accumulated = params(train(initialised(), tmp_path / "accumulated", per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, **common).model)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["saq", "case1", "case2"])
def test_saq_with_gradient_accumulation_sums_each_micro_batch_at_its_own_epsilon(tmp_path, mode):
    """The reference: SharpnessPerturbation by hand, one ε per micro-batch (as one ε per data-parallel worker), the
    descent gradients summed with the loss normalised over the whole step's samples. One SGD step, lr 1."""
    model = quantized(tiny_vit)
    model(**image_batch(0))  # initialise the activation step sizes
    reference_model = quantized(tiny_vit)
    reference_model.load_state_dict(model.state_dict())
    rho = 0.05
    perturbation = SharpnessPerturbation(reference_model, case=mode, rho=rho, radius="absolute")
    reference_model.train()
    for start in (0, 4):
        batch = image_batch(start)

        def loss():
            logits = reference_model(pixel_values=batch["pixel_values"]).logits
            return nn.functional.cross_entropy(logits, batch["labels"], reduction="sum") / 8

        eps = perturbation.compute_epsilon(perturbation.ascent_gradients(loss))
        with perturbation.perturbed(eps):
            loss().backward()
    expected = {n: p - p.grad for n, p in reference_model.named_parameters()}

    train(model, tmp_path, ToyImages(8), saq_mode=mode, rho=rho, max_steps=1, per_device_train_batch_size=4,
          gradient_accumulation_steps=2, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0,
          lr_scheduler_type="constant", dataloader_drop_last=True, train_sampling_strategy="sequential",
          step_size_lr_scale=1.0)
    for name, value in params(model).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)


# --- bf16 autocast ------------------------------------------------------------------------------------------------

def sgd_saq_step_by_hand(model, loss) -> dict:
    """The paper's SAQ step by hand (absolute radius ``PAPER["rho"]``): ε from the ascent gradients of ``loss()``, the
    gradient at the perturbed point, one SGD step of learning rate 1; the stepped parameters."""
    perturbation = SharpnessPerturbation(model, case="saq", rho=PAPER["rho"], radius="absolute")
    model.train()
    eps = perturbation.compute_epsilon(perturbation.ascent_gradients(loss))
    with perturbation.perturbed(eps):
        loss().backward()
    return {n: p - p.grad for n, p in model.named_parameters()}


def assert_params_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_runs_both_passes_under_autocast_and_gives_the_reference_step(tmp_path):
    """The reference: the two passes by hand under ``torch.autocast(bfloat16)``; one SGD step, lr 1."""
    model = quantized(tiny_vit)
    model(**image_batch(0))
    reference_model = quantized(tiny_vit)
    reference_model.load_state_dict(model.state_dict())
    fp32_model = quantized(tiny_vit)
    fp32_model.load_state_dict(model.state_dict())
    # One image: a batch the sampler cannot reorder (bf16 sums in another order differ by far more than 1e-5).
    data = ToyImages(1)
    batch = {"pixel_values": data.pixel_values, "labels": data.labels}
    sgd = dict(max_steps=1, per_device_train_batch_size=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
               weight_decay=0.0, lr_scheduler_type="constant", step_size_lr_scale=1.0)
    train(model, tmp_path / "bf16", data, bf16=True, **sgd)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return reference_model(**batch, num_items_in_batch=torch.tensor(1)).loss

    expected = sgd_saq_step_by_hand(reference_model, loss)
    assert_params_close(params(model), expected)
    # Autocast was on: the same step in float32 lands elsewhere, by far more than that.
    fp32 = params(train(fp32_model, tmp_path / "fp32", data, **sgd).model)
    assert max((fp32[n] - expected[n]).abs().max().item() for n in expected) > 1e-3


def test_fp16_without_a_gpu_is_refused_before_training(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 with the grad scaler runs where there is a GPU: benchmarks/gpu_checks.py compares it")
    with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
        SAQTrainer(model=quantized(tiny_vit), args=saq_args(tmp_path, fp16=True), train_dataset=ToyImages())


@pytest.mark.parametrize("switch, message", [
    ("is_fsdp_enabled", "SAQ does not run under FSDP"),
    ("is_deepspeed_enabled", "SAQ does not run under DeepSpeed"),
])
def test_sharded_training_is_refused_for_saq_and_allowed_for_qat(tmp_path, switch, message):
    # FSDP and DeepSpeed need several processes (and DeepSpeed a package): the check is run on a trainer that says
    # it is under one, which is what the constructor asks.
    trainer = SAQTrainer(model=quantized(tiny_vit), args=saq_args(tmp_path), train_dataset=ToyImages())
    setattr(trainer, switch, True)
    with pytest.raises(ValueError, match=message):
        refuse_unsupported_switches(trainer)
    trainer.args.saq_mode = "qat"
    refuse_unsupported_switches(trainer)


# --- resume mid-run, every strategy -------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["full", "every_k", "looksam", "reuse_grad"])
def test_resume_mid_run_matches_the_uninterrupted_run_for_every_strategy(tmp_path, strategy):
    # Interval 3 over 5 steps: the resumed half (steps 2-4) holds a cheap step that needs the kept state and a full one.
    common = dict(max_steps=5, saq_strategy=strategy, saq_interval=3, learning_rate=1e-3, rho=0.05,
                  saq_radius="relative", saq_clean_step_sizes=True)
    uninterrupted = params(train(quantized(tiny_vit), tmp_path / "straight", **common).model)
    args = saq_args(tmp_path / "resumed", save_strategy="steps", save_steps=2, **common)
    SAQTrainer(model=quantized(tiny_vit), args=args, train_dataset=ToyImages(), callbacks=[StopAt(2)]).train()
    second = SAQTrainer(model=quantized(tiny_vit, seed=1), args=args, train_dataset=ToyImages())
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert second.state.global_step == 5
    assert_same(uninterrupted, params(second.model))


@pytest.mark.parametrize("drop_last, warned", [(False, True), (True, False)])
def test_cuda_graph_compile_mode_asks_for_static_batch_shapes(tmp_path, drop_last, warned):
    from transformers.testing_utils import CaptureLogger

    import saq_hf.guards as guards_module

    args = saq_args(tmp_path, torch_compile=True, torch_compile_mode="reduce-overhead", dataloader_drop_last=drop_last)
    with CaptureLogger(guards_module.logger) as captured:
        SAQTrainer(model=quantized(tiny_vit), args=args, train_dataset=ToyImages())
    assert ("dataloader_drop_last=True" in captured.out) == warned


def test_logged_losses_and_the_fit_watch_read_per_sample_means_under_gradient_accumulation(tmp_path):
    """ViT normalises its loss over the whole step's samples: each micro-batch's loss is then a share
    1/accumulation steps of its mean, and the log (and the fit threshold) must scale it back."""
    common = dict(saq_mode="saq", rho=0.002, max_steps=1, optim="sgd", learning_rate=0.0, logging_steps=1,
                  saq_start_ratio=0.0)

    def initialised():
        model = quantized(tiny_vit)
        model(**image_batch(0))
        return model

    large = train(initialised(), tmp_path / "large", per_device_train_batch_size=8, **common)
    accumulated = train(initialised(), tmp_path / "accumulated", per_device_train_batch_size=4,
                        gradient_accumulation_steps=2, **common)
    assert accumulated.model_accepts_loss_kwargs  # the case where the loss comes normalised over the step

    def logged(trainer, key):
        return next(entry[key] for entry in trainer.state.log_history if key in entry)

    # The unperturbed loss is the same mean; the perturbed one differs a little (one ε per micro-batch), not 2x.
    assert logged(accumulated, "saq_ascent_loss") == pytest.approx(logged(large, "saq_ascent_loss"), rel=1e-5)
    for key in ("loss", "saq_descent_loss"):
        assert logged(accumulated, key) == pytest.approx(logged(large, key), rel=0.01), key
    waiting = SAQTrainer(model=initialised(), args=saq_args(tmp_path / "w", gradient_accumulation_steps=2),
                         train_dataset=ToyImages())
    waiting.current_gradient_accumulation_steps = 2  # set by train() for each step
    waiting.start_rule.watch_for_fit(waiting, torch.tensor(0.5))
    assert float(waiting.start_rule.fit_losses[0]) == pytest.approx(1.0)  # the returned share, scaled back to the mean
