"""saq_strategy="looksam": full SAQ every k-th step, the kept sharpness component re-added in between."""

import pytest
import torch
from conftest import ToyImages, tiny_convnext, tiny_vit
from test_trainer import FAST, assert_same, image_batch, max_difference, params, quantized, saq_args

from saq_hf import SAQTrainer, SAQTrainingArguments

BATCH = 4


def trained(tmp_path, model, **overrides) -> SAQTrainer:
    trainer = SAQTrainer(model=model, train_dataset=ToyImages(), args=saq_args(tmp_path, **overrides))
    trainer.train()
    return trainer


@pytest.mark.parametrize("factory", [tiny_vit, tiny_convnext])
def test_alpha_zero_is_every_k_bit_for_bit(tmp_path, factory):
    runs = {strategy: trained(tmp_path / strategy, quantized(factory), saq_strategy=strategy, saq_interval=2,
                              saq_looksam_alpha=0.0, max_steps=4, rho=0.002, saq_radius="relative",
                              saq_clean_step_sizes=True)
            for strategy in ("every_k", "looksam")}
    assert_same(params(runs["every_k"].model), params(runs["looksam"].model))


def test_interval_one_is_full_saq_bit_for_bit(tmp_path):
    runs = {strategy: trained(tmp_path / strategy, quantized(tiny_vit), saq_strategy=strategy, saq_interval=1,
                              max_steps=3)
            for strategy in ("full", "looksam")}
    assert_same(params(runs["full"].model), params(runs["looksam"].model))


def test_cheap_steps_add_the_kept_component_and_change_training(tmp_path):
    runs = {alpha: trained(tmp_path / str(alpha), quantized(tiny_vit), saq_strategy="looksam", saq_interval=2,
                           saq_looksam_alpha=alpha, max_steps=4)
            for alpha in (0.0, 0.7)}
    assert max_difference(params(runs[0.0].model), params(runs[0.7].model)) > 1e-6


def plain_gradients(tmp_path, model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    qat = SAQTrainer(model=model, train_dataset=ToyImages(), args=saq_args(tmp_path / "qat", saq_mode="qat"))
    qat.current_gradient_accumulation_steps = 1  # set by the training loop; read by the loss scaling
    qat.training_step(model, batch)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_the_formula_by_hand(tmp_path, alpha):
    """Full step: v = (g_s - (<g_s, g>/||g||²) g) / ||g|| per tensor; cheap step: g + alpha·||g||·v per tensor."""
    model = quantized(tiny_vit)
    model(**image_batch(0))  # initialise the activation step sizes
    trainer = SAQTrainer(model=model, train_dataset=ToyImages(),
                         args=saq_args(tmp_path, saq_strategy="looksam", saq_interval=2, saq_looksam_alpha=alpha,
                                       rho=0.01, saq_radius="relative", saq_clean_step_sizes=True))
    trainer.current_gradient_accumulation_steps = 1
    names = {id(p): n for n, p in model.named_parameters()}
    g = plain_gradients(tmp_path, model, image_batch(0))
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, image_batch(0))  # step 0: full
    g_s = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    kept = {names[id(p)]: v for p, v in zip(trainer.strategy.params, trainer.strategy.directions) if v is not None}
    step_size_names = {names[id(p)] for p in trainer._lsq_step_sizes}
    assert kept and not (kept.keys() & step_size_names)  # clean step sizes: nothing to correct
    assert len(kept) == len(g.keys() - step_size_names)
    moved = 0
    for name, v in kept.items():
        orthogonal = g_s[name] - (g_s[name] * g[name]).sum() / g[name].norm() ** 2 * g[name]
        if orthogonal.norm() > 0:
            moved += 1
            torch.testing.assert_close(v, orthogonal / g[name].norm(), rtol=1e-4, atol=1e-6)
            assert abs(float((v * g[name]).sum())) < 1e-4 * float(g[name].norm())
    assert moved > len(kept) // 2

    trainer.state.global_step = 1  # step 1: cheap
    g1 = plain_gradients(tmp_path, model, image_batch(4))
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, image_batch(4))
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        expected = g1[name] + alpha * g1[name].norm() * kept[name] if name in kept else g1[name]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)


def test_a_resumed_run_rebuilds_the_directions_with_a_full_step(tmp_path):
    trainer = SAQTrainer(model=quantized(tiny_vit), train_dataset=ToyImages(),
                         args=saq_args(tmp_path, saq_strategy="looksam", saq_interval=4))
    trainer.state.global_step = 3  # a step in between, right after a resume: no kept directions yet
    assert trainer.strategy.directions is None and trainer.strategy.is_full_step(trainer.state.global_step)


def test_gradient_accumulation_runs_every_micro_batch_of_a_full_step_fully(tmp_path):
    model = quantized(tiny_vit)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer = trained(tmp_path, model, saq_strategy="looksam", saq_interval=2, gradient_accumulation_steps=2,
                      max_steps=3)
    assert len(forwards) == 2 * 2 + 2 * 1 + 2 * 2  # steps 0 and 2 full, step 1 one pass per micro-batch
    assert all(torch.isfinite(p).all() for p in params(trainer.model).values())


def test_argument_parses_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SAQTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--saq_strategy", "looksam", "--saq_interval", "5",
         "--saq_looksam_alpha", "0.5", *[f"--{k}={v}" for k, v in FAST.items() if k in ("seed",)]])
    assert (args.saq_strategy, args.saq_interval, args.saq_looksam_alpha) == ("looksam", 5, 0.5)
