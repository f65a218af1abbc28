"""The transformers internals saq-hf builds on: a changed one is one line naming the supported range."""

import re
from pathlib import Path

import pytest
from transformers import PreTrainedModel, Trainer

from conftest import ToyImages, tiny_vit
from saq_hf import QuantConfig, SAQTrainer, SAQTrainingArguments, quantize_model
from saq_hf.compat import TRANSFORMERS_FLOOR, check_loading_internals, check_trainer_internals, \
    create_optimizer_takes_model

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_transformers_has_every_internal_in_its_expected_shape():
    check_trainer_internals()
    check_loading_internals()


def test_a_trainer_whose_private_method_changed_shape_is_refused_in_one_line():
    class Renamed(Trainer):
        def _save_rng_state(self, folder, extra):  # another first parameter name: the override would not fit
            pass

    with pytest.raises(RuntimeError, match=re.escape(f"saq-hf supports transformers>={TRANSFORMERS_FLOOR}")) as error:
        check_trainer_internals(Renamed)
    assert "_save_rng_state(folder, extra) no longer takes (output_dir)" in str(error.value)
    assert "\n" not in str(error.value)


def test_a_trainer_without_a_method_is_refused():
    class Gone(Trainer):
        _load_best_model = None

    with pytest.raises(RuntimeError, match=r"Gone\._load_best_model is gone"):
        check_trainer_internals(Gone)


def test_a_model_whose_key_report_changed_shape_is_refused_before_loading():
    class Older(PreTrainedModel):  # transformers 5.0's shape: key sets in, key sets out
        def _adjust_missing_and_unexpected_keys(self, missing_keys, unexpected_keys):
            return missing_keys, unexpected_keys

    with pytest.raises(RuntimeError, match=r"_adjust_missing_and_unexpected_keys\(missing_keys, unexpected_keys\)"):
        check_loading_internals(Older)


@pytest.mark.parametrize("older", [False, True])
def test_a_create_optimizer_without_the_model_argument_builds_the_same_groups(tmp_path, monkeypatch, older):
    """transformers < 5.10 has ``create_optimizer(self)``: the step sizes still get their own group."""
    if older:
        if not create_optimizer_takes_model():
            pytest.skip("this transformers' create_optimizer already takes no model: the other case tests it")
        newer = Trainer.create_optimizer

        def create_optimizer(self):
            return newer(self)

        monkeypatch.setattr(Trainer, "create_optimizer", create_optimizer)
        assert not create_optimizer_takes_model()
    args = SAQTrainingArguments(output_dir=str(tmp_path), saq_mode="qat", learning_rate=1e-3, report_to=[],
                                step_size_lr_scale=10.0)
    model = quantize_model(tiny_vit(), QuantConfig(w_bits=4, a_bits=4))
    optimizer = SAQTrainer(model=model, args=args, train_dataset=ToyImages(8)).create_optimizer()
    step_sizes = {id(p) for n, p in model.named_parameters() if n.endswith("step_size")}
    assert {id(p) for p in optimizer.param_groups[-1]["params"]} == step_sizes
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(1e-2)
    assert optimizer.param_groups[-1]["weight_decay"] == 0.0


def test_the_declared_transformers_floor_is_the_one_the_checks_name():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"transformers>={TRANSFORMERS_FLOOR}"' in text


def test_a_processor_folder_loads_where_auto_image_processor_insists_on_torchvision(tmp_path, monkeypatch):
    """transformers 5.17 without torchvision: AutoImageProcessor refuses a PIL processor folder that the class it
    names still loads. The run pipeline falls back to that class (a transformers class: no remote code)."""
    import saq_hf.loading
    from conftest import ViTImageProcessorPil
    from saq_hf.args import UserInputError
    from saq_hf.loading import _load_image_processor

    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "p")

    class Refusing:  # what AutoImageProcessor of transformers 5.17 does there (the real class is left alone)
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise ImportError("AutoImageProcessor requires the Torchvision library but it was not found")

    monkeypatch.setattr(saq_hf.loading, "AutoImageProcessor", Refusing)
    processor = _load_image_processor(str(tmp_path / "p"))
    assert processor.size["height"] == 16 and type(processor).__module__.startswith("transformers.")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="could not load the image processor of .*Torchvision"):
        _load_image_processor(str(tmp_path / "empty"))
