"""A saq-hf run: full-precision model -> quantize -> SAQ training -> FP vs quantized report -> hub-ready folder.

``prepare`` loads and checks everything (recipe values, dataset, columns, image processor, model, Hub repo)
and writes nothing, so bad input fails before ``output_dir`` exists; ``train`` does the work; ``evaluate_run``
scores a finished run folder. The CLI is a thin shell over these three.
"""

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import socket
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, Trainer, set_seed
from transformers.image_processing_base import ImageProcessingMixin
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from . import __version__
from .args import DataArguments, ModelArguments, QuantArguments, UserInputError, check_training_args
from .console import say, warn_line
from .data import ImageClassificationData, collate_fn, data_fingerprint, load_image_data, with_transforms
from .export import follow_umask
from .hub import (
    RUN_INFO_NAME,
    PushError,
    create_repo,
    is_hub_id,
    push_run_folder,
    read_run_info,
    refuse_custom_code,
    write_model_card,
)
from .metrics import compute_metrics_fn, evaluate_classifier, load_metric
from .progress import forward_pass_bar, read_train_log, sharpness_passes, show_stage_progress
from .landscape import sharpness_report
from .quant import calibrate, is_quantized
from .quant.convert import planned_layers
from .quantize import quantize_model
from .trainer import WAITING, SAQTrainer, SAQTrainingArguments

SAQ_FIELDS = ("saq_mode", "rho", "saq_radius", "saq_start_ratio", "saq_clean_step_sizes", "saq_adaptive", "saq_perturb",
              "saq_strategy", "saq_interval", "saq_looksam_alpha")
TRAINING_FIELDS = ("optim", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                   "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed")
DISTILL_FP = "fp"  # recipe key distill: the run's own full-precision model teaches the quantized one
FP_STAGE_TRAINING_FIELDS = ("optim", "weight_decay", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
                            "gradient_accumulation_steps", "seed", "max_grad_norm", "label_smoothing_factor")


# Below this many images one image moves accuracy by more than a point: say so next to the numbers.
SMALL_SPLIT = 100


def _warn_if_small(split_name: str, num_rows: int) -> None:
    if num_rows < SMALL_SPLIT:  # on stderr: stdout stays the report
        warn_line(f"the {split_name} split has only {num_rows} images, so one image is {100 / num_rows:.1f} points "
                  "of accuracy; report on a larger split (test_split, train_val_split) for figures that mean much")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


@dataclass
class RunSetup:
    """Everything a run needs, loaded and checked; nothing written yet."""

    model_args: ModelArguments
    data_args: DataArguments
    quant_args: QuantArguments
    training_args: SAQTrainingArguments
    data: ImageClassificationData
    image_processor: Any
    model: torch.nn.Module
    metric: Any
    fp_dir: Path | None  # where the FP stage result is (fp_cached) or will be saved; None without an FP stage
    fp_cached: bool
    head_reinitialised: bool
    hub_repo_id: str | None
    bits_plan: dict[str, Any] | None = None  # the plan's allocation checked against the model (search.check_plan)
    teacher: torch.nn.Module | None = None  # recipe key distill naming a model (distill: fp copies the FP model later)


@dataclass
class RunResult:
    output_dir: Path
    run_info: dict[str, Any]
    push_url: str | None = None
    push_error: str | None = None


def _fp_stage_key(model_args, data_args, training_args, data: ImageClassificationData) -> str:
    """Hash of everything the FP stage result depends on (recipe, data content, class names), so identical recipes
    on identical data reuse it."""
    def absolute(path):
        return os.path.abspath(os.path.expanduser(path)) if path and os.path.exists(os.path.expanduser(path)) else path

    settings = {
        # ``distill`` only concerns the quantized stage: dropped, so adding the key kept earlier results' keys.
        "model": {**{k: v for k, v in dataclasses.asdict(model_args).items() if k != "distill"},
                  "model_name_or_path": absolute(model_args.model_name_or_path),
                  "fp_learning_rate": model_args.fp_learning_rate or training_args.learning_rate,
                  "fp_cache_dir": None, "cache_dir": None, "torch_num_threads": None},
        "data": {**dataclasses.asdict(data_args), "data_dir": absolute(data_args.data_dir), "metric_name": None,
                 "max_eval_samples": None, "test_split": None},
        "training": {name: str(getattr(training_args, name)) for name in FP_STAGE_TRAINING_FIELDS},
        "label_names": data.label_names,
        "data_fingerprint": data_fingerprint(data_args, data),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scratch_image_processor(config):
    """A processor for a model built from scratch: the architecture's own class at the model's image size."""
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not names:
        raise UserInputError(f"model_type {config.model_type!r} has no image processor (recipe key: model_type)")
    # transformers >= 5.2 maps backends to names ({"pil": ...}); 5.1 gives (slow, fast), slow being PIL's.
    name = names.get("pil") or next(iter(names.values())) if isinstance(names, dict) else names[0]
    cls = get_image_processor_class_from_name(name)
    size, default = config.image_size, cls().size
    if (default.get("shortest_edge") if isinstance(default, dict) else getattr(default, "shortest_edge", None)):
        return cls(size={"shortest_edge": size}, crop_pct=1.0)
    return cls(size={"height": size, "width": size})


def _hub_kwargs(model_args: ModelArguments, source: str) -> dict[str, Any]:
    return dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir) if is_hub_id(source) else {}


