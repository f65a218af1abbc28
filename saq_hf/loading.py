"""Loading a run's inputs from a model id or folder: the full-precision model (or one built from scratch), the
distillation teacher (checked against the run's classes and input size) and the image processor."""

from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
from transformers.image_processing_base import ImageProcessingMixin
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from .args import ModelArguments, UserInputError
from .data import ImageClassificationData
from .hub import is_hub_id, refuse_custom_code

DISTILL_FP = "fp"  # recipe key distill: the run's own full-precision model teaches the quantized one


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:200]


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
