"""Measuring a saved model on its run's data (or another dataset): ``saq-hf eval`` scores a run folder (top-1/top-5,
optionally sharpness), ``saq-hf search`` writes a bits plan; plus the result tables ``train`` and ``eval`` print."""

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageClassification

from .args import DataArguments, UserInputError
from .console import warn_line
from .data import collate_fn, load_image_data, with_transforms
from .hub import RUN_INFO_NAME, is_hub_id, read_run_info, refuse_custom_code, write_model_card
from .landscape import sharpness_report
from .loading import _first_line, _load_image_processor, _scratch_image_processor
from .metrics import evaluate_classifier, load_metric
from .progress import forward_pass_bar, sharpness_passes
from .quant import is_quantized
from .search import check_budget, search_bits

# Below this many images one image moves accuracy by more than a point: say so next to the numbers.
SMALL_SPLIT = 100


def _warn_if_small(split_name: str, num_rows: int) -> None:
    if num_rows < SMALL_SPLIT:  # on stderr: stdout stays the report
        warn_line(f"the {split_name} split has only {num_rows} images, so one image is {100 / num_rows:.1f} points "
                  "of accuracy; report on a larger split (test_split, train_val_split) for figures that mean much")


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


def search_run(source: str, out: str | os.PathLike, *, target_bits: float | None = None,
               target_bytes: int | None = None, measure: str = "sharpness", candidates=(2, 3, 4, 8),
               dataset_name: str | None = None, data_dir: str | None = None, batches: int = 4, batch_size: int = 32,
               rho: float = 0.002, weights_only: bool = False, seed: int = 42):
    """``saq-hf search``: a bits plan for the model in ``source`` (a run folder or a saved model folder) measured on
    ``batches`` training batches of its dataset (the run's, or ``dataset_name``/``data_dir``), written as YAML to
    ``out``. Every check (budget included) runs before the data is loaded. Returns the :class:`BitsPlan`."""
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
