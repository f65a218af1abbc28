"""A saq-hf run: full-precision model -> quantize -> SAQ training -> FP vs quantized report -> hub-ready folder.

``prepare`` loads and checks everything (recipe values, dataset, columns, image processor, model, Hub repo)
and writes nothing, so bad input fails before ``output_dir`` exists; ``train`` does the work; ``evaluate_run``
scores a finished run folder. The CLI is a thin shell over these three.
"""

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
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, Trainer, set_seed
from transformers.models.auto.image_processing_auto import (
    IMAGE_PROCESSOR_MAPPING_NAMES,
    get_image_processor_class_from_name,
)

from . import __version__
from .args import DataArguments, ModelArguments, QuantArguments, UserInputError
from .data import ImageClassificationData, collate_fn, load_image_data, with_transforms
from .hub import RUN_INFO_NAME, PushError, create_repo, is_hub_id, push_run_folder, read_run_info, write_model_card
from .metrics import compute_metrics_fn, evaluate_classifier, load_metric
from .progress import forward_pass_bar, read_train_log, sharpness_passes, show_stage_progress
from .landscape import sharpness_report
from .quant import calibrate
from .quantize import quantize_model
from .trainer import SAQTrainer, SAQTrainingArguments

SAQ_FIELDS = ("saq_mode", "rho", "saq_adaptive", "saq_perturb", "saq_strategy", "saq_interval")
TRAINING_FIELDS = ("optim", "learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
                   "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "seed")
FP_STAGE_TRAINING_FIELDS = ("optim", "weight_decay", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
                            "gradient_accumulation_steps", "seed", "max_grad_norm", "label_smoothing_factor")


def _say(message: str) -> None:
    print(f"[saq-hf] {message}", flush=True)


# Below this many images one image moves accuracy by more than a point: say so next to the numbers.
SMALL_SPLIT = 100


def _warn_if_small(split_name: str, num_rows: int) -> None:
    if num_rows < SMALL_SPLIT:
        _say(f"warning: the {split_name} split has only {num_rows} images, so one image is {100 / num_rows:.1f} "
             f"points of accuracy; report on a larger split (test_split, train_val_split) for figures that mean much")


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


@dataclass
class RunResult:
    output_dir: Path
    run_info: dict[str, Any]
    push_url: str | None = None
    push_error: str | None = None


def _fp_stage_key(model_args, data_args, training_args, num_labels: int) -> str:
    """Hash of everything the FP stage result depends on, so identical recipes reuse it."""
    def absolute(path):
        return os.path.abspath(os.path.expanduser(path)) if path and os.path.exists(os.path.expanduser(path)) else path

    settings = {
        "model": {**dataclasses.asdict(model_args), "model_name_or_path": absolute(model_args.model_name_or_path),
                  "fp_learning_rate": model_args.fp_learning_rate or training_args.learning_rate,
                  "fp_cache_dir": None, "cache_dir": None, "torch_num_threads": None},
        "data": {**dataclasses.asdict(data_args), "data_dir": absolute(data_args.data_dir), "metric_name": None,
                 "max_eval_samples": None, "test_split": None},
        "training": {name: str(getattr(training_args, name)) for name in FP_STAGE_TRAINING_FIELDS},
        "num_labels": num_labels,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scratch_image_processor(config):
    """A processor for a model built from scratch: the architecture's own class at the model's image size."""
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type)
    if not names:
        raise UserInputError(f"model_type {config.model_type!r} has no image processor (recipe key: model_type)")
    cls = get_image_processor_class_from_name(names.get("pil") or next(iter(names.values())))
    size = config.image_size
    if getattr(cls().size, "shortest_edge", None):
        return cls(size={"shortest_edge": size}, crop_pct=1.0)
    return cls(size={"height": size, "width": size})


def _hub_kwargs(model_args: ModelArguments, source: str) -> dict[str, Any]:
    return dict(revision=model_args.model_revision, cache_dir=model_args.cache_dir) if is_hub_id(source) else {}


def _load_fp_model(model_args: ModelArguments, data: ImageClassificationData, source: str | None):
    """FP model (and whether its classifier was re-initialised), from ``source`` or from scratch."""
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
    checkpoint_config = _checkpoint_config(model_args, source)
    try:
        model = AutoModelForImageClassification.from_pretrained(source, ignore_mismatched_sizes=True, **labels,
                                                                **_hub_kwargs(model_args, source))
    except Exception as err:  # missing/corrupt files, offline, unknown id: transformers raises many types
        raise UserInputError(_model_load_error(source, err)) from None
    return model, checkpoint_config.num_labels != len(data.label_names)


def _model_load_error(source: str, err: BaseException) -> str:
    return (f"could not load model {source!r}: {_first_line(err)} (recipe key: model_name_or_path; offline, a Hub "
            "model must already be in the cache; a local folder needs config.json and *.safetensors)")


def _checkpoint_config(model_args: ModelArguments, source: str):
    try:
        return AutoConfig.from_pretrained(source, **_hub_kwargs(model_args, source))
    except Exception as err:
        raise UserInputError(_model_load_error(source, err)) from None


def _load_image_processor(source: str, hub_kwargs: dict[str, Any] | None = None):
    try:
        return AutoImageProcessor.from_pretrained(source, **(hub_kwargs or {}))
    except Exception as err:
        raise UserInputError(f"could not load the image processor of {source!r}: {_first_line(err)} "
                             "(a run or model folder needs preprocessor_config.json)") from None


def prepare(model_args: ModelArguments, data_args: DataArguments, quant_args: QuantArguments,
            training_args: SAQTrainingArguments) -> RunSetup:
    """Load and check everything a run needs; raises :class:`UserInputError` and writes nothing."""
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
        _checkpoint_config(model_args, checkpoint)
        image_processor = _load_image_processor(checkpoint, _hub_kwargs(model_args, checkpoint))
    data = load_image_data(data_args, seed=training_args.seed, cache_dir=model_args.cache_dir)

    fp_dir, fp_cached = None, False
    if model_args.fp_stage:
        key = _fp_stage_key(model_args, data_args, training_args, len(data.label_names))
        fp_dir = Path(os.path.expanduser(model_args.fp_cache_dir)) / key
        fp_cached = (fp_dir / "config.json").is_file()
    source = str(fp_dir) if fp_cached else model_args.model_name_or_path
    model, head_reinitialised = _load_fp_model(model_args, data, source)
    if image_processor is None:
        image_processor = _scratch_image_processor(model.config)
    with_transforms(data, image_processor, data_args)

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
                    fp_dir, fp_cached, head_reinitialised, hub_repo_id)


