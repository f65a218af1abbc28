"""Recipe fields: ``ModelArguments``, ``DataArguments``, ``QuantArguments``, and the recipe parser.

A recipe is a flat YAML file whose keys are the field names of these dataclasses and of
``SAQTrainingArguments`` (alignment-handbook style); ``--field value`` flags override the file.
"""

import dataclasses
import difflib
import enum
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .config import QuantConfig

DEMO_DATASET = "demo_digits"


class UserInputError(Exception):
    """Bad recipe, flag, dataset or checkpoint. The message is one line that says what to change."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub model id or local folder of the full-precision model; empty to build model_type "
                          "from scratch."},
    )
    model_type: str | None = field(
        default=None, metadata={"help": "Architecture built from scratch when model_name_or_path is empty (e.g. vit)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config changes for a from-scratch model, e.g. 'image_size=28,patch_size=4' "
                          "(transformers' run_mlm convention)."},
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub models and datasets are cached."})
    fp_num_train_epochs: float = field(
        default=0.0,
        metadata={"help": "Epochs of full-precision training before quantization (0: use the checkpoint as is)."},
    )
    fp_max_steps: int = field(
        default=-1, metadata={"help": "If > 0, full-precision training steps (overrides fp_num_train_epochs)."}
    )
    fp_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the full-precision stage (default: learning_rate)."}
    )
    fp_cache_dir: str = field(
        default="~/.cache/saq_hf/fp_models",
        metadata={"help": "Where full-precision stage results are kept and reused by identical recipes."},
    )
    distill: str | None = field(
        default=None,
        metadata={"help": "Teacher of the quantized training (distillation; distill_alpha and distill_temperature "
                          "set the loss): 'fp', the run's own full-precision model (the FP stage's result, or the "
                          "checkpoint itself without an FP stage); a Hub model id or local folder of an image "
                          "classifier with this run's classes, label names and input size; empty: no teacher, the "
                          "labels alone. saq_run.json and the model card name the teacher."},
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (torch.set_num_threads); null: torch's default. 1 is fastest for "
                          "tiny models, whose matrices are too small to split across cores."},
    )

    def __post_init__(self):
        if not self.model_name_or_path and not self.model_type:
            raise ValueError("set model_name_or_path (a Hub id or a local folder) or model_type (to train from "
                             "scratch)")
        if self.model_name_or_path and self.config_overrides:
            raise ValueError("config_overrides only applies to a model built from scratch: drop model_name_or_path "
                             "or config_overrides")
        if self.fp_num_train_epochs < 0:
            raise ValueError(f"fp_num_train_epochs must be >= 0, got {self.fp_num_train_epochs}")
        if self.fp_learning_rate is not None and self.fp_learning_rate <= 0:
            raise ValueError(f"fp_learning_rate must be > 0, got {self.fp_learning_rate}")
        if self.torch_num_threads is not None and self.torch_num_threads < 1:
            raise ValueError(f"torch_num_threads must be >= 1 or null, got {self.torch_num_threads}")
        if not self.model_name_or_path and not self.fp_stage:
            raise ValueError("a model built from scratch needs full-precision training first: set "
                             "fp_num_train_epochs or fp_max_steps")

    @property
    def fp_stage(self) -> bool:
        """Whether the run trains the full-precision model before quantizing it."""
        return self.fp_max_steps > 0 or self.fp_num_train_epochs > 0


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset id, 'imagefolder' (with data_dir), or '{DEMO_DATASET}' (bundled offline "
                          "MNIST digits)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of a Hub dataset."})
    data_dir: str | None = field(
        default=None, metadata={"help": "imagefolder root: class folders, or train/validation/test folders of them."}
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(
        default="validation",
        metadata={"help": "Split evaluated during training; carved from train_split when the dataset lacks it."},
    )
    test_split: str | None = field(
        default="test",
        metadata={"help": "Split of the final FP vs quantized report when present (else validation_split)."},
    )
    train_val_split: float = field(
        default=0.1, metadata={"help": "Fraction of train_split held out when the dataset has no validation split."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the class labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Truncate the validation and test sets (debugging)."}
    )
    random_crop_min_scale: float = field(
        default=0.08, metadata={"help": "Smallest area fraction of the training random resized crop (1: no crop)."}
    )
    random_flip: bool = field(default=True, metadata={"help": "Random horizontal flips in training."})
    metric_name: str | None = field(
        default=None,
        metadata={"help": "evaluate metric id or path; default: the shipped top-1/top-5 accuracy module."},
    )

    def __post_init__(self):
        if self.dataset_name is None and self.data_dir is not None:
            self.dataset_name = "imagefolder"
        if self.dataset_name is None:
            raise ValueError(f"set dataset_name (a Hub id, 'imagefolder' with data_dir, or '{DEMO_DATASET}')")
        if self.dataset_name == "imagefolder" and not self.data_dir:
            raise ValueError("dataset_name 'imagefolder' needs data_dir (a folder of class sub-folders)")
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"train_val_split must be in (0, 1), got {self.train_val_split}")
        if not 0 < self.random_crop_min_scale <= 1:
            raise ValueError(f"random_crop_min_scale must be in (0, 1], got {self.random_crop_min_scale}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class QuantArguments:
    w_bits: int = field(default=4, metadata={"help": "Weight bit-width, 2..8."})
    a_bits: int | None = field(default=4, metadata={"help": "Activation bit-width, 2..8; null for weights only."})
    per_channel: bool = field(default=True, metadata={"help": "One weight step size per output channel."})
    modules_to_not_convert: list[str] | None = field(
        default=None, metadata={"help": "Module-name patterns that stay in floating point."}
    )
    calibration_batches: int = field(
        default=4,
        metadata={"help": "Training batches that initialise activation step sizes before training (0: the first "
                          "training batch does)."},
    )
    bits_plan: str | None = field(
        default=None,
        metadata={"help": "YAML file from saq-hf search: one bit-width per layer (mixed precision under a size "
                          "budget); its bits replace w_bits/a_bits for the layers it names."},
    )

    def __post_init__(self):
        from .search import read_plan

        self.plan = read_plan(self.bits_plan) if self.bits_plan is not None else None
        self.quant_config()
        if self.calibration_batches < 0:
            raise ValueError(f"calibration_batches must be >= 0, got {self.calibration_batches}")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(w_bits=self.w_bits, a_bits=self.a_bits, per_channel=self.per_channel,
                           modules_to_not_convert=self.modules_to_not_convert,
                           bits_overrides=dict(self.plan["bits_overrides"]) if self.plan else None)


def _field_types(dataclass_types) -> dict[str, Any]:
    types_by_name = {}
    for dtype in dataclass_types:
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if f.init:
                types_by_name[f.name] = hints.get(f.name, f.type)
    return types_by_name


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        nullable = " or null" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_type_name(a) for a in args) + nullable
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


_NO_MATCH = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``, or ``_NO_MATCH``. Strings (command-line values, or YAML scalars such as
    ``1e-4`` that PyYAML reads as text) are converted; other values must already have the type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        # "none" is a real value of some string fields (report_to), so only YAML's "null" always means None.
        if value is None or value == "null" or (value in ("none", "None") and str not in members):
            return None if type(None) in members else _NO_MATCH
        for member in sorted((m for m in members if m is not type(None)), key=lambda m: m is str):  # "5": int first
            coerced = _coerce(value, member)
            if coerced is not _NO_MATCH:
                return coerced
        return _NO_MATCH
    if origin is typing.Literal:
        return value if value in typing.get_args(tp) else _NO_MATCH
    if origin is list or tp is list:
        (item_type,) = typing.get_args(tp) or (Any,)
        items = value if isinstance(value, list) else [value]
        coerced = [_coerce(item, item_type) for item in items]
        return _NO_MATCH if _NO_MATCH in coerced else coerced
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _NO_MATCH
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        return _NO_MATCH
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return _NO_MATCH
        return _NO_MATCH
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO_MATCH
        return _NO_MATCH
    if tp is str:
        return value if isinstance(value, str) else _NO_MATCH
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = {str(m.value): m.value for m in tp}
        return values.get(str(value), _NO_MATCH) if isinstance(value, str) else _NO_MATCH
    return value


# Bounds on what a recipe value may hold and on what an error message echoes of it: YAML anchors nested a few
# levels deep expand to billions of items when printed.
MAX_VALUE_ITEMS = 10_000
_ECHO = reprlib.Repr()  # keyword arguments only from Python 3.12
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxtuple, _ECHO.maxdict, _ECHO.maxstring, _ECHO.maxother = 2, 4, 4, 4, 60, 60


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, whatever the size of ``value``."""
    return _ECHO.repr(value)


