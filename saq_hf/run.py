"""A saq-hf run: full-precision model -> quantize -> SAQ training -> FP vs quantized report -> hub-ready folder.

``prepare`` loads and checks everything (recipe values, dataset, columns, image processor, model, Hub repo)
and writes nothing, so bad input fails before ``output_dir`` exists; ``train`` does the work (in a staging folder,
:mod:`saq_hf.run_folder`). :mod:`saq_hf.evaluate` scores a finished run folder. The CLI is a thin shell over these.
"""

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, set_seed

from ._version import __version__
from .args import DataArguments, ModelArguments, QuantArguments, UserInputError, check_training_args
from .bits_plan import check_plan
from .checkpoint_state import save_arguments_as_json
from .console import say
from .data import ImageClassificationData, collate_fn, data_fingerprint, load_image_data, with_transforms
from .evaluate import _warn_if_small, evaluate_run, format_results  # noqa: F401  (the latter two: their old home)
from .file_modes import follow_umask
from .hub import RUN_INFO_NAME, PushError, create_repo, push_run_folder, write_model_card
from .loading import (
    DISTILL_FP,
    _checkpoint_config,
    _first_line,
    _hub_kwargs,
    _load_fp_model,
    _load_image_processor,
    _load_teacher,
    _scratch_image_processor,
)
from .metrics import compute_metrics_fn, evaluate_classifier, load_metric
from .progress import read_train_log, show_stage_progress
from .quant import calibrate
from .quant.convert import planned_layers, resolve_defaults
from .quantize import quantize_model
from .run_folder import (
    _check_output_dir,
    _check_writable,
    _claim_staging,
    _finish_run_folder,
    _replace_folder,
    _resolve_resume_checkpoint,
)
from .trainer import WAITING, SAQTrainer, SAQTrainingArguments

SAQ_FIELDS = ("saq_mode", "rho", "saq_radius", "saq_start_ratio", "saq_clean_step_sizes", "saq_adaptive", "saq_perturb",
              "saq_strategy", "saq_interval", "saq_looksam_alpha")
TRAINING_FIELDS = ("optim", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                   "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed")
FP_STAGE_TRAINING_FIELDS = ("optim", "weight_decay", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
                            "gradient_accumulation_steps", "seed", "max_grad_norm", "label_smoothing_factor")


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


def _check_device_precision(args: SAQTrainingArguments) -> None:
    if args.fp16 and args.device.type == "cpu":
        raise UserInputError("fp16 mixed precision needs a GPU and this run trains on the CPU, where it would do "
                             "nothing: drop fp16, or use bf16 (recipe key: fp16)")


def _check_quantizable(model: torch.nn.Module, quant_args: QuantArguments) -> dict[str, Any] | None:
    """The quantization settings applied to the FP model leave something to quantize and every pattern matches;
    a bits plan names exactly the model's layers and meets its budget. Returns the plan's allocation (or None)."""
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
            save_arguments_as_json(fp_args, str(partial))  # the stock Trainer's pickle of them, replaced
            follow_umask(*partial.rglob("*.safetensors"))
            _replace_folder(partial, setup.fp_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


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
    staging = _claim_staging(setup.training_args)
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


__all__ = ["RunResult", "RunSetup", "evaluate_run", "format_results", "prepare", "train"]