def _train_full_precision(setup: RunSetup) -> None:
    """FP stage: train the loaded model with a stock Trainer and keep the result in ``setup.fp_dir``."""
    model_args, args = setup.model_args, setup.training_args
    partial = setup.fp_dir.with_name(setup.fp_dir.name + ".partial")
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
            shutil.rmtree(setup.fp_dir, ignore_errors=True)
            os.replace(partial, setup.fp_dir)
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
        "quantization": {**quant_config.to_dict(), "tag": quant_config.tag,
                         "calibration_batches": setup.quant_args.calibration_batches},
        "saq": {name: getattr(args, name) for name in SAQ_FIELDS},
        "training": {**{name: getattr(getattr(args, name), "value", getattr(args, name)) for name in TRAINING_FIELDS},
                     "global_steps": global_step, "train_runtime_s": round(train_runtime, 1)},
        "results": results,
    }


def train(setup: RunSetup) -> RunResult:
    """Run a prepared recipe: FP stage (or its cache), quantize, calibrate, SAQ training, report, save, push."""
    args, data = setup.training_args, setup.data
    report_name, report_split = data.report_split
    _warn_if_small(report_name, report_split.num_rows)
    eval_batch = args.per_device_eval_batch_size
    if setup.model_args.fp_stage and not setup.fp_cached:
        _say(f"full-precision stage -> {setup.fp_dir}")
        _train_full_precision(setup)
    elif setup.fp_cached:
        _say(f"reusing the full-precision model cached at {setup.fp_dir}")
    elif setup.head_reinitialised:
        _say("warning: the checkpoint's classifier was re-initialised for this dataset and there is no FP stage "
             "(fp_num_train_epochs: 0), so the FP accuracy below is that of a random head")

    model = setup.model.to(args.device)
    results: dict[str, Any] = {"split": report_name, "num_examples": report_split.num_rows}
    results["fp"] = evaluate_classifier(model, report_split, setup.metric, collate_fn, eval_batch)
    quantize_model(model, setup.quant_args.quant_config())
    # Calibration crops draw from Python's RNG: reseed so a run from the cached FP model matches a fresh one.
    set_seed(args.seed)
    if setup.quant_args.calibration_batches:
        calibrate(model, _calibration_batches(setup))
        results["quantized_calibrated"] = evaluate_classifier(model, report_split, setup.metric, collate_fn,
                                                              eval_batch)
    _say(f"quantized to {model.config.quantization_config.tag}; {args.saq_mode} training")

    # With hub_strategy "end" saq-hf pushes the finished folder itself (with its own card); with the
    # checkpoint strategies the Trainer also pushes checkpoints as they are saved.
    trainer_args = dataclasses.replace(args, push_to_hub=False) if args.hub_strategy == "end" else args
    trainer = SAQTrainer(model=model, args=trainer_args, train_dataset=data.train, eval_dataset=data.validation,
                         compute_metrics=compute_metrics_fn(setup.metric), data_collator=collate_fn,
                         processing_class=setup.image_processor)
    show_stage_progress(trainer, f"{model.config.quantization_config.tag} {args.saq_mode}", log_stage="quantized",
                        earlier=read_train_log(setup.fp_dir) if setup.fp_dir is not None else None)
    started = time.perf_counter()
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_runtime = time.perf_counter() - started
    results["quantized"] = evaluate_classifier(trainer.model, report_split, setup.metric, collate_fn, eval_batch)

    output_dir = Path(args.output_dir)
    # _internal_call: save without Trainer.push_to_hub, which would replace our card with its own.
    trainer.save_model(str(output_dir), _internal_call=True)
    run_info = _run_info(setup, results, train_runtime, train_output.global_step)
    result = RunResult(output_dir=output_dir, run_info=run_info)
    if args.should_save:
        (output_dir / RUN_INFO_NAME).write_text(json.dumps(run_info, indent=2, default=str) + "\n", encoding="utf-8")
        write_model_card(output_dir, repo_id=setup.hub_repo_id)
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
    if sharpness and sharpness_rho < 0:
        raise UserInputError(f"--sharpness_rho must be >= 0, got {sharpness_rho}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(f"run folder {str(run_dir)!r} not found")
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
    except ValueError as err:
        raise UserInputError(_first_line(err)) from None
    if split is not None and split != data_args.validation_split:
        data_args.test_split = split
    data = load_image_data(data_args, seed=info.get("training", {}).get("seed", 42))
    if split is None:
        split_name, dataset = data.report_split
    elif split == data_args.validation_split:
        split_name, dataset = split, data.validation
    elif data.test is None:
        raise UserInputError(f"dataset has no split {split!r}; pass --split with one of its splits")
    else:
        split_name, dataset = split, data.test
    _warn_if_small(split_name, dataset.num_rows)

    models = {"quantized": str(run_dir)}  # first: a broken run folder fails before any other work
    fp_model = info.get("fp_model")
    results: dict[str, Any] = {"split": split_name, "num_examples": dataset.num_rows}
    if fp_model and (os.path.isdir(fp_model) or is_hub_id(fp_model)):
        models["fp"] = fp_model
    else:  # the table says why the FP row is missing
        results["fp_missing"] = (f"{fp_model} no longer exists (FP cache cleared?); rerun the recipe to rebuild it"
                                 if fp_model else "the run has no FP model of these classes (new head, no FP stage)")
    processor = _load_image_processor(str(run_dir))
    with_transforms(data, processor, data_args)
    metric = load_metric(data_args.metric_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_info = info.get("model", {})
    for name, source in models.items():
        hub_kwargs = (dict(revision=model_info.get("model_revision"), cache_dir=model_info.get("cache_dir"))
                      if is_hub_id(source) else {})
        try:
            model = AutoModelForImageClassification.from_pretrained(source, **hub_kwargs)
        except Exception as err:
            if name == "fp":  # the FP model is a bonus: a cache that was cleared or no network skips it
                results["fp_missing"] = f"{source} could not be loaded: {_first_line(err)}"
                continue
            raise UserInputError(f"could not load the model in {str(run_dir)!r}: {_first_line(err)}") from None
        if model.config.num_labels != len(data.label_names):
            raise UserInputError(f"the model predicts {model.config.num_labels} classes but the dataset has "
                                 f"{len(data.label_names)}: evaluate on a dataset with the model's classes")
        results[name] = evaluate_classifier(model.to(device), dataset, metric, collate_fn, batch_size)
        if name == "quantized" and sharpness:
            batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
            with forward_pass_bar(model, sharpness_passes(min(sharpness_batches, len(batches))), "sharpness"):
                results["sharpness"] = sharpness_report(model, batches, rho=sharpness_rho,
                                                        max_batches=sharpness_batches)
    results["tag"] = info.get("quantization", {}).get("tag", "quantized")
    results["dataset"] = data_args.dataset_name
    if "sharpness" in results and has_info:
        info["sharpness"] = {**results["sharpness"], "split": split_name, "dataset": data_args.dataset_name}
        (run_dir / RUN_INFO_NAME).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        write_model_card(run_dir, repo_id=info.get("hub_model_id"))
    return results


def format_sharpness(report: dict[str, Any]) -> str:
    """Sharpness numbers of :func:`saq_hf.landscape.sharpness_report` as a short table."""
    rows = [("loss", report["loss"]), ("top Hessian eigenvalue (w.r.t. Q(w))", report["top_eigenvalue"]),
            (f"loss increase, random ε (rho={report['rho']:g})", report["random_loss_increase"]),
            (f"loss increase, adversarial ε (rho={report['rho']:g})", report["adversarial_loss_increase"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"sharpness on {report['n_samples']} images"]
                     + [f"{name:<{width}}  {value:10.4f}" for name, value in rows])


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
