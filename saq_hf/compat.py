"""The transformers internals saq-hf overrides or wraps, checked for the shape it expects.

``SAQTrainer`` overrides private ``Trainer`` methods and the ``saq`` quantizer wraps a private ``PreTrainedModel``
method. A transformers release that renames one of them, or changes its arguments, would otherwise fail deep inside
training or loading (or, worse, skip our override silently): these checks turn that into one line naming the range
saq-hf supports, before any work. ``.ci/compat`` installs the edges of that range and runs the core tests on each.
"""

import inspect

import transformers

# The oldest transformers release saq-hf supports: 5.0 has another ``_adjust_missing_and_unexpected_keys``
# (key sets in, key sets out) and a ``create_optimizer`` without the model argument.
TRANSFORMERS_FLOOR = "5.1.0"
SUPPORTED = f"saq-hf supports transformers>={TRANSFORMERS_FLOOR}"

# Trainer methods SAQTrainer overrides or calls, with the parameter names (after ``self``) it relies on.
# ``create_optimizer`` took no model before 5.10; both shapes are handled (``create_optimizer_takes_model``).
TRAINER_METHODS = {
    "training_step": ("model", "inputs", "num_items_in_batch"),
    "compute_loss": ("model", "inputs", "return_outputs", "num_items_in_batch"),
    "compute_loss_context_manager": (),
    "_prepare_inputs": ("inputs",),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_best_model": (),
    "_save_rng_state": ("output_dir",),
    "_load_rng_state": ("checkpoint",),
    "get_decay_parameter_names": ("model",),
}
MODEL_METHODS = {"_adjust_missing_and_unexpected_keys": ("loading_info",)}


def _parameters(function) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(function).parameters if name != "self")


def _problem(owner: type, name: str, expected: tuple[str, ...]) -> str | None:
    function = getattr(owner, name, None)
    if not callable(function):
        return f"{owner.__name__}.{name} is gone"
    found = _parameters(function)
    if found[:len(expected)] != expected:
        return f"{owner.__name__}.{name}({', '.join(found)}) no longer takes ({', '.join(expected)})"
    return None


def _require(owner: type, methods: dict[str, tuple[str, ...]]) -> None:
    problems = [p for name, expected in methods.items() if (p := _problem(owner, name, expected)) is not None]
    if problems:
        raise RuntimeError(f"transformers {transformers.__version__} changed what saq-hf builds on "
                           f"({'; '.join(problems)}): {SUPPORTED}; install a release in that range "
                           f"(pip install 'transformers>={TRANSFORMERS_FLOOR}') or upgrade saq-hf")


_checked: set[type] = set()


def check_trainer_internals(trainer_class: type = transformers.Trainer) -> None:
    """Raise one line if ``Trainer`` lacks a method SAQTrainer overrides, in the shape it overrides it."""
    if trainer_class in _checked:
        return
    methods = dict(TRAINER_METHODS)
    if not create_optimizer_takes_model(trainer_class):
        methods["create_optimizer"] = ()
    _require(trainer_class, methods)
    _checked.add(trainer_class)


def check_loading_internals(model_class: type = transformers.PreTrainedModel) -> None:
    """Raise one line if ``PreTrainedModel`` lacks the key report the ``saq`` quantizer wraps, in its shape."""
    _require(model_class, MODEL_METHODS)


def create_optimizer_takes_model(trainer_class: type = transformers.Trainer) -> bool:
    """``Trainer.create_optimizer(model=None)`` (transformers 5.10 and later) or ``create_optimizer()``."""
    return "model" in _parameters(trainer_class.create_optimizer)