def _too_many_items(value: Any) -> bool:
    """Whether ``value`` holds more than ``MAX_VALUE_ITEMS`` items, counting shared (aliased) parts each time."""
    budget, stack = MAX_VALUE_ITEMS, [value]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, refusing a key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a list or mapping as a key (construct_mapping reports it), or a "<<" merge
            key = self.construct_object(key_node)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise UserInputError(f"recipe key {short_repr(key)} is given twice (line {line}): keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_training_args(training_args) -> None:
    """Values ``TrainingArguments`` accepts but that fail (or do nothing) only once training runs."""
    positive_ints = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
    for name in positive_ints:
        value = getattr(training_args, name)
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be an integer >= 1, got {short_repr(value)} (recipe key: {name})")
    for name in ("learning_rate", "weight_decay", "num_train_epochs", "max_grad_norm", "warmup_steps",
                 "label_smoothing_factor"):
        value = getattr(training_args, name, 0)
        positive = name == "learning_rate"
        number = isinstance(value, (int, float)) and math.isfinite(value)
        if not number or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise UserInputError(f"{name} must be a finite number {bound}, got {short_repr(value)} (recipe key: "
                                 f"{name})")


def _unknown_key_message(key: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return f"unknown {'option' if prefix else 'recipe key'} {prefix}{key}{hint}"


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key value``, ``--key=value``, ``--flag`` (true) and ``--key v1 v2`` (a list) as a dict of strings."""
    overrides: dict[str, Any] = {}
    key = None
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            name = name.replace("-", "_")
            key = None if eq else name
            overrides[name] = value if eq else []
        elif key is None:
            raise UserInputError(f"unexpected argument {token!r}: overrides are --field value pairs")
        else:
            overrides[key].append(token)
    return {name: (value if isinstance(value, str) else "true" if not value else value[0] if len(value) == 1
                   else value) for name, value in overrides.items()}


def parse_recipe(recipe: str | os.PathLike | None, overrides: list[str], dataclass_types) -> tuple:
    """Read ``recipe`` (YAML), apply ``overrides`` (``--field value`` tokens) and build ``dataclass_types``.

    Every problem (missing file, unknown key, wrong type, a value a dataclass rejects) raises
    :class:`UserInputError` with a one-line message naming the key.
    """
    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise UserInputError(f"recipe {str(recipe)!r} not found")
        try:
            values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as err:
            raise UserInputError(f"recipe {str(recipe)!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") \
                from None
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise UserInputError(f"recipe {str(recipe)!r} is not valid YAML{where}") from None
        if not isinstance(values, dict):
            raise UserInputError(f"recipe {str(recipe)!r} must be a mapping of field: value")
    field_types = _field_types(dataclass_types)
    for key in values:
        if key not in field_types:
            raise UserInputError(_unknown_key_message(str(key), field_types, ""))
    cli_values = parse_overrides(overrides)
    for key in cli_values:
        if key not in field_types:
            raise UserInputError(_unknown_key_message(key, field_types, "--"))
    merged = {**values, **cli_values}
    for key, value in merged.items():
        source = "option --" if key in cli_values else "recipe key: "
        if _too_many_items(value):
            raise UserInputError(f"{key} holds more than {MAX_VALUE_ITEMS:,} items (YAML anchors/aliases?), got "
                                 f"{short_repr(value)} ({source}{key})")
        coerced = _coerce(value, field_types[key])
        if coerced is _NO_MATCH:
            raise UserInputError(f"{key} must be {_type_name(field_types[key])}, got {short_repr(value)} "
                                 f"({source}{key})")
        merged[key] = coerced
    try:
        return HfArgumentParser(dataclass_types).parse_dict(merged)
    except (ValueError, TypeError) as err:
        message = re.sub(r" \(field: \w+\)$", "", str(err).strip().splitlines()[0])[:300]
        key = message.split(" ", 1)[0].strip("`'\":,")
        if key in merged:
            message += f" (option --{key})" if key in cli_values else f" (recipe key: {key})"
        raise UserInputError(message) from None

