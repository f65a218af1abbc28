"""What a saq-hf run shows on the console: one progress bar per stage, and the training logs in a file instead.

The stock Trainer prints every log dict next to its bar and nests a bar per evaluation (stray ``[A`` escape codes
in a log file); transformers adds a bar per ``from_pretrained`` ("Loading weights") and ``save_pretrained``
("Writing model shards"). A run replaces the former with :class:`StageProgress` and hides the latter with
:func:`quiet_transformers_bars`; Hub download bars stay.
"""

import contextlib
import json
import os
from pathlib import Path

from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.utils import logging as transformers_logging

TRAIN_LOG_NAME = "train_log.json"


class StageProgress(TrainerCallback):
    """One bar for one training stage, with the latest loss and validation accuracy as its postfix; when the
    stage ends, its ``log_history`` (after ``earlier`` stages' logs) goes to ``train_log.json`` in ``output_dir``."""

    def __init__(self, description: str, log_stage: str, earlier: dict | None = None):
        self.description, self.log_stage, self.earlier = description, log_stage, earlier
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            self.bar = tqdm(total=state.max_steps, desc=self.description, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is None:
            return
        if self.bar.n or self.bar.initial:
            self.bar.update(state.global_step - self.bar.n)
            return
        # The first step (a resumed run's first too) also compiles the fused LSQ kernels, tens of seconds on a CPU:
        # the rate is timed from its end, or the first ETA is that step's time per step (an hour for the demo).
        self.bar.reset()
        self.bar.initial = self.bar.n = self.bar.last_print_n = state.global_step
        self.bar.refresh()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, label in (("loss", "loss"), ("eval_accuracy", "val top-1")):
            if key in logs:
                value = logs[key]
                self.postfix[label] = f"{100 * value:.1f}%" if key == "eval_accuracy" else f"{value:.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if state.is_world_process_zero and args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            write_train_log(args.output_dir, {**(self.earlier or {}), self.log_stage: state.log_history})


def show_stage_progress(trainer: Trainer, description: str, log_stage: str = "train",
                        earlier: dict | None = None) -> Trainer:
    """Swap the Trainer's console output (bar + printed log dicts + nested eval bars) for one :class:`StageProgress`
    bar; the logs go to ``train_log.json`` in the Trainer's ``output_dir``."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageProgress(description, log_stage, earlier))
    return trainer


def write_train_log(folder: str | os.PathLike, stages: dict[str, list | None]) -> Path:
    """``train_log.json`` in ``folder``: the Trainer's ``log_history`` of each stage."""
    path = Path(folder) / TRAIN_LOG_NAME
    path.write_text(json.dumps(stages, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def read_train_log(folder: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(folder) / TRAIN_LOG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def quiet_transformers_bars():
    """Hide transformers' own bars (loading and writing weights) and keep huggingface_hub's download bars."""
    transformers_on = transformers_logging.is_progress_bar_enabled()
    hub_on = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns huggingface_hub's bars off: back on below
    if hub_on:
        enable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()
            if not hub_on:
                disable_progress_bars()


def sharpness_passes(n_batches: int, n_random: int = 5, n_iter: int = 20) -> int:
    """Most forward passes :func:`saq_hf.landscape.sharpness_report` makes with these settings: per batch, the
    loss, ``n_random`` random and one adversarial direction, one gradient and ``n_iter`` Hessian-vector products."""
    return n_batches * (3 + n_random + n_iter)


@contextlib.contextmanager
def forward_pass_bar(model, total: int, description: str):
    """A bar that counts ``model``'s forward passes inside the block (long measurements that print nothing)."""
    bar = tqdm(total=total, desc=description, unit="pass", dynamic_ncols=True)

    def count(*_):  # returns None: a forward hook's return value would replace the model's output
        bar.update(1)

    handle = model.register_forward_hook(count)
    try:
        yield bar
        bar.update(max(0, total - bar.n))  # power iteration may stop early
    finally:
        handle.remove()
        bar.close()
