"""How ``SAQTrainer`` trains the LSQ step sizes: as logarithms (a linear checkpoint is converted), in an optimizer
group of their own without weight decay, and with ``saq_clean_step_sizes`` on the loss at the unperturbed point."""

from contextlib import contextmanager

import torch
from transformers.utils import logging

from .quant import LSQQuantizer

logger = logging.get_logger(__name__)


def train_step_sizes_in_log_form(model) -> None:
    """Convert the step sizes of a model loaded in the linear layout (an export, or a checkpoint of an earlier
    saq-hf) to the log form training uses, and say so in its ``quantization_config``."""
    quantizers = [(name, q) for name, q in model.named_modules() if isinstance(q, LSQQuantizer)]
    if not any(q.step_size_format == "linear" for _, q in quantizers):
        return
    for name, quantizer in quantizers:
        quantizer.to_log_step_size(f"{name}.step_size")
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        config["step_size_format"] = "log"
    elif config is not None:
        config.step_size_format = "log"
    logger.info("LSQ step sizes converted to log form for training (the checkpoint stored them linearly).")


def trained_step_size_quantizers(model) -> list[LSQQuantizer]:
    """The LSQ quantizers of ``model`` whose step sizes are trained."""
    return [m for m in model.modules() if isinstance(m, LSQQuantizer) and m.step_size_parameter.requires_grad]


def group_step_sizes(optimizer, model, lr_scale: float):
    """Move the LSQ step sizes of ``model`` into an optimizer group of their own: no weight decay, and ``lr_scale``
    times the learning rate (the scheduler scales every group alike). Returns ``optimizer``."""
    steps = {id(q.step_size_parameter) for q in model.modules() if isinstance(q, LSQQuantizer)}
    if lr_scale == 1 or not steps or not isinstance(optimizer, torch.optim.Optimizer) or optimizer.state:
        return optimizer
    moved = []
    for group in optimizer.param_groups:
        moved += [p for p in group["params"] if id(p) in steps]
        group["params"] = [p for p in group["params"] if id(p) not in steps]
    if moved:
        base = optimizer.param_groups[0]
        optimizer.add_param_group({"params": moved, "lr": base["lr"] * lr_scale, "weight_decay": 0.0})
    return optimizer


@contextmanager
def step_size_gradients_replaced(quantizers: list[LSQQuantizer], clean: list[torch.Tensor | None]):
    """The backward inside the block gives the step size of each of ``quantizers`` its gradient in ``clean``
    (``None``: zero) instead of its own. Hooks replace the gradient before it is accumulated, so data-parallel
    all-reduce and gradient accumulation treat the replacement exactly like any other gradient. The quantizers
    meanwhile skip computing the gradient that is replaced (a zero still reaches the hook)."""
    def replace(c):
        # The clean gradient once; zeros for any further part (reentrant activation checkpointing can deliver
        # a tensor's gradient in parts, one per backward its recompute runs).
        delivered = []

        def hook(grad):
            if c is None or delivered:
                return torch.zeros_like(grad)
            delivered.append(True)
            return c.to(grad.dtype)

        return hook

    handles = [q.step_size_parameter.register_hook(replace(c)) for q, c in zip(quantizers, clean)]
    for quantizer in quantizers:
        quantizer.step_size_grad = False
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for quantizer in quantizers:
            quantizer.step_size_grad = True
