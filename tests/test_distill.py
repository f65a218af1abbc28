"""Distillation from a frozen teacher (saq_hf/distill.py): the loss by hand, one teacher forward per micro-batch,
the equivalences (alpha 0, gradient accumulation, resume) and the refusals; ``saq-hf train --distill``."""

import json
import math

import pytest
import torch
from conftest import ToyImages, ViTImageProcessorPil, tiny_convnext, tiny_vit, write_imagefolder
from test_trainer import StopAt, assert_same, image_batch, params, quantized, saq_args, train
from torch.nn import functional as F
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from saq_hf import SAQTrainer, SAQTrainingArguments
from saq_hf.distill import TEACHER_FILE


def teacher(factory=tiny_vit, seed=7):
    """A random model of the student's classes with confident predictions (its classifier scaled up), so the
    distillation term is far from zero."""
    model = factory(seed)
    with torch.no_grad():
        model.classifier.weight.mul_(40)
    return model


def distilled(model, tmp_path, teacher_model, dataset=None, callbacks=None, **overrides):
    trainer = SAQTrainer(model=model, args=saq_args(tmp_path, **overrides), teacher_model=teacher_model,
                         train_dataset=dataset if dataset is not None else ToyImages(), callbacks=callbacks)
    trainer.train()
    return trainer


def counting(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --- the loss -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_items", [None, 8], ids=["mean", "normalised-by-the-step-count"])
def test_distillation_loss_is_the_hand_computation(tmp_path, num_items):
    alpha, T = 0.3, 2.0
    student, teach = quantized(tiny_vit), teacher()
    trainer = SAQTrainer(model=student, args=saq_args(tmp_path, distill_alpha=alpha, distill_temperature=T),
                         teacher_model=teach, train_dataset=ToyImages())
    batch = image_batch(0)
    student.train()
    loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items)

    with torch.no_grad():
        z_s, z_t = student(pixel_values=batch["pixel_values"]).logits, teach(pixel_values=batch["pixel_values"]).logits
    p_t = torch.exp(z_t / T) / torch.exp(z_t / T).sum(-1, keepdim=True)
    p_s = torch.exp(z_s / T) / torch.exp(z_s / T).sum(-1, keepdim=True)
    kl = (p_t * (p_t.log() - p_s.log())).sum(-1) * T * T
    q = torch.exp(z_s) / torch.exp(z_s).sum(-1, keepdim=True)
    ce = -q[torch.arange(4), batch["labels"]].log()
    denominator = 4 if num_items is None else num_items
    expected = ((1 - alpha) * ce.sum() + alpha * kl.sum()) / denominator
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert kl.mean() > 0.1  # the teacher term is not negligible here
    torch.testing.assert_close(trainer.distiller.last_label_loss, ce.mean(), rtol=1e-5, atol=1e-6)


def test_evaluation_uses_the_label_loss_without_the_teacher(tmp_path):
    student = quantized(tiny_vit)
    teach = teacher()
    calls = counting(teach)
    with_teacher = SAQTrainer(model=student, args=saq_args(tmp_path / "t"), teacher_model=teach)
    plain = SAQTrainer(model=student, args=saq_args(tmp_path / "p"))
    evaluated = with_teacher.evaluate(ToyImages(8))["eval_loss"]
    assert evaluated == plain.evaluate(ToyImages(8))["eval_loss"]
    assert not calls


# --- one teacher forward per micro-batch ----------------------------------------------------------------------------

# (fields, student forwards over 3 optimizer steps of 2 micro-batches): SAQ's two passes, the plain steps' one.
CASES = {
    "saq-full": (dict(saq_mode="saq"), 12),
    "case1": (dict(saq_mode="case1"), 12),
    "case2": (dict(saq_mode="case2"), 12),
    "qat": (dict(saq_mode="qat"), 6),
    "every_k": (dict(saq_strategy="every_k", saq_interval=2), 2 * 2 * 2 + 2),
    "looksam": (dict(saq_strategy="looksam", saq_interval=2), 2 * 2 * 2 + 2),
    "reuse_grad": (dict(saq_strategy="reuse_grad"), 6),
    # The untrained model waits for its fit with plain steps; the first batch's look at its predictions shares too.
    "start-auto": (dict(saq_start_ratio="auto"), 6 + 1),
}


