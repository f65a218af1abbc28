"""Shipped recipes: exact names, parse into the four dataclasses, paper-style values; command-line overrides."""

from pathlib import Path

import pytest

from saq_hf.args import (
    DEMO_DATASET,
    DataArguments,
    ModelArguments,
    QuantArguments,
    UserInputError,
    parse_overrides,
    parse_recipe,
)
from saq_hf.training_args import SAQTrainingArguments

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
GROUPS = (ModelArguments, DataArguments, QuantArguments, SAQTrainingArguments)
PAPER_RECIPES = {
    "vit_b16_pets_w4a4.yaml": ("google/vit-base-patch16-224", "timm/oxford-iiit-pet"),
    "vit_b16_flowers_w4a4.yaml": ("google/vit-base-patch16-224", "dpdl-benchmark/oxford_flowers102"),
    "convnext_tiny_pets_w4a4.yaml": ("facebook/convnext-tiny-224", "timm/oxford-iiit-pet"),
    "convnext_tiny_flowers_w4a4.yaml": ("facebook/convnext-tiny-224", "dpdl-benchmark/oxford_flowers102"),
}


def test_recipes_folder_holds_exactly_the_documented_recipes():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted([*PAPER_RECIPES, "demo_mnist_vit_w4a4.yaml"])


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipe_is_w4a4_adamw_cosine_with_warmup_and_rho_in_methods_range(name, tmp_path):
    model, data, quant, training = parse_recipe(RECIPES / name, ["--output_dir", str(tmp_path / "out")], GROUPS)
    model_id, dataset_id = PAPER_RECIPES[name]
    assert (model.model_name_or_path, data.dataset_name) == (model_id, dataset_id)
    assert model_id.endswith("-224")  # 224 px checkpoints
    assert model.fp_stage  # the 1000-class ImageNet head is replaced: the FP stage trains the new one
    assert (quant.w_bits, quant.a_bits, quant.quant_config().tag) == (4, 4, "W4A4")
    assert training.optim.value == "adamw_torch"
    assert training.lr_scheduler_type.value == "cosine"
    assert 0 < training.warmup_steps < 1  # a warm-up fraction
    assert training.saq_mode == "saq"
    assert training.rho == "auto" and training.saq_radius == "relative"  # the library default
    assert training.remove_unused_columns is False
    if "flowers" in name:  # the official Flowers-102 validation split, not a carved one
        assert data.validation_split == "validation"


def test_demo_recipe_trains_a_small_vit_from_scratch_on_the_bundled_digits(tmp_path):
    model, data, quant, training = parse_recipe(RECIPES / "demo_mnist_vit_w4a4.yaml", [], GROUPS)
    assert model.model_name_or_path is None and model.model_type == "vit" and model.fp_stage
    assert "image_size=28" in model.config_overrides
    assert data.dataset_name == DEMO_DATASET
    assert data.random_flip is False  # mirrored digits are not digits
    assert quant.quant_config().tag == "W4A4"
    assert training.saq_mode == "saq" and training.rho == "auto" and training.saq_radius == "relative"


def test_command_line_flags_override_the_recipe(tmp_path):
    _, data, quant, training = parse_recipe(
        RECIPES / "demo_mnist_vit_w4a4.yaml",
        ["--max_steps", "5", f"--output_dir={tmp_path}", "--a_bits", "null", "--random_flip", "--rho", "0.1"],
        GROUPS,
    )
    assert (training.max_steps, training.output_dir, training.rho) == (5, str(tmp_path), 0.1)
    assert quant.a_bits is None and quant.quant_config().tag == "W4"
    assert data.random_flip is True  # a bare flag means true


def test_yaml_exponent_without_dot_is_read_as_a_float(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_type: vit\nfp_max_steps: 1\ndataset_name: demo_digits\nlearning_rate: 1e-4\n")
    assert parse_recipe(recipe, [], GROUPS)[3].learning_rate == pytest.approx(1e-4)


def test_overrides_parse_pairs_equals_bare_flags_and_lists():
    assert parse_overrides(["--a", "1", "--b=x y", "--flag", "--items", "p", "q"]) == {
        "a": "1", "b": "x y", "flag": "true", "items": ["p", "q"]}
    with pytest.raises(UserInputError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("rhoo: 0.1\n", [], "unknown recipe key rhoo (did you mean rho?)"),
        ("", ["--max_stepz", "3"], "unknown option --max_stepz (did you mean --max_steps?)"),
        ("learning_rate: fast\n", [], "learning_rate must be float, got 'fast' (recipe key: learning_rate)"),
        ("", ["--per_device_train_batch_size", "8.5"], "per_device_train_batch_size must be int, got '8.5'"),
        ("max_train_samples: lots\n", [], "max_train_samples must be int or null, got 'lots'"),
        ("w_bits: 9\n", [], "w_bits must be an integer in 2..8, got 9 (recipe key: w_bits)"),
        ("", ["--a_bits", "1"], "a_bits must be an integer in 2..8 or None (weights only), got 1 (option --a_bits)"),
        ("rho: -0.1\n", [], "rho must be 'auto' or a finite number >= 0, got -0.1 (recipe key: rho)"),
        ("saq_mode: sam\n", [], "saq_mode must be one of"),
        ("[1, 2]\n", [], "must be a mapping"),
    ],
)
def test_bad_recipe_values_raise_one_line_naming_the_key(tmp_path, text, overrides, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_type: vit\nfp_max_steps: 1\ndataset_name: demo_digits\n" * (not text.startswith("["))
                      + text)
    with pytest.raises(UserInputError) as caught:
        parse_recipe(recipe, overrides, GROUPS)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