def _load_fp_model(model_args: ModelArguments, data: ImageClassificationData, source: str | None,
                   cached: bool = False):
    """FP model (and whether its classifier was re-initialised), from ``source`` or from scratch. With ``cached``
    (an FP stage result) any problem is a cache problem, reported without pointing at the recipe."""
    labels = dict(num_labels=len(data.label_names), label2id=data.label2id, id2label=data.id2label)
    if source is None:
        try:
            config = AutoConfig.for_model(model_args.model_type, **labels)
            if model_args.config_overrides:
                config.update_from_string(model_args.config_overrides)
        except ValueError as err:
            key = "model_type" if "model_type" in str(err) or "Unrecognized" in str(err) else "config_overrides"
            raise UserInputError(f"{_first_line(err)} (recipe key: {key})") from None
        return AutoModelForImageClassification.from_config(config), False
    if cached:
        try:
            model = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=False)
        except Exception as err:
            raise UserInputError(_first_line(err)) from None
        if model.config.id2label != data.id2label:
            raise UserInputError(f"its classes {list(model.config.id2label.values())} are not the data's")
        return model, False
    checkpoint_config = _checkpoint_config(model_args, source)
    try:
        model = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **labels,
                                                                trust_remote_code=False,
                                                                **_hub_kwargs(model_args, source))
    except Exception as err:  # missing/corrupt files, offline, unknown id: transformers raises many types
        raise UserInputError(_model_load_error(source, err)) from None
    return model, checkpoint_config.num_labels != len(data.label_names)


def _model_load_error(source: str, err: BaseException) -> str:
    return (f"could not load model {source!r}: {_first_line(err)} (recipe key: model_name_or_path; offline (no "
            "network or HF_HUB_OFFLINE=1) a Hub model must already be in the cache; a local folder needs config.json "
            "and *.safetensors)")


def _checkpoint_config(model_args: ModelArguments, source: str):
    refuse_custom_code(source, "recipe key: model_name_or_path")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False, **_hub_kwargs(model_args, source))
    except Exception as err:
        raise UserInputError(_model_load_error(source, err)) from None


def _load_teacher(model_args: ModelArguments, data: ImageClassificationData, image_shape) -> torch.nn.Module | None:
    """The teacher a ``distill`` model id or folder names, checked against the run's classes and input size before
    its weights are loaded; None for no teacher or ``fp`` (the run's own FP model, copied once it is trained)."""
    source = model_args.distill
    if not source or source == DISTILL_FP:
        return None
    refuse_custom_code(source, "recipe key: distill")
    kwargs = dict(cache_dir=model_args.cache_dir) if is_hub_id(source) else {}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    except Exception as err:
        raise UserInputError(f"could not load teacher {source!r}: {_first_line(err)} (recipe key: distill; 'fp' uses "
                             "the run's own full-precision model)") from None
    _check_teacher_fits(config, source, data, image_shape)
    try:
        return AutoModelForImageClassification.from_pretrained(source, trust_remote_code=False, use_safetensors=True,
                                                               **kwargs)
    except Exception as err:
        raise UserInputError(f"could not load teacher {source!r}: {_first_line(err)} (recipe key: distill; a local "
                             "folder needs config.json and *.safetensors)") from None


def _check_teacher_fits(config, source: str, data: ImageClassificationData, image_shape) -> None:
    """A teacher predicts the data's classes, in its order and under its names, from the student's input size."""
    where = f"teacher {source!r} (recipe key: distill)"
    classes = len(data.label_names)
    if config.num_labels != classes:
        raise UserInputError(f"{where} predicts {config.num_labels} classes and the data has {classes}: distill from "
                             "a model fine-tuned on this run's classes, or use distill: fp")
    names = [str(config.id2label.get(i, config.id2label.get(str(i)))) for i in range(classes)]
    if names != [str(name) for name in data.label_names]:
        raise UserInputError(f"{where} names its classes {_short(names)} and the data {_short(data.label_names)}: "
                             "the teacher must predict the data's classes in the data's order")
    channels, height, width = image_shape
    size = getattr(config, "image_size", None)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size) if isinstance(size, int) else None
    if size is not None and size != (height, width) or getattr(config, "num_channels", channels) != channels:
        takes = f" of {size[0]}x{size[1]}" if size is not None else ""
        raise UserInputError(f"{where} takes {getattr(config, 'num_channels', channels)}-channel images{takes} and "
                             f"this run feeds {channels}x{height}x{width}: distill from a model trained at the "
                             "student's input size")


def _short(names: list) -> str:
    text = ", ".join(map(str, names[:6]))
    return f"[{text}{', ...' if len(names) > 6 else ''}]"


def _named_image_processor(source: str, hub_kwargs: dict[str, Any]):
    """The transformers class ``preprocessor_config.json`` names, loaded directly; ``None`` if it names none. (Some
    releases' ``AutoImageProcessor`` insists on the torchvision backend where the class itself falls back to PIL:
    transformers 5.17 without torchvision.)"""
    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(source, **hub_kwargs)
        cls = getattr(transformers, str(config.get("image_processor_type")), None)
        if isinstance(cls, type) and issubclass(cls, ImageProcessingMixin):
            return cls.from_pretrained(source, **hub_kwargs)
    except Exception:  # noqa: BLE001 - the caller reports AutoImageProcessor's own error
        return None
    return None


def _load_image_processor(source: str, hub_kwargs: dict[str, Any] | None = None):
    refuse_custom_code(source)
    try:
        return AutoImageProcessor.from_pretrained(source, trust_remote_code=False, **(hub_kwargs or {}))
    except Exception as err:
        named = _named_image_processor(source, hub_kwargs or {})
        if named is not None:
            return named
        raise UserInputError(f"could not load the image processor of {source!r}: {_first_line(err)} "
                             "(a run or model folder needs preprocessor_config.json)") from None


WRITER_FILE = "_saq_hf_writer.json"  # in a staging folder while a run writes it; "_*" files are never pushed
CHECKPOINT_PREFIX = "checkpoint-"


def staging_dir(output_dir: str | os.PathLike) -> Path:
    """Where a run builds its folder (checkpoints included) before renaming it to ``output_dir``."""
    output_dir = Path(output_dir).expanduser().absolute()
    return output_dir.with_name(output_dir.name + ".partial")