@pytest.mark.parametrize("fields, student_forwards", CASES.values(), ids=CASES.keys())
def test_one_teacher_forward_per_micro_batch(tmp_path, fields, student_forwards):
    student, teach = quantized(tiny_vit), teacher()
    teacher_calls, student_calls = counting(teach), counting(student)
    trainer = distilled(student, tmp_path, teach, max_steps=3, gradient_accumulation_steps=2, **fields)
    assert len(student_calls) == student_forwards
    assert len(teacher_calls) == trainer.distiller.forwards == 3 * 2
    # Frozen, in eval mode, untouched by training and outside the optimizer.
    assert not teach.training and not any(p.requires_grad for p in teach.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teach.parameters()}
    assert_same(params(teach), params(teacher()))


# --- equivalences ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["saq", "qat"])
def test_alpha_zero_gives_exactly_the_step_without_a_teacher(tmp_path, mode):
    common = dict(saq_mode=mode, max_steps=2, gradient_accumulation_steps=2)
    plain = params(train(quantized(tiny_vit), tmp_path / "plain", **common).model)
    teach = teacher()
    calls = counting(teach)
    zero = distilled(quantized(tiny_vit), tmp_path / "zero", teach, distill_alpha=0.0, **common)
    assert zero.distiller is None and not calls
    assert_same(plain, params(zero.model))


# ViT takes num_items_in_batch (the loss is normalised by the step's count), ConvNeXt does not (divided by the
# accumulation steps): both rules must give one large batch's step.
@pytest.mark.parametrize("factory, fields", [(tiny_vit, dict(saq_mode="qat")), (tiny_convnext, dict(saq_mode="qat")),
                                             (tiny_vit, dict(saq_mode="saq", rho=0.0))],
                         ids=["vit-qat", "convnext-qat", "vit-saq-rho0"])
def test_gradient_accumulation_2x4_is_one_batch_of_8_within_rounding(tmp_path, factory, fields):
    common = dict(max_steps=2, optim="sgd", learning_rate=0.1, max_grad_norm=0.0, distill_alpha=0.5,
                  distill_temperature=2.0, **fields)

    def initialised():  # the activation step sizes from the same batch (LSQ initialises them from the first one)
        model = quantized(factory)
        model(**image_batch(0))
        return model

    large = distilled(initialised(), tmp_path / "large", teacher(factory), per_device_train_batch_size=8, **common)
    accumulated = distilled(initialised(), tmp_path / "accumulated", teacher(factory), per_device_train_batch_size=4,
                            gradient_accumulation_steps=2, **common)
    moved = max((large.model.state_dict()[n] - initialised().state_dict()[n]).abs().max().item()
                for n, _ in large.model.named_parameters())
    assert moved > 1e-4  # the step is not empty
    for name, value in params(large.model).items():
        torch.testing.assert_close(params(accumulated.model)[name], value, rtol=1e-5, atol=1e-6, msg=name)
    logged = [h["loss"] for h in large.state.log_history if "loss" in h]
    assert logged == pytest.approx([h["loss"] for h in accumulated.state.log_history if "loss" in h], rel=1e-5)


def test_rho_auto_reads_the_label_cross_entropy_not_the_distillation_loss(tmp_path):
    student, teach = quantized(tiny_vit), teacher()
    trainer = SAQTrainer(model=student, args=saq_args(tmp_path, rho="auto", saq_radius="relative", max_steps=1),
                         teacher_model=teach, train_dataset=ToyImages())
    observed, ascent = [], []
    rule_observe = trainer.radius_rule.observe
    trainer.radius_rule.observe = lambda loss: (observed.append(loss.detach().clone()), rule_observe(loss))
    compute_loss = trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        ascent.append((loss.detach().clone(), F.cross_entropy(outputs.logits.detach(), inputs["labels"])))
        return (loss, outputs) if return_outputs else loss

    trainer.compute_loss = recording
    trainer.train()
    (distill_loss, label_ce), = ascent[:1]
    assert len(observed) == 1  # one SAQ step: the ascent pass's loss
    torch.testing.assert_close(observed[0], label_ce)
    assert abs(float(distill_loss) - float(label_ce)) > 0.1  # the two would tell the rule different things


