"""What ``SAQTrainer`` adds to the Trainer's checkpoints and saves: the per-process strategy / ``rho="auto"`` state
file, the model reload through ``from_pretrained`` (resume, best model), and the arguments as JSON."""

import os

from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel
from transformers.utils import CONFIG_NAME, logging

from .quant import LSQQuantizer

logger = logging.get_logger(__name__)

# A checkpoint's per-process file of what saq_strategy keeps between steps.
SAQ_STATE_NAME = "saq_strategy_state"
# The arguments of a saved run or checkpoint, as JSON (the stock Trainer pickles them into training_args.bin).
TRAINING_ARGS_JSON = "training_args.json"
PICKLED_TRAINING_ARGS = "training_args.bin"


def strategy_state_file(checkpoint: str, process_index: int) -> str:
    return os.path.join(checkpoint, f"{SAQ_STATE_NAME}_{process_index}.safetensors")


def save_strategy_state(trainer, output_dir: str) -> None:
    """The strategies' kept tensors are per process (each worker's own gradients), saved next to its RNG state,
    so a resumed run takes exactly the steps the uninterrupted one would."""
    if trainer.distiller is not None and trainer.args.should_save:
        trainer.distiller.save(output_dir)  # which teacher, not the teacher: a resume must bring the same one
    tensors, metadata = trainer.strategy.state_dict()
    if trainer.radius_rule is not None:
        tensors = {**tensors, **trainer.radius_rule.state_dict()}
    if tensors:
        os.makedirs(output_dir, exist_ok=True)
        save_file(tensors, strategy_state_file(output_dir, trainer.args.process_index), metadata=metadata)


def load_strategy_state(trainer, checkpoint: str | None) -> None:
    path = strategy_state_file(checkpoint, trainer.args.process_index) if checkpoint is not None else None
    if path is None or not os.path.isfile(path):
        first_step = trainer.strategy.resumes_without_state
        if checkpoint is not None and first_step is not None:
            logger.warning(f"{checkpoint} holds no {SAQ_STATE_NAME} file (written by an older saq-hf, or with "
                           f"save_only_model): the first step after resuming is a {first_step} step.")
        return
    with safe_open(path, framework="pt", device=str(trainer.args.device)) as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    if trainer.radius_rule is not None:
        trainer.radius_rule.load_state_dict(tensors)  # pops its keys
    for key in [k for k in tensors if k.startswith("rho_auto.")]:
        tensors.pop(key)  # a rule state saved by a run without rho="auto"
    trainer.strategy.load_state_dict(tensors, metadata)


def reloads_by_name(model, checkpoint: str) -> bool:
    """Whether ``model`` (unwrapped) is reloaded from ``checkpoint`` with :func:`reload_weights`: a
    ``PreTrainedModel`` and a checkpoint with its config."""
    return isinstance(model, PreTrainedModel) and os.path.isfile(os.path.join(checkpoint, CONFIG_NAME))


def reload_weights(model: PreTrainedModel, checkpoint: str) -> None:
    """Load ``checkpoint``'s weights into ``model`` through ``from_pretrained``, which applies the Hub's key
    renaming and rebuilds the quantized layers exactly (the stock Trainer's plain ``load_state_dict`` restores
    nothing under renamed keys: huggingface/transformers#43701)."""
    reloaded = type(model).from_pretrained(checkpoint, dtype=model.dtype)
    if any(q.step_size_format == "linear" for q in reloaded.modules() if isinstance(q, LSQQuantizer)):
        raise ValueError(f"{checkpoint} stores its step sizes linearly (an earlier saq-hf), so its "
                         "optimizer state does not fit this release's log step sizes: start a new run from it "
                         "(model_name_or_path: the checkpoint folder) instead of resuming")
    model.load_state_dict(reloaded.state_dict())


def save_arguments_as_json(args, output_dir: str) -> None:
    """``args`` into ``output_dir/training_args.json`` (tokens redacted, as ``to_json_string`` does), in place of the
    pickle the stock ``Trainer._save`` has just written there."""
    pickled = os.path.join(output_dir, PICKLED_TRAINING_ARGS)
    if os.path.isfile(pickled):
        os.remove(pickled)
    with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
        f.write(args.to_json_string() + "\n")