def _writer_alive(staging: Path) -> int | None:
    """PID of the live process writing ``staging``, or None when nobody is (finished, crashed or killed)."""
    try:
        writer = json.loads((staging / WRITER_FILE).read_text(encoding="utf-8"))
        pid, host = int(writer["pid"]), writer["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return pid  # another machine's process cannot be checked from here: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` looks like something saq-hf or the Trainer wrote, so replacing it loses no user files."""
    markers = (RUN_INFO_NAME, "config.json", "trainer_state.json", "training_args.bin", WRITER_FILE)
    return any((folder / name).exists() for name in markers) or any(folder.glob(CHECKPOINT_PREFIX + "*"))


def _check_writable(folder: Path, key: str) -> None:
    """``folder`` (which may not exist yet) can be created and written: checked by writing a probe file."""
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{key} {str(folder)!r} is a file, not a folder: choose another {key}")
    existing = folder if folder.exists() else folder.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{key} {str(folder)!r} is inside {str(existing)!r}, which is a file: choose another "
                             f"{key}")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".saq_hf_probe_")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserInputError(f"cannot write to {key} {str(folder)!r} ({err.strerror or err} in {str(existing)!r}): "
                             f"choose a writable {key}") from None


def _check_output_dir(args: SAQTrainingArguments) -> None:
    """Refuse to replace a finished run (without ``overwrite_output_dir``), to write where nothing can be written,
    and to share an output_dir with a live run; all before any work."""
    output_dir = Path(args.output_dir).expanduser().absolute()
    staging = staging_dir(output_dir)
    _check_writable(output_dir, "output_dir")
    _check_writable(staging.parent, "output_dir")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        what = "a finished saq-hf run" if (output_dir / RUN_INFO_NAME).is_file() else "files"
        if not args.overwrite_output_dir:
            raise UserInputError(f"output_dir {str(output_dir)!r} already holds {what}: pass --overwrite_output_dir "
                                 "true to replace it, or choose another output_dir")
        if not _is_run_folder(output_dir):
            raise UserInputError(f"output_dir {str(output_dir)!r} holds files that saq-hf did not write, so "
                                 "--overwrite_output_dir will not delete them: choose another output_dir")
    if staging.exists():
        pid = _writer_alive(staging)
        if pid is not None:
            raise UserInputError(f"another saq-hf run (pid {pid}) is writing output_dir {str(output_dir)!r} (in "
                                 f"{str(staging)!r}): wait for it, or choose another output_dir")
        if not args.resume_from_checkpoint and not args.overwrite_output_dir:
            checkpoint = newest_complete_checkpoint(staging, not args.save_only_model)
            if checkpoint is None:
                raise UserInputError(f"{str(staging)!r} holds an interrupted run that saved no complete checkpoint, "
                                     "so it cannot be continued: pass --overwrite_output_dir true to discard it and "
                                     "start over")
            raise UserInputError(f"{str(staging)!r} holds an interrupted run (last complete checkpoint: "
                                 f"{checkpoint.name}): pass --resume_from_checkpoint true to continue it, or "
                                 "--overwrite_output_dir true to discard it")


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` is unreadable (header, or data shorter than the header says), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_size > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(handle.read(header_size))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path.name} is not a readable safetensors file"
    if 8 + header_size + max(ends, default=0) > size:
        return f"{path.name} is truncated"
    return None


def checkpoint_problem(folder: Path, need_optimizer: bool = True) -> str | None:
    """Why the Trainer checkpoint ``folder`` cannot be resumed from (a file missing, truncated or unreadable), or
    None when it is complete. Reads headers and zip directories only; nothing is unpickled."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is not valid JSON"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return "no *.safetensors weights"
    for path in weights:
        problem = _safetensors_problem(path)
        if problem:
            return problem
    states = ("optimizer.pt", "scheduler.pt") if need_optimizer else ()
    for name in states:
        if not (folder / name).is_file():
            return f"no {name}"
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:  # torch.save writes a zip archive: a truncated one has no central directory, a damaged one bad CRCs
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return f"{path.name} is corrupt"
        except (OSError, zipfile.BadZipFile):
            return f"{path.name} is truncated or not a torch file"
    return None


def _checkpoints(folder: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``folder``, newest (highest N) first."""
    steps = {p: p.name[len(CHECKPOINT_PREFIX):] for p in folder.glob(CHECKPOINT_PREFIX + "*") if p.is_dir()}
    return sorted((p for p, step in steps.items() if step.isdigit()), key=lambda p: int(steps[p]), reverse=True)


def newest_complete_checkpoint(folder: Path, need_optimizer: bool = True) -> Path | None:
    """The newest checkpoint of ``folder`` that a run can resume from, or None."""
    return next((c for c in _checkpoints(folder) if checkpoint_problem(c, need_optimizer) is None), None)


def _start_over(args: SAQTrainingArguments) -> str:
    """How to start afresh instead of resuming: the flag that also discards what is in the way, if anything is."""
    output_dir = Path(args.output_dir).expanduser().absolute()
    staging = staging_dir(output_dir)
    in_the_way = (f"the interrupted run in {str(staging)!r}" if staging.exists()
                  else f"the run in {str(output_dir)!r}" if output_dir.is_dir() and any(output_dir.iterdir())
                  else None)
    if in_the_way and not args.overwrite_output_dir:
        return f"drop resume_from_checkpoint and pass --overwrite_output_dir true to discard {in_the_way} and start over"
    return "drop resume_from_checkpoint to start over"


def _resolve_resume_checkpoint(args: SAQTrainingArguments) -> str | None:
    """``resume_from_checkpoint`` as a complete checkpoint folder: ``true`` means the newest complete checkpoint of
    this output_dir (an interrupted run's first); an incomplete one is an error naming what is missing."""
    value = args.resume_from_checkpoint
    if isinstance(value, bool):  # the Trainer's own API takes True for "the newest checkpoint"
        value = str(value).lower()
    if value is None or value.lower() in ("false", "no", "none", ""):
        return None
    need_optimizer = not args.save_only_model
    if value.lower() in ("true", "yes", "latest"):
        output_dir = Path(args.output_dir).expanduser().absolute()
        staging = staging_dir(output_dir)
        candidates = _checkpoints(staging) if staging.is_dir() else []
        candidates = candidates or (_checkpoints(output_dir) if output_dir.is_dir() else [])
        skipped = []
        for folder in candidates:
            problem = checkpoint_problem(folder, need_optimizer)
            if problem is None:
                if skipped:
                    say(f"skipping incomplete checkpoints ({'; '.join(skipped)}); resuming from {folder}")
                return str(folder)
            skipped.append(f"{folder.name}: {problem}")
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise UserInputError(f"no complete checkpoint to resume from in {str(output_dir)!r}{detail}: "
                             f"{_start_over(args)}")
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"resume_from_checkpoint {value!r} is not a folder (recipe key: resume_from_checkpoint;"
                             " true resumes from the newest checkpoint of output_dir)")
    problem = checkpoint_problem(folder, need_optimizer)
    if problem:
        raise UserInputError(f"checkpoint {value!r} is incomplete ({problem}; interrupted while saving?): pass an "
                             "earlier checkpoint, or resume_from_checkpoint true for the newest complete one")
    return str(folder.absolute())


def interrupted(args: SAQTrainingArguments, command) -> str:
    """The line to print when a run is stopped (Ctrl-C): what it kept, and the exact commands that continue it (from
    its last complete checkpoint, if any) or discard it and start over. ``command(*flags)`` is the command that
    was run, without resume_from_checkpoint, plus ``flags``. Ends this process's claim on the staging folder."""
    staging = staging_dir(args.output_dir)
    if not staging.is_dir():
        return "interrupted before the run wrote anything"
    writer = staging / WRITER_FILE
    if _writer_alive(staging) == os.getpid():
        writer.unlink(missing_ok=True)
    start_over = f"start over with: rm -r {shlex.quote(str(staging))} && {command()}"
    checkpoint = newest_complete_checkpoint(staging, not args.save_only_model)
    if checkpoint is None:
        return f"interrupted; the unfinished run in {staging} saved no checkpoint to continue from; {start_over}"
    return (f"interrupted; the unfinished run is kept in {staging} (last complete checkpoint: {checkpoint.name}); "
            f"continue it with: {command('--resume_from_checkpoint', 'true')}; or {start_over}")


def _check_device_precision(args: SAQTrainingArguments) -> None:
    if args.fp16 and args.device.type == "cpu":
        raise UserInputError("fp16 mixed precision needs a GPU and this run trains on the CPU, where it would do "
                             "nothing: drop fp16, or use bf16 (recipe key: fp16)")


def _check_quantizable(model: torch.nn.Module, quant_args: QuantArguments) -> dict[str, Any] | None:
    """The quantization settings applied to the FP model leave something to quantize and every pattern matches;
    a bits plan names exactly the model's layers and meets its budget. Returns the plan's allocation (or None)."""
    from .quantize import resolve_defaults
    from .search import check_plan

    plan = None
    if quant_args.plan is not None:
        try:
            plan = {"file": str(quant_args.bits_plan), **check_plan(quant_args.plan, model, quant_args.bits_plan)}
        except ValueError as err:
            raise UserInputError(f"{_first_line(err)} (recipe key: bits_plan)") from None
    try:
        planned_layers(model, resolve_defaults(model, quant_args.quant_config()))
    except ValueError as err:
        raise UserInputError(f"{_first_line(err)} (recipe key: modules_to_not_convert)") from None
    return plan


def prepare(model_args: ModelArguments, data_args: DataArguments, quant_args: QuantArguments,
            training_args: SAQTrainingArguments) -> RunSetup:
    """Load and check everything a run needs; raises :class:`UserInputError` and writes nothing (but a probe file,
    removed at once, that shows output_dir and fp_cache_dir can be written)."""
    check_training_args(training_args)
    _check_device_precision(training_args)
    if training_args.should_save:  # the main process: it alone writes output_dir
        _check_output_dir(training_args)
    training_args.resume_from_checkpoint = _resolve_resume_checkpoint(training_args)
    if model_args.torch_num_threads is not None:
        torch.set_num_threads(model_args.torch_num_threads)
    set_seed(training_args.seed)  # before any model is built: a from-scratch init (or a new head) is random
    if training_args.remove_unused_columns:
        raise UserInputError("remove_unused_columns must be false: images are transformed on the fly "
                             "(set_transform) from the image column")
    try:
        metric = load_metric(data_args.metric_name)
    except Exception as err:
        raise UserInputError(f"could not load metric {data_args.metric_name!r}: {_first_line(err)} "
                             "(recipe key: metric_name)") from None
    checkpoint = model_args.model_name_or_path
    image_processor = None
    if checkpoint:  # before the dataset, which may be a long download: a wrong model id fails in seconds
        checkpoint_config = _checkpoint_config(model_args, checkpoint)
        if getattr(checkpoint_config, "quantization_config", None) is not None:
            raise UserInputError(f"model_name_or_path {checkpoint!r} is already quantized: start from its "
                                 "full-precision model (a finished run's saq_run.json names it as fp_model) "
                                 "(recipe key: model_name_or_path)")
        image_processor = _load_image_processor(checkpoint, _hub_kwargs(model_args, checkpoint))
    data = load_image_data(data_args, seed=training_args.seed, cache_dir=model_args.cache_dir)

    fp_dir, fp_cached = None, False
    if model_args.fp_stage:
        key = _fp_stage_key(model_args, data_args, training_args, data)
        fp_dir = Path(os.path.expanduser(model_args.fp_cache_dir)) / key
        fp_cached = (fp_dir / "config.json").is_file()
        _check_writable(fp_dir.parent, "fp_cache_dir")
    model = None
    if fp_cached:
        try:
            model, head_reinitialised = _load_fp_model(model_args, data, str(fp_dir), cached=True)
        except UserInputError as err:
            say(f"the cached full-precision model {fp_dir} is unreadable ({err}); it will be rebuilt")
            fp_cached = False
    if model is None:
        model, head_reinitialised = _load_fp_model(model_args, data, model_args.model_name_or_path)
    bits_plan = _check_quantizable(model, quant_args)
    if image_processor is None:
        image_processor = _scratch_image_processor(model.config)
    with_transforms(data, image_processor, data_args)
    teacher = None
    if model_args.distill == DISTILL_FP and head_reinitialised and not model_args.fp_stage:
        raise UserInputError("distill: fp teaches with the run's full-precision model, whose classifier was just "
                             "re-initialised for this dataset (no FP stage): set fp_num_train_epochs or fp_max_steps, "
                             "or name a fine-tuned teacher (recipe key: distill)")
    if model_args.distill:
        # The eval transform: one image's shape, without drawing from the training augmentation's random stream.
        split = data.validation if data.validation is not None else data.train
        teacher = _load_teacher(model_args, data, tuple(split[0]["pixel_values"].shape))

    hub_repo_id = None
    if training_args.push_to_hub:
        hub_repo_id = training_args.hub_model_id or Path(training_args.output_dir).absolute().name
        try:  # before training, so a bad token or no network costs seconds, not a training run
            hub_repo_id = create_repo(hub_repo_id, token=training_args.hub_token,
                                      private=training_args.hub_private_repo)
        except Exception as err:
            raise UserInputError(f"cannot create Hub repo {hub_repo_id!r}: {_first_line(err)}; log in (hf auth login)"
                                 " or drop push_to_hub and push the finished run with saq-hf push") from None
    return RunSetup(model_args, data_args, quant_args, training_args, data, image_processor, model, metric,
                    fp_dir, fp_cached, head_reinitialised, hub_repo_id, bits_plan, teacher)


def _train_full_precision(setup: RunSetup) -> None:
    """FP stage: train the loaded model with a stock Trainer and keep the result in ``setup.fp_dir``."""
    model_args, args = setup.model_args, setup.training_args
    partial = setup.fp_dir.with_name(f"{setup.fp_dir.name}.partial-{os.getpid()}")
    fp_args = dataclasses.replace(
        args, output_dir=str(partial), num_train_epochs=model_args.fp_num_train_epochs,
        max_steps=model_args.fp_max_steps, learning_rate=model_args.fp_learning_rate or args.learning_rate,
        save_strategy="no", load_best_model_at_end=False, push_to_hub=False, resume_from_checkpoint=None,
    )
    trainer = Trainer(model=setup.model, args=fp_args, train_dataset=setup.data.train,
                      eval_dataset=setup.data.validation, compute_metrics=compute_metrics_fn(setup.metric),
                      data_collator=collate_fn, processing_class=setup.image_processor)
    show_stage_progress(trainer, "full precision", log_stage="full_precision")
    try:
        trainer.train()
        if fp_args.should_save:
            trainer.save_model(str(partial))
            follow_umask(*partial.rglob("*.safetensors"))
            _replace_folder(partial, setup.fp_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``, replacing what is there: each rename is atomic, so ``target`` is always either
    the old folder or the new one, never a mix."""
    if target.exists():
        trash = target.with_name(f"{target.name}.replaced-{os.getpid()}")
        os.rename(target, trash)
        os.rename(new, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, target)


def _claim_staging(setup: RunSetup) -> Path:
    """Create (or, to resume an interrupted run, take over) the staging folder; ``mkdir`` is atomic, so of two runs
    started into one output_dir only one gets it."""
    args = setup.training_args
    output_dir = Path(args.output_dir).expanduser().absolute()
    staging = staging_dir(output_dir)
    resume = args.resume_from_checkpoint
    if not args.should_save:
        return staging
    resuming_here = resume is not None and staging.is_dir() and Path(resume).parent == staging
    if staging.exists() and not resuming_here:
        pid = _writer_alive(staging)
        if pid is not None or not args.overwrite_output_dir:
            who = f"another saq-hf run (pid {pid})" if pid else "another saq-hf run"
            raise UserInputError(f"{who} is writing output_dir {str(output_dir)!r} (in {str(staging)!r}): wait for "
                                 "it, or choose another output_dir")
        shutil.rmtree(staging)
    if not resuming_here:
        try:
            staging.mkdir(parents=True)
        except FileExistsError:
            raise UserInputError(f"another saq-hf run is writing output_dir {str(output_dir)!r} (in "
                                 f"{str(staging)!r}): wait for it, or choose another output_dir") from None
        if resume is not None and Path(resume).parent == output_dir:
            # Resuming a finished run: its checkpoints move into the new folder with it, none is lost.
            for checkpoint in _checkpoints(output_dir):
                shutil.copytree(checkpoint, staging / checkpoint.name)
            args.resume_from_checkpoint = str(staging / Path(resume).name)
    (staging / WRITER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                       encoding="utf-8")
    return staging


def _finish_run_folder(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to ``output_dir`` (replacing a previous run only with overwrite)."""
    (staging / WRITER_FILE).unlink(missing_ok=True)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserInputError(f"output_dir {str(output_dir)!r} was filled by something else during training; this "
                             f"run is complete in {str(staging)!r}: move it where you want it")
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    _replace_folder(staging, output_dir)


def _calibration_batches(setup: RunSetup):
    args = setup.training_args
    loader = torch.utils.data.DataLoader(setup.data.train, batch_size=args.per_device_train_batch_size, shuffle=True,
                                         collate_fn=collate_fn, generator=torch.Generator().manual_seed(args.seed))
    device = args.device
    for batch in itertools.islice(loader, setup.quant_args.calibration_batches):
        yield {"pixel_values": batch["pixel_values"].to(device)}


def _run_info(setup: RunSetup, results: dict, train_runtime: float, global_step: int) -> dict[str, Any]:
    args, quant_config = setup.training_args, setup.model.config.quantization_config
    # The FP model `eval` can score: the FP stage's result, or the checkpoint itself when its head fits the data.
    fp_model = (str(setup.fp_dir) if setup.fp_dir is not None
                else None if setup.head_reinitialised else setup.model_args.model_name_or_path)
    return {
        "saq_hf_version": __version__,
        "run_name": Path(args.output_dir).name,
        "base_model": setup.model_args.model_name_or_path,
        "fp_stage": setup.model_args.fp_stage,
        "fp_model": fp_model,
        "hub_model_id": setup.hub_repo_id or args.hub_model_id,
        "model": dataclasses.asdict(setup.model_args),
        "data": dataclasses.asdict(setup.data_args),
        # A plan's layers do not share one bit-width: the tag gives its average weight bits.
        "quantization": {**quant_config.to_dict(),
                         "tag": f"W{setup.bits_plan['average_bits']:.2f}-mixed" if setup.bits_plan else quant_config.tag,
                         "calibration_batches": setup.quant_args.calibration_batches,
                         **({"bits_plan": setup.bits_plan} if setup.bits_plan else {})},
        "saq": {name: getattr(args, name) for name in SAQ_FIELDS},
        "training": {**{name: getattr(getattr(args, name), "value", getattr(args, name)) for name in TRAINING_FIELDS},
                     "global_steps": global_step, "train_runtime_s": round(train_runtime, 1)},
        "results": results,
        "distillation": None,
    }


def _distillation_info(setup: RunSetup, trainer: SAQTrainer, fp_model: str | None) -> dict[str, Any] | None:
    """What taught the quantized model: the teacher, its sha256 and the loss settings; None without a teacher."""
    distiller = trainer.distiller
    if distiller is None:
        return None
    source = setup.model_args.distill
    return {"distill": source, "teacher": fp_model if source == DISTILL_FP else source,
            "teacher_sha256": distiller.fingerprint, "distill_alpha": distiller.alpha,
            "distill_temperature": distiller.temperature}


def train(setup: RunSetup) -> RunResult:
    """Run a prepared recipe: FP stage (or its cache), quantize, calibrate, SAQ training, report, save, push.

    The run folder is built beside ``output_dir`` (``<output_dir>.partial``, checkpoints included) and renamed to
    ``output_dir`` when complete, so ``output_dir`` never holds a half-written or mixed run.
    """
    args, data = setup.training_args, setup.data
    output_dir = Path(args.output_dir).expanduser().absolute()
    staging = _claim_staging(setup)
    report_name, report_split = data.report_split
    _warn_if_small(report_name, report_split.num_rows)
    eval_batch = args.per_device_eval_batch_size
    if setup.model_args.fp_stage and not setup.fp_cached:
        say(f"full-precision stage -> {setup.fp_dir}")
        _train_full_precision(setup)
    elif setup.fp_cached:
        say(f"reusing the full-precision model cached at {setup.fp_dir}")
    elif setup.head_reinitialised:
        say("warning: the checkpoint's classifier was re-initialised for this dataset and there is no FP stage "
             "(fp_num_train_epochs: 0), so the FP accuracy below is that of a random head")

    model = setup.model.to(args.device)
    results: dict[str, Any] = {"split": report_name, "num_examples": report_split.num_rows}
    results["fp"] = evaluate_classifier(model, report_split, setup.metric, collate_fn, eval_batch)
    # distill: fp: the full-precision model as it is now (trained, not yet quantized) teaches the quantized one.
    teacher = copy.deepcopy(model) if setup.model_args.distill == DISTILL_FP else setup.teacher
    quantize_model(model, setup.quant_args.quant_config())
    # Calibration crops draw from Python's RNG: reseed so a run from the cached FP model matches a fresh one.
    set_seed(args.seed)
    if setup.quant_args.calibration_batches:
        calibrate(model, _calibration_batches(setup))
        results["quantized_calibrated"] = evaluate_classifier(model, report_split, setup.metric, collate_fn,
                                                              eval_batch)
    taught = f", distilled from {setup.model_args.distill}" if teacher is not None and args.distill_alpha > 0 else ""
    say(f"quantized to {model.config.quantization_config.tag}; {args.saq_mode} training{taught}")

    # With hub_strategy "end" saq-hf pushes the finished folder itself (with its own card); with the
    # checkpoint strategies the Trainer also pushes checkpoints as they are saved.
    trainer_args = dataclasses.replace(args, output_dir=str(staging),
                                       push_to_hub=args.push_to_hub and args.hub_strategy != "end")
    trainer = SAQTrainer(model=model, args=trainer_args, train_dataset=data.train, eval_dataset=data.validation,
                         compute_metrics=compute_metrics_fn(setup.metric), data_collator=collate_fn,
                         processing_class=setup.image_processor, teacher_model=teacher)
    show_stage_progress(trainer, f"{model.config.quantization_config.tag} {args.saq_mode}", log_stage="quantized",
                        earlier=read_train_log(setup.fp_dir) if setup.fp_dir is not None else None)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=trainer_args.resume_from_checkpoint)
    train_runtime = time.perf_counter() - started
    results["quantized"] = evaluate_classifier(trainer.model, report_split, setup.metric, collate_fn, eval_batch)

    # _internal_call: save without Trainer.push_to_hub, which would replace our card with its own.
    trainer.save_model(str(staging), _internal_call=True)
    run_info = _run_info(setup, results, train_runtime, train_output.global_step)
    run_info["distillation"] = _distillation_info(setup, trainer, run_info["fp_model"])
    if args.saq_mode != "qat":
        # The radius the run trained with: with rho="auto", the last one the rule set (its run mean: rho_auto).
        run_info["saq"]["rho_used"] = trainer.rho
        if getattr(trainer, "rho_auto_measurement", None):
            run_info["saq"]["rho_auto"] = trainer.rho_auto_measurement
        # The first SAQ optimizer step (saq_start_ratio): the steps before it were plain QAT; None: SAQ never started
        # (a model that started untrained and never fitted).
        run_info["saq"]["start_step"] = None if trainer.saq_start_step == WAITING else trainer.saq_start_step
    result = RunResult(output_dir=Path(args.output_dir), run_info=run_info)
    if args.should_save:
        (staging / RUN_INFO_NAME).write_text(json.dumps(run_info, indent=2, default=str) + "\n", encoding="utf-8")
        write_model_card(staging, repo_id=setup.hub_repo_id)
        follow_umask(*staging.rglob("*.safetensors"))
        _finish_run_folder(staging, output_dir, args.overwrite_output_dir)
        if setup.hub_repo_id:
            try:
                result.push_url = push_run_folder(output_dir, setup.hub_repo_id, token=args.hub_token,
                                                  private=args.hub_private_repo, revision=args.hub_revision,
                                                  commit_message="End of training")
            except PushError as err:
                result.push_error = str(err)
    return result


def evaluate_run(run_dir: str | os.PathLike, dataset_name: str | None = None, data_dir: str | None = None,
                 split: str | None = None, batch_size: int = 64, max_eval_samples: int | None = None,
                 sharpness: bool = False, sharpness_rho: float = 0.05,
                 sharpness_batches: int = 4) -> dict[str, Any]:
    """Top-1/top-5 of a run folder's quantized model, and of its FP model when the run recorded a usable one.

    Defaults to the run's own dataset and report split (``saq_run.json``); ``dataset_name``/``data_dir``
    evaluate on another dataset with the same classes. With ``sharpness`` the quantized model's
    :func:`saq_hf.landscape.sharpness_report` on the first ``sharpness_batches`` batches of the split is
    added as ``results["sharpness"]``, stored in ``saq_run.json`` and written into the model card.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"--batch_size must be an integer >= 1, got {batch_size}")
    if max_eval_samples is not None and max_eval_samples < 1:
        raise UserInputError(f"--max_eval_samples must be >= 1, got {max_eval_samples}")
    if not math.isfinite(sharpness_rho) or sharpness_rho < 0:
        raise UserInputError(f"--sharpness_rho must be a finite number >= 0, got {sharpness_rho}")
    if not isinstance(sharpness_batches, int) or sharpness_batches < 1:
        raise UserInputError(f"--sharpness_batches must be an integer >= 1, got {sharpness_batches}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(f"run folder {str(run_dir)!r} not found")
    refuse_custom_code(str(run_dir))
    if not (run_dir / "config.json").is_file() or not any(run_dir.glob("*.safetensors")):
        raise UserInputError(f"{str(run_dir)!r} holds no model (no config.json with *.safetensors weights): pass the "
                             "output_dir of a finished saq-hf run")
    has_info = (run_dir / RUN_INFO_NAME).is_file()
    info = read_run_info(run_dir) if has_info else {}
    if not has_info and not (dataset_name or data_dir):
        raise UserInputError(f"{str(run_dir)!r} has no {RUN_INFO_NAME}: pass --dataset (and --split)")
    data_fields = dict(info.get("data", {}))
    if dataset_name or data_dir:
        data_fields.update(dataset_name=dataset_name, data_dir=data_dir, dataset_config_name=None)
    data_fields["max_eval_samples"] = max_eval_samples or data_fields.get("max_eval_samples")
    try:
        data_args = DataArguments(**data_fields)
    except (ValueError, TypeError) as err:
        raise UserInputError(f"{_first_line(err)} (in the data settings of {RUN_INFO_NAME})") from None
    if split is not None and split != data_args.validation_split:
        data_args.test_split = split
    data = load_image_data(data_args, seed=info.get("training", {}).get("seed", 42))
    processor = _load_image_processor(str(run_dir))
    with_transforms(data, processor, data_args)
    if split is None:
        split_name, dataset = data.report_split
    elif split == data_args.validation_split:
        split_name, dataset = split, data.validation
    elif data.test is None:
        raise UserInputError(f"dataset has no split {split!r}; pass --split with one of its splits")
    else:
        split_name, dataset = split, data.test

    models = {"quantized": str(run_dir)}  # first: a broken run folder fails before any other work
    fp_model = info.get("fp_model")
    results: dict[str, Any] = {"split": split_name, "num_examples": dataset.num_rows}
    if fp_model and (os.path.isdir(fp_model) or is_hub_id(fp_model)):
        models["fp"] = fp_model
    else:  # the table says why the FP row is missing
        results["fp_missing"] = (f"{fp_model} no longer exists (FP cache cleared?); rerun the recipe to rebuild it"
                                 if fp_model else "the run has no FP model of these classes (new head, no FP stage)")
    metric = load_metric(data_args.metric_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_info = info.get("model", {})
    for name, source in models.items():
        hub_kwargs = (dict(revision=model_info.get("model_revision"), cache_dir=model_info.get("cache_dir"))
                      if is_hub_id(source) else {})
        try:
            if name == "fp":
                refuse_custom_code(source)
            model = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=False, **hub_kwargs)
        except Exception as err:
            if name == "fp":  # the FP model is a bonus: a cache that was cleared or no network skips it
                results["fp_missing"] = f"{source} could not be loaded: {_first_line(err)}"
                continue
            raise UserInputError(f"could not load the model in {str(run_dir)!r}: {_first_line(err)}") from None
        if name == "quantized":
            quant_config = getattr(model.config, "quantization_config", None)
            if not is_quantized(model) or quant_config is None:
                raise UserInputError(f"the model in {str(run_dir)!r} is not quantized (no saq quantization_config in "
                                     "its config.json): not a saq-hf run folder")
            tag = quant_config.tag
        if model.config.num_labels != len(data.label_names):
            raise UserInputError(f"the model predicts {model.config.num_labels} classes but the dataset has "
                                 f"{len(data.label_names)}: evaluate on a dataset with the model's classes")
        results[name] = evaluate_classifier(model.to(device), dataset, metric, collate_fn, batch_size)
        if name == "quantized" and sharpness:
            batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
            with forward_pass_bar(model, sharpness_passes(min(sharpness_batches, len(batches))), "sharpness"):
                results["sharpness"] = sharpness_report(model, batches, rho=sharpness_rho,
                                                        max_batches=sharpness_batches)
    results["tag"] = tag
    results["dataset"] = data_args.dataset_name
    if "sharpness" in results and has_info:
        info["sharpness"] = {**results["sharpness"], "split": split_name, "dataset": data_args.dataset_name}
        # Beside the file, then renamed over it: an interrupted eval leaves the old saq_run.json, never half of one.
        partial = run_dir / f"_{RUN_INFO_NAME}.partial-{os.getpid()}"
        partial.write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(partial, run_dir / RUN_INFO_NAME)
        write_model_card(run_dir, repo_id=info.get("hub_model_id"))
    _warn_if_small(split_name, dataset.num_rows)  # once the numbers exist: a failed eval stays one error line
    return results


def format_sharpness(report: dict[str, Any], saq: dict[str, Any] | None = None) -> str:
    """Sharpness numbers of :func:`saq_hf.landscape.sharpness_report` as a short table, with what its ρ means next to
    the training radius of ``saq`` (the run's ``saq`` settings), which is another quantity."""
    rows = [("loss", report["loss"]), ("top Hessian eigenvalue (w.r.t. Q(w))", report["top_eigenvalue"]),
            (f"loss increase, random ε (rho={report['rho']:g})", report["random_loss_increase"]),
            (f"loss increase, adversarial ε (rho={report['rho']:g})", report["adversarial_loss_increase"])]
    width = max(len(name) for name, _ in rows)
    meaning = (f"rho={report['rho']:g} here is the measuring radius: one ε of L2 norm {report['rho']:g} over all "
               f"quantized weights Q(w) (||Q(w)|| = {report['quantized_weight_norm']:.4g}), the same for every run so "
               "that runs compare")
    trained = (saq or {}).get("rho_used", (saq or {}).get("rho"))
    if isinstance(trained, (int, float)) and (saq or {}).get("saq_mode") != "qat":
        relative = (saq or {}).get("saq_radius", "relative") == "relative"
        meaning += (f"; training used rho={trained:g}, " + (f"relative: each perturbed tensor moved by {100 * trained:g} %"
                                                           " of its own norm" if relative else "absolute: one global ε"))
    return "\n".join([f"sharpness on {report['n_samples']} images"]
                     + [f"{name:<{width}}  {value:10.4f}" for name, value in rows] + [meaning])


def format_results(results: dict[str, Any], tag: str) -> str:
    """The summary table: one row per evaluated model, top-1 and top-5 in percent."""
    labels = {"fp": "full precision", "quantized_calibrated": f"{tag} calibrated, no training",
              "quantized": f"{tag} after training"}
    rows = [(label, results.get(key)) for key, label in labels.items()
            if key in results or (key == "fp" and "fp_missing" in results)]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'model':<{width}}  top-1 %  top-5 %"]
    for label, scores in rows:
        if scores is None:
            lines.append(f"{label:<{width}}      n/a      n/a  ({results['fp_missing']})")
            continue
        top5 = scores.get("top5_accuracy")
        lines.append(f"{label:<{width}}  {100 * scores['accuracy']:7.2f}  "
                     + (f"{100 * top5:7.2f}" if top5 is not None else "    n/a"))
    return "\n".join(lines)


__all__ = ["RunResult", "RunSetup", "evaluate_run", "format_results", "prepare", "train"]


def search_run(source: str, out: str | os.PathLike, *, target_bits: float | None = None,
               target_bytes: int | None = None, measure: str = "sharpness", candidates=(2, 3, 4, 8),
               dataset_name: str | None = None, data_dir: str | None = None, batches: int = 4, batch_size: int = 32,
               rho: float = 0.002, weights_only: bool = False, seed: int = 42):
    """``saq-hf search``: a bits plan for the model in ``source`` (a run folder or a saved model folder) measured on
    ``batches`` training batches of its dataset (the run's, or ``dataset_name``/``data_dir``), written as YAML to
    ``out``. Every check (budget included) runs before the data is loaded. Returns the :class:`BitsPlan`."""
    from .search import check_budget, search_bits

    if not isinstance(batches, int) or batches < 1:
        raise UserInputError(f"--batches must be an integer >= 1, got {batches}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"--batch_size must be an integer >= 1, got {batch_size}")
    out = Path(out)
    if out.is_dir():
        raise UserInputError(f"--out {str(out)!r} is a folder: name the plan file to write (e.g. bits_plan.yaml)")
    folder = Path(os.path.expanduser(source))
    if not (folder / "config.json").is_file():
        raise UserInputError(f"{source!r} holds no model (no config.json): pass a saq-hf run folder or a saved model "
                             "folder")
    refuse_custom_code(str(folder))
    info = read_run_info(folder) if (folder / RUN_INFO_NAME).is_file() else {}
    if not info and not (dataset_name or data_dir):
        raise UserInputError(f"{source!r} has no {RUN_INFO_NAME}: pass --dataset (and --data_dir) to search on")
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:
        raise UserInputError(f"could not load the model in {source!r}: {_first_line(err)}") from None
    try:
        check_budget(model, target_bits=target_bits, target_bytes=target_bytes, candidates=list(candidates),
                     measure=measure)
    except ValueError as err:
        raise UserInputError(_first_line(err)) from None
    data_fields = dict(info.get("data", {}))
    if dataset_name or data_dir:
        data_fields.update(dataset_name=dataset_name, data_dir=data_dir, dataset_config_name=None)
    try:
        data_args = DataArguments(**data_fields)
    except (ValueError, TypeError) as err:
        raise UserInputError(f"{_first_line(err)} (data settings)") from None
    data = load_image_data(data_args, seed=seed)
    processor = (_load_image_processor(str(folder)) if (folder / "preprocessor_config.json").is_file()
                 else _scratch_image_processor(model.config))
    with_transforms(data, processor, data_args)
    loader = torch.utils.data.DataLoader(data.train, batch_size=batch_size, shuffle=True, collate_fn=collate_fn,
                                         generator=torch.Generator().manual_seed(seed))
    train_batches = [{"pixel_values": b["pixel_values"], "labels": b["labels"]}
                     for b in itertools.islice(loader, batches)]
    plan = search_bits(model, train_batches, target_bits=target_bits, target_bytes=target_bytes, measure=measure,
                       candidates=list(candidates), activations=False if weights_only else None, rho=rho,
                       max_batches=batches, seed=seed)
    plan.extra["source"] = str(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(plan.to_yaml(), encoding="utf-8")
    return plan