# --- resume ---------------------------------------------------------------------------------------------------------

def test_resume_with_the_same_teacher_matches_and_another_teacher_is_refused(tmp_path):
    common = dict(max_steps=4, saq_strategy="every_k", saq_interval=3, distill_alpha=0.5)
    uninterrupted = params(distilled(quantized(tiny_vit), tmp_path / "straight", teacher(), **common).model)

    args = saq_args(tmp_path / "resumed", save_strategy="steps", save_steps=2, **common)
    first = SAQTrainer(model=quantized(tiny_vit), args=args, teacher_model=teacher(), train_dataset=ToyImages(),
                       callbacks=[StopAt(2)])
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    saved = json.loads((checkpoint / TEACHER_FILE).read_text())
    assert saved["sha256"] == first.distiller.fingerprint and saved["distill_alpha"] == 0.5
    assert not any("teacher" in path.name for path in checkpoint.glob("*.safetensors"))  # the teacher is not saved

    for other, message in ((teacher(seed=8), "this run's teacher .* differs"), (None, "was trained with teacher")):
        refused = SAQTrainer(model=quantized(tiny_vit, seed=1), args=args, teacher_model=other,
                             train_dataset=ToyImages())
        with pytest.raises(ValueError, match=message) as err:
            refused.train(resume_from_checkpoint=str(checkpoint))
        assert "\n" not in str(err.value) and refused.state.global_step == 0

    second = SAQTrainer(model=quantized(tiny_vit, seed=1), args=args, teacher_model=teacher(),
                        train_dataset=ToyImages())
    second.train(resume_from_checkpoint=True)
    assert second.state.global_step == 4
    assert_same(uninterrupted, params(second.model))


def test_resuming_a_run_without_a_teacher_with_one_is_refused(tmp_path):
    args = saq_args(tmp_path, save_strategy="steps", save_steps=1, max_steps=1)
    SAQTrainer(model=quantized(tiny_vit), args=args, train_dataset=ToyImages()).train()
    trainer = SAQTrainer(model=quantized(tiny_vit), args=args, teacher_model=teacher(), train_dataset=ToyImages())
    with pytest.raises(ValueError, match="trained without a teacher"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# --- refusals -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("distill_alpha", -0.1), ("distill_alpha", 1.5), ("distill_alpha", math.nan),
                                          ("distill_alpha", True), ("distill_temperature", 0.0),
                                          ("distill_temperature", -1.0), ("distill_temperature", math.inf)])
def test_bad_distillation_fields_are_refused_in_one_line(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"field: {field}") as err:
        SAQTrainingArguments(output_dir=str(tmp_path), **{field: value})
    assert "\n" not in str(err.value)


def test_a_teacher_of_other_classes_is_refused(tmp_path):
    other = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3))
    with pytest.raises(ValueError, match="predicts 3 classes and the model 5"):
        SAQTrainer(model=quantized(tiny_vit), args=saq_args(tmp_path), teacher_model=other)


# --- saq-hf train --distill -----------------------------------------------------------------------------------------

CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def cli_fixtures(tmp_path_factory):
    """tests/test_cli.py's imagefolder (3 classes x 8 PNGs) and tiny ViT, plus teachers: one that fits, one with 5
    classes, one with the classes in another order, one of another input size."""
    root = tmp_path_factory.mktemp("distill_fixtures")
    write_imagefolder(root, CLASSES)

    def save(name, labels=CLASSES, image_size=16):
        torch.manual_seed(0)
        config = ViTConfig(image_size=image_size, patch_size=4, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
        ViTForImageClassification(config).save_pretrained(root / name)
        ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(root / name)

    save("tiny_vit")
    save("teacher_five", labels=("a", "b", "c", "d", "e"))
    save("teacher_order", labels=("dog", "cat", "fox"))
    save("teacher_size", image_size=32)
    return root


def cli_recipe(path, root, **changes):
    recipe = {"model_name_or_path": str(root / "tiny_vit"), "dataset_name": "imagefolder",
              "data_dir": str(root / "images"), "train_val_split": 0.25, "random_flip": False,
              "calibration_batches": 1, "rho": 0.05, "max_steps": 2, "per_device_train_batch_size": 6,
              "per_device_eval_batch_size": 6, "learning_rate": 1e-3, "save_strategy": "no", "report_to": "none",
              "remove_unused_columns": False, "disable_tqdm": True, "output_dir": str(path.parent / "run"),
              "fp_cache_dir": str(path.parent / "fp_cache"), "fp_max_steps": 2, **changes}
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in recipe.items()))
    return path


def test_cli_distill_fp_trains_against_the_runs_fp_model_and_records_it(tmp_path, cli_fixtures, capsys):
    from saq_hf.cli import main

    recipe = cli_recipe(tmp_path / "recipe.yaml", cli_fixtures, distill="fp", distill_alpha=0.5)
    assert main(["train", str(recipe)]) == 0
    assert "distilled from fp" in capsys.readouterr().out
    info = json.loads((tmp_path / "run" / "saq_run.json").read_text())
    taught = info["distillation"]
    assert taught["distill"] == "fp" and taught["teacher"] == info["fp_model"]  # the FP stage's cached result
    assert (taught["distill_alpha"], taught["distill_temperature"]) == (0.5, 1.0)
    fp_model = AutoModelForImageClassification.from_pretrained(info["fp_model"])
    from saq_hf.distill import teacher_fingerprint
    assert taught["teacher_sha256"] == teacher_fingerprint(fp_model)  # the trained FP model, not the checkpoint
    card = (tmp_path / "run" / "README.md").read_text()
    assert "Taught by its own full-precision model" in card and "α = 0.5" in card


def test_cli_distill_from_a_folder_and_without_a_teacher(tmp_path, cli_fixtures):
    from saq_hf.cli import main

    (tmp_path / "a").mkdir()
    recipe = cli_recipe(tmp_path / "a" / "recipe.yaml", cli_fixtures, distill=str(cli_fixtures / "tiny_vit"),
                        fp_max_steps=-1)
    assert main(["train", str(recipe)]) == 0
    assert json.loads((tmp_path / "a" / "run" / "saq_run.json").read_text())["distillation"]["teacher"] == \
        str(cli_fixtures / "tiny_vit")
    (tmp_path / "b").mkdir()
    plain = cli_recipe(tmp_path / "b" / "recipe.yaml", cli_fixtures, fp_max_steps=-1)
    assert main(["train", str(plain)]) == 0
    assert json.loads((tmp_path / "b" / "run" / "saq_run.json").read_text())["distillation"] is None
    assert "Taught by" not in (tmp_path / "b" / "run" / "README.md").read_text()


@pytest.mark.parametrize("teacher_dir, message", [
    ("teacher_five", "predicts 5 classes and the data has 3"),
    ("teacher_order", "names its classes [dog, cat, fox] and the data [cat, dog, fox]"),
    ("teacher_size", "takes 3-channel images of 32x32 and this run feeds 3x16x16"),
    ("nowhere", "could not load teacher"),
])
def test_cli_a_teacher_that_does_not_fit_exits_2_before_training(tmp_path, cli_fixtures, capfd, teacher_dir,
                                                                  message):
    from saq_hf.cli import main

    recipe = cli_recipe(tmp_path / "recipe.yaml", cli_fixtures, distill=str(cli_fixtures / teacher_dir))
    capfd.readouterr()
    assert main(["train", str(recipe)]) == 2
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saq-hf: error: ") and message in lines[0], captured.err
    assert "(recipe key: distill)" in lines[0] or "recipe key: distill;" in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "fp_cache").exists()  # no FP stage ran either


