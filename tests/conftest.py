"""Shared fixtures: offline Hub, tiny random ViT / ConvNeXt (a few thousand parameters, offline) and a toy image dataset."""

import datasets.config
import huggingface_hub.constants
import pytest
import torch
import transformers
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

NUM_LABELS = 5

# The PIL image processors: later 5.x releases name them ``*Pil`` (the unsuffixed class then needs torchvision),
# 5.1 uses the unsuffixed name. The library itself loads processors with AutoImageProcessor.
ViTImageProcessorPil = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
ConvNextImageProcessorPil = getattr(transformers, "ConvNextImageProcessorPil", None) or transformers.ConvNextImageProcessor

# Tiny tensors gain nothing from intra-op threads, and on a busy shared CPU the thread barriers make every op
# ~30x slower: one thread keeps each test to seconds.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test runs as on a machine without the Hub. huggingface_hub and datasets read these variables at
    import time, so their constants are set too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=NUM_LABELS)
    return ViTForImageClassification(config)


def tiny_convnext(seed: int = 0) -> ConvNextForImageClassification:
    torch.manual_seed(seed)
    config = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                            num_labels=NUM_LABELS, image_size=16)
    return ConvNextForImageClassification(config)


def vit_block_names(model, block: int) -> dict[str, str]:
    """Module names in block ``block`` of a ViT, whatever this transformers release calls them (5.1:
    ``vit.encoder.layer.N.attention.attention.query``, later: ``vit.layers.N.attention.q_proj``): ``query``, the
    first projection of its attention; ``fc1``, its MLP's expanding layer; ``attention``, the attention module."""
    linears = [name for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and f".{block}." in name]
    query = linears[0]
    fc1 = next(n for n in linears if model.get_submodule(n).out_features == model.config.intermediate_size)
    marker = f".{block}.attention."
    return {"query": query, "fc1": fc1, "attention": query[:query.index(marker) + len(marker) - 1]}


def write_imagefolder(root, classes, per_class: int = 8) -> None:
    """``root/images/<class>/<k>.png``: 18x22 RGB images, class i mostly channel i (so a model can learn them)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / "images" / name).mkdir(parents=True)
        for k in range(per_class):
            pixels = rng.integers(0, 60, size=(18, 22, 3), dtype=np.uint8)
            pixels[..., index] = 200
            Image.fromarray(pixels).save(root / "images" / name / f"{k}.png")


class ToyImages(torch.utils.data.Dataset):
    """Deterministic 3x16x16 images with labels that depend on the image (so the loss can go down)."""

    def __init__(self, n: int = 32, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(n, 3, 16, 16, generator=generator)
        self.labels = (self.pixel_values.mean(dim=(1, 2, 3)) * 40).long() % NUM_LABELS

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


@pytest.fixture
def toy_images():
    return ToyImages()


class OneLayerRegression(torch.nn.Module):
    """``y = W x + b`` with a mean-squared-error loss: a plain ``nn.Module`` returning ``{"loss": ...}``
    (or ``(loss, output)`` with ``tuple_output``), small enough to redo docs/METHOD.md's formulas by hand."""

    def __init__(self, in_features: int = 6, out_features: int = 3, tuple_output: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(in_features, out_features)
        self.tuple_output = tuple_output

    def forward(self, x, labels):
        output = self.fc(x)
        loss = (output - labels).pow(2).mean()
        return (loss, output) if self.tuple_output else {"loss": loss, "output": output}


class Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, in_features: int = 6, out_features: int = 3, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_features, generator=generator)
        self.y = torch.randn(n, out_features, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}