def test_cli_help_names_the_teacher_fields(capsys):
    from saq_hf.cli import main

    assert main(["train", "demo_mnist_vit_w4a4", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--distill " in out and "--distill_alpha" in out and "--distill_temperature" in out
    assert "the run's own full-precision model" in out


# --- the Trainer switches with a teacher ------------------------------------------------------------------------------
# DDP with a teacher: tests/test_data_parallel.py; compile with a teacher: tests/test_compile.py.

@pytest.mark.parametrize("mode", ["saq", "qat"])
def test_activation_checkpointing_with_a_teacher_gives_the_same_step_bit_for_bit(tmp_path, mode):
    from saq_hf.quant import recomputes_activations

    common = dict(saq_mode=mode, max_steps=3, learning_rate=1e-3, distill_alpha=0.5, distill_temperature=2.0)
    plain = distilled(quantized(tiny_vit), tmp_path / "plain", teacher(), **common)
    teach = teacher()
    calls = counting(teach)
    checkpointed = distilled(quantized(tiny_vit), tmp_path / "checkpointed", teach, gradient_checkpointing=True,
                             **common)
    assert recomputes_activations(checkpointed.model)
    assert len(calls) == checkpointed.distiller.forwards == 3  # the recomputed forwards do not call the teacher
    assert_same(params(plain.model), params(checkpointed.model))
    assert max((params(plain.model)[n] - params(quantized(tiny_vit))[n]).abs().max().item()
               for n in params(plain.model)) > 1e-4  # the steps moved the weights


def test_bf16_autocast_runs_teacher_and_both_passes_under_autocast_and_gives_the_reference_step(tmp_path):
    """The reference: SAQ's two passes by hand under ``torch.autocast(bfloat16)`` on the distillation loss, the
    teacher's logits taken once under the same autocast; one SGD step, lr 1 (as the bf16 test of test_switches)."""
    from test_switches import assert_params_close, sgd_saq_step_by_hand

    alpha, T = 0.5, 2.0
    model = quantized(tiny_vit)
    model(**image_batch(0))
    reference_model = quantized(tiny_vit)
    reference_model.load_state_dict(model.state_dict())
    data = ToyImages(1)
    x, y = data.pixel_values, data.labels
    sgd = dict(max_steps=1, per_device_train_batch_size=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
               weight_decay=0.0, lr_scheduler_type="constant", step_size_lr_scale=1.0, distill_alpha=alpha,
               distill_temperature=T)
    teach = teacher()
    dtypes = []
    teach.register_forward_hook(lambda _m, _i, out: dtypes.append(out.logits.dtype))
    distilled(model, tmp_path / "bf16", teach, dataset=data, bf16=True, **sgd)
    assert dtypes == [torch.bfloat16]  # one teacher forward, under the student's autocast

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z_t = teacher()(pixel_values=x).logits.float()
    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_s = reference_model(pixel_values=x).logits.float()
        kl = F.kl_div(F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1), reduction="sum", log_target=True)
        return (1 - alpha) * F.cross_entropy(z_s, y) + alpha * T * T * kl

    assert_params_close(params(model), sgd_saq_step_by_hand(reference_model, loss))


def test_outside_a_training_step_every_call_runs_the_teacher_and_inside_a_second_batch_is_refused(tmp_path):
    student, teach = quantized(tiny_vit), teacher()
    calls = counting(teach)
    trainer = SAQTrainer(model=student, args=saq_args(tmp_path), teacher_model=teach, train_dataset=ToyImages())
    student.train()
    first = trainer.compute_loss(student, image_batch(0))
    other = trainer.compute_loss(student, image_batch(4))  # a direct call never reuses another batch's logits
    assert len(calls) == 2 and first.item() != other.item()
    with trainer.distiller.micro_batch():
        trainer.compute_loss(student, image_batch(0))
        copy = {k: v.clone() for k, v in image_batch(0).items()}  # a pass over a copy of the batch shares the logits
        trainer.compute_loss(student, copy)
        assert len(calls) == 3
        with pytest.raises(RuntimeError, match="two different micro-batches"):
            trainer.compute_loss(student, {k: v[:2] for k, v in image_batch(0).items()})
    trainer.compute_loss(student, image_batch(0))
    assert len(calls) == 4
